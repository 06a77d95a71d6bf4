"""`python -m lorsbench [overrides]` and `python -m lorsbench -m <sweep>`: the Hydra entry point (thin).

Exit status: 0 success (or skipped by `resume=true`), 1 failed run, 2 unusable output root, 128+N when signal N
(SIGINT, SIGTERM) interrupted the run (its record then says `interrupted`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lorsbench.sweep_index import SKIPPED  # main's return value when resume=true skips a job

log = logging.getLogger("lorsbench")
DEFAULT_OUTPUT_ROOT = "results/raw"  # conf/paths/default.yaml


class RunFailed(RuntimeError):
    """Raised in multirun so Hydra marks the job failed and the sweep goes on (the record is already written)."""


def _config_failure(output_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    from lorsbench.distributed import new_record  # rank 0 (or the only process) writes run.json
    from lorsbench.records import now_utc

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - the resolved config itself may be what is broken
        resolved = OmegaConf.to_container(cfg, resolve=False)
    record = new_record(output_dir, started_at=now_utc(), resolved_config=resolved, output_dir=str(output_dir))
    record.update(status="failed", error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
                  phase_failed="config")
    record.save()


def _without_resume(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "resume"}


def _resume_check(output_dir: Path, resolved: dict) -> str | None:
    """With resume=true: SKIPPED when `output_dir` holds a success record of this same config; an error message when
    it holds one of another config (never overwritten); None when the job must run."""
    from lorsbench.records import RECORD_FILE, validate_record

    try:
        record = json.loads((output_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if validate_record(record) or record.get("status") != "success":
        return None
    if _without_resume(record.get("resolved_config") or {}) != _without_resume(resolved):
        return (f"resume=true: {output_dir / RECORD_FILE} is a success record of a different configuration; "
                "it is kept. Re-run the sweep with the same overrides, or into a new hydra.sweep.dir")
    return SKIPPED


def _output_root_problem(argv: list[str]) -> str | None:
    """An output root that exists and is not a folder: Hydra would fail creating the run folder with a traceback."""
    root = os.environ.get("LORSBENCH_OUTPUT", DEFAULT_OUTPUT_ROOT)
    for arg in argv:
        if arg.startswith(("paths.output_root=", "++paths.output_root=", "+paths.output_root=")):
            root = arg.split("=", 1)[1]
    from lorsbench.config import not_a_folder

    blocker = not_a_folder(Path(os.path.expanduser(root)))
    if blocker is not None:
        return (f"paths.output_root={root}: {blocker} exists and is not a directory; point paths.output_root "
                "(or LORSBENCH_OUTPUT) at a folder")
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str | None:
    from lorsbench.config import build_run_config
    from lorsbench.pipeline import Interrupted, run_pipeline

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if resolved.get("resume"):
            verdict = _resume_check(output_dir, resolved)
            if verdict == SKIPPED:
                print(f"[lorsbench] skipped (resume=true, already a success): {output_dir / 'run.json'}",
                      file=sys.stderr)
                return SKIPPED
            if verdict is not None:
                print(f"error: {verdict}", file=sys.stderr)
                if multirun:
                    raise RunFailed(verdict)
                sys.exit(1)
        run_cfg = build_run_config(resolved)
    except RunFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - config errors are recorded like any other failure
        _config_failure(output_dir, cfg, exc)
        record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    else:
        log.info("run %s -> %s", run_cfg.run_name, output_dir)
        try:
            record = run_pipeline(run_cfg, output_dir)
        except Interrupted as stop:  # recorded as interrupted; the whole sweep stops too
            print(f"[lorsbench] interrupted by {stop}: {output_dir / 'run.json'}", file=sys.stderr)
            sys.exit(128 + stop.signum)
    print(f"[lorsbench] {record['status']}: {output_dir / 'run.json'}", file=sys.stderr)
    if record["status"] != "success":
        if multirun:
            raise RunFailed(record["error"])
        print(f"error: {record['error']}", file=sys.stderr)
        sys.exit(1)
    return None


if __name__ == "__main__":  # `python -m lorsbench ...` and `lorsbench run ...` (lorsbench.cli)
    problem = _output_root_problem(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if "RANK" in os.environ:  # torchrun: every rank names rank 0's run folder (lorsbench.distributed)
        from lorsbench.distributed import share_run_stamp

        share_run_stamp()
    main()
