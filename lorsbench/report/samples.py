"""Per-example files of a run folder, read for paired comparisons, and their alignment between runs.

Named in run.json, next to it:
- `samples_file` (`samples.jsonl.gz`): gzip JSONL, one line per (task, document):
  `{"task": <name as in record["tasks"]>, "doc_id": int, "acc": 0|1, "acc_norm": 0|1|null, "margin": float}`;
- `perplexity_windows_file` (`perplexity_windows.json`): `{"nll_sum": [float], "tokens": [int], "text_sha256": str}`.
Older records name neither: such runs take no part in paired tests (the report lists them). Two runs pair only on
the same documents (the same doc_ids per task) and, for perplexity, on the same text and windows; anything else is a
`PairingError` that says what differs, never a silent partial pairing.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lorsbench.report.collect import ReportError, is_missing


class PairingError(ReportError):
    """Two runs cannot be paired (different tasks, documents or perplexity windows)."""


@dataclass(frozen=True)
class TaskSamples:
    doc_ids: np.ndarray  # int64, sorted ascending
    acc: np.ndarray  # float64 0/1, one per document
    acc_norm: np.ndarray | None  # float64 0/1; None unless recorded for every document of the task
    margin: np.ndarray  # float64: gold log-likelihood minus the best other choice's


@dataclass(frozen=True)
class PerplexityWindows:
    nll_sum: np.ndarray  # float64 per window
    tokens: np.ndarray  # int64 per window
    text_sha256: str


@dataclass(frozen=True)
class RunSamples:
    run_dir: str
    tasks: dict[str, TaskSamples]
    windows: PerplexityWindows | None


def _binary(value: Any, nullable: bool) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or value in (0, 1):
        return float(value)
    raise ValueError(f"must be 0 or 1{' or null' if nullable else ''}, got {value!r}")


def read_samples(path: Path, tasks: Iterable[str] | None = None) -> dict[str, TaskSamples]:
    """`samples.jsonl.gz` -> {task: TaskSamples}; `tasks` (the record's) bounds the task names allowed."""
    allowed = set(tasks) if tasks is not None else None
    rows: dict[str, list[tuple[int, float, float | None, float]]] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    task, doc_id = item["task"], item["doc_id"]
                    if not isinstance(task, str) or not isinstance(doc_id, int) or isinstance(doc_id, bool):
                        raise TypeError(f"task must be a string and doc_id an integer, got {task!r}, {doc_id!r}")
                    margin = item.get("margin")
                    rows.setdefault(task, []).append((doc_id, _binary(item["acc"], False),
                                                      _binary(item.get("acc_norm"), True),
                                                      float("nan") if margin is None else float(margin)))
                except (ValueError, KeyError, TypeError) as exc:
                    kind = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
                    raise ReportError(f"{path}, line {number}: {kind}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    if allowed is not None and set(rows) - allowed:
        raise ReportError(f"{path}: tasks {sorted(set(rows) - allowed)} are not in the record's tasks "
                          f"{sorted(allowed)}")
    out = {}
    for task, items in rows.items():
        items.sort(key=lambda r: r[0])
        ids = np.array([r[0] for r in items], dtype=np.int64)
        if (np.diff(ids) == 0).any():
            raise ReportError(f"{path}: task {task!r} lists doc_id {int(ids[1:][np.diff(ids) == 0][0])} twice")
        norms = [r[2] for r in items]
        out[task] = TaskSamples(ids, np.array([r[1] for r in items]),
                                None if any(v is None for v in norms) else np.array(norms, dtype=np.float64),
                                np.array([r[3] for r in items], dtype=np.float64))
    return out


def read_windows(path: Path) -> PerplexityWindows:
    """`perplexity_windows.json` -> PerplexityWindows (checked: one positive token count per window)."""
    try:
        raw = json.loads(path.read_text())
        nll, tokens, sha = np.asarray(raw["nll_sum"], np.float64), np.asarray(raw["tokens"]), raw["text_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"cannot read perplexity windows {path}: {exc}") from None
    if nll.ndim != 1 or nll.shape != tokens.shape or nll.size == 0 or not np.isfinite(nll).all() \
            or (tokens <= 0).any() or not isinstance(sha, str):
        raise ReportError(f"{path}: need equal-length nll_sum (finite) and tokens (positive) lists and a "
                          f"text_sha256 string, got {nll.size} and {tokens.size} windows")
    return PerplexityWindows(nll, tokens.astype(np.int64), sha)


def per_example_state(run: dict[str, Any], folder: Path | None) -> str:
    """'' when the run's per-example file can be read, else why not (for the report's list)."""
    name = run.get("samples_file")
    if is_missing(name):
        return "no per-example record (older record)"
    if folder is None or not (folder / str(name)).is_file():
        return f"{name} named in run.json but missing from the run folder"
    return ""


def load_run(run: dict[str, Any], folder: Path, tasks: Iterable[str]) -> RunSamples:
    """A run's per-example data (the run must pass `per_example_state`); windows only where the record names them."""
    samples = read_samples(folder / str(run["samples_file"]), tasks)
    windows_name = run.get("perplexity_windows_file")
    windows = None
    if not is_missing(windows_name) and (folder / str(windows_name)).is_file():
        windows = read_windows(folder / str(windows_name))
    return RunSamples(str(run["run_dir"]), samples, windows)


def common_tasks(runs: Sequence[RunSamples]) -> list[str]:
    """The tasks every run has with the same doc_ids; PairingError naming the first difference otherwise."""
    first = runs[0]
    for other in runs[1:]:
        if set(other.tasks) != set(first.tasks):
            raise PairingError(f"different tasks: {first.run_dir} has {sorted(first.tasks)}, "
                               f"{other.run_dir} has {sorted(other.tasks)}")
        for task, samples in first.tasks.items():
            theirs = other.tasks[task].doc_ids
            if not np.array_equal(samples.doc_ids, theirs):
                shared = np.intersect1d(samples.doc_ids, theirs).size
                raise PairingError(f"task {task}: different documents ({first.run_dir} has {samples.doc_ids.size}, "
                                   f"{other.run_dir} has {theirs.size}, {shared} in common)")
    return sorted(first.tasks)


def stack(runs: Sequence[RunSamples], task: str, metric: str) -> np.ndarray | None:
    """(runs, documents) values of `metric` (acc, acc_norm or margin) for aligned runs; None where one lacks it."""
    values = [getattr(r.tasks[task], metric) for r in runs]
    return None if any(v is None for v in values) else np.stack(values)


def common_windows(runs: Sequence[RunSamples]) -> tuple[np.ndarray, np.ndarray]:
    """(runs, windows) NLL sums and the shared token counts; PairingError unless text and windows agree."""
    missing = [r.run_dir for r in runs if r.windows is None]
    if missing:
        raise PairingError(f"no perplexity windows for {', '.join(missing)}")
    first = runs[0].windows
    for run in runs[1:]:
        if run.windows.text_sha256 != first.text_sha256:
            raise PairingError(f"different perplexity text ({runs[0].run_dir} vs {run.run_dir}: text_sha256 differs)")
        if not np.array_equal(run.windows.tokens, first.tokens):
            raise PairingError(f"different perplexity windows ({runs[0].run_dir} has {first.tokens.size}, "
                               f"{run.run_dir} has {run.windows.tokens.size} or other token counts)")
    return np.stack([r.windows.nll_sum for r in runs]), first.tokens
