"""`sweep_index.json`: the jobs of a Hydra multirun and their statuses, written into the sweep folder.

Enable it in `conf/config.yaml`:

    hydra:
      callbacks:
        sweep_index:
          _target_: lorsbench.sweep_index.SweepIndexCallback

The index is rewritten when each job ends (`on_job_end`, in the job's process: with joblib or SLURM that is a
worker or a cluster node sharing the filesystem) and once more when the multirun ends (`final: true`). Both matter:
Hydra 1.3 skips `on_multirun_end` when any job raised, and lorsbench raises in a failed multirun job so that Hydra
marks it failed. Each write scans the sweep folder under a file lock, so the last writer sees every job's final
`run.json`. A job folder without `run.json` is listed as `no_record` (the job died before writing one); a job
that `resume=true` skipped (its folder already held a success record) has `skipped: true`.
"""
from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lorsbench.records import RECORD_FILE, write_json_atomic

SKIPPED = "skipped"  # what lorsbench.__main__.main returns for a job that resume=true skipped

INDEX_FILE = "sweep_index.json"
LOCK_FILE = ".sweep_index.lock"


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive flock on a file in `folder` (no lock where flock is unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(folder / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # some network filesystems refuse locks: write anyway
            pass
        yield


def _yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _job(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    hydra_cfg = _yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    num = ((hydra_cfg.get("hydra") or {}).get("job") or {}).get("num")
    entry: dict[str, Any] = {"num": num, "dir": str(job_dir.relative_to(sweep_dir)),
                             "overrides": _yaml(job_dir / ".hydra" / "overrides.yaml") or []}
    try:
        record = json.loads((job_dir / RECORD_FILE).read_text())
    except FileNotFoundError:
        return {**entry, "status": "no_record", "error": f"no {RECORD_FILE}: the job died before writing its record"}
    except (OSError, json.JSONDecodeError) as exc:
        return {**entry, "status": "unreadable", "error": f"{RECORD_FILE}: {exc}"}
    return {**entry, "status": record.get("status"), "run_name": record.get("run_name"),
            "error": record.get("error"), "phase_failed": record.get("phase_failed"), "wall_s": record.get("wall_s")}


def build_index(sweep_dir: str | Path, final: bool = False, previous: dict | None = None) -> dict[str, Any]:
    """Scan `sweep_dir` for job folders (those holding `.hydra/`) and read each job's run.json."""
    sweep_dir = Path(sweep_dir)
    jobs = [_job(h.parent, sweep_dir) for h in sweep_dir.rglob(".hydra") if h.is_dir() and h.parent != sweep_dir]
    carried = {j["dir"]: j for j in (previous or {}).get("jobs", [])}
    for job in jobs:
        for key in ("hydra_status", "skipped"):
            if carried.get(job["dir"], {}).get(key):
                job[key] = carried[job["dir"]][key]
    jobs.sort(key=lambda j: (j["num"] is None, j["num"] if j["num"] is not None else 0, j["dir"]))
    counts: dict[str, int] = {}
    for job in jobs:
        counts[str(job["status"])] = counts.get(str(job["status"]), 0) + 1
    return {"sweep_dir": str(sweep_dir), "final": final,
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_jobs": len(jobs), "counts": dict(sorted(counts.items())), "jobs": jobs}


def write_index(sweep_dir: str | Path, final: bool = False, job_dir: str | Path | None = None,
                hydra_status: str | None = None, skipped: bool = False) -> Path:
    """Rebuild the index under the lock; `job_dir`/`hydra_status`/`skipped` record the job just ended."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / INDEX_FILE
    with _locked(sweep_dir):
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        index = build_index(sweep_dir, final=final, previous=previous)
        if job_dir is not None and hydra_status is not None:
            rel = str(Path(job_dir).resolve().relative_to(sweep_dir.resolve()))
            for job in index["jobs"]:
                if job["dir"] == rel:
                    job["hydra_status"] = hydra_status
                    job.pop("skipped", None)
                    if skipped:
                        job["skipped"] = True
        write_json_atomic(path, index)
    return path


class SweepIndexCallback(Callback):
    """Hydra callback: keep `<sweep dir>/sweep_index.json` up to date in multirun (no-op for single runs)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_cfg = getattr(job_return, "hydra_cfg", None)
        if hydra_cfg is None or hydra_cfg.hydra.mode != RunMode.MULTIRUN:
            return
        status = getattr(job_return, "status", None)
        write_index(hydra_cfg.hydra.sweep.dir, job_dir=hydra_cfg.hydra.runtime.output_dir,
                    hydra_status=getattr(status, "name", None),
                    # the private field: JobReturn.return_value re-raises a failed job's exception
                    skipped=getattr(job_return, "_return_value", None) == SKIPPED)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_index(config.hydra.sweep.dir, final=True)
