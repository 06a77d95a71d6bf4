"""`python -m lorsbench [overrides]` and `python -m lorsbench -m <sweep>`: the Hydra entry point (thin)."""
from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lorsbench")


class RunFailed(RuntimeError):
    """Raised in multirun so Hydra marks the job failed and the sweep goes on (the record is already written)."""


def _config_failure(output_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    from lorsbench.records import RunRecord

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - the resolved config itself may be what is broken
        resolved = OmegaConf.to_container(cfg, resolve=False)
    record = RunRecord(output_dir, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       resolved_config=resolved, output_dir=str(output_dir))
    record.update(status="failed", error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
                  phase_failed="config")
    record.save()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lorsbench.config import build_run_config
    from lorsbench.pipeline import run_pipeline

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run_cfg = build_run_config(OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:  # noqa: BLE001 - config errors are recorded like any other failure
        _config_failure(output_dir, cfg, exc)
        record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    else:
        log.info("run %s -> %s", run_cfg.run_name, output_dir)
        record = run_pipeline(run_cfg, output_dir)
    print(f"[lorsbench] {record['status']}: {output_dir / 'run.json'}", file=sys.stderr)
    if record["status"] != "success":
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise RunFailed(record["error"])
        print(f"error: {record['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
