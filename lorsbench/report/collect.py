"""Run records -> pandas: `runs` (wide, one row per run) and `long` (tidy, one row per run x metric x task).

Reads every `run.json` under the given folders and validates it against the schema (`lorsbench.records`
`RecordFields`, `validate_record`): a record that is not JSON, of an unknown `schema_version`, or lacking the
fields its status needs is kept as status `invalid` with the reason, never guessed from and never fatal. Valid
records may lack optional fields (a run that failed in its first phase has little more than its status and
error). A `running` record whose process is gone (`records.liveness`) is status `stale` (killed?). A Hydra job
folder (`.hydra/`) without a `run.json` is kept as status `no_record` (the job died before writing one), so a
failure is never silently dropped. Seeds are not aggregated here (that is `tables.py`).
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from lorsbench.records import RECORD_FILE, liveness, validate_record

PHASES = ("load", "prune", "train", "eval")
STAGES = ("after_prune", "after_train", "after_merge")
# Run factors besides the method's own config that make two runs of one method different rows.
VARIANT_KEYS = ("lr", "max_steps", "seq_len", "data")

IDENTITY = ("run_dir", "run_name", "status", "regime", "block", "label", "variant", "error", "error_type",
            "phase_failed", "started_at", "finished_at", "wall_s", "smoke", "eval_limit", "eval_suite")
FACTORS = ("model", "model_source", "weights", "pruner", "pattern", "target_sparsity", "method",
           "preserves_sparsity", "seed", "dtype", "device", "device_name", "data")
TRAINING = ("trainable_params", "total_params", "train_steps", "max_steps", "seq_len", "micro_batch_size",
            "grad_accum", "lr", "step_ms_median", "step_ms_p90", "tokens_per_s", "train_wall_s", "final_loss",
            "world_size", "sharding", "peak_mem_gib_max_over_ranks")
MEMORY = tuple(f"peak_{kind}_gib_{phase}" for phase in PHASES for kind in ("alloc", "reserved", "rss"))
SPARSITY = tuple(f"{field}_{stage}" for stage in STAGES for field in ("sparsity", "nm_valid", "mask_preserved"))
QUALITY = ("has_accuracy", "mean_acc", "mean_acc_norm", "perplexity", "perplexity_tokens", "perplexity_window")
PROVENANCE = ("git_sha", "git_dirty", "prune_wall_s", "prune_cache_hit", "mask_digest")
WIDE_ORDER = IDENTITY + FACTORS + TRAINING + ("memory_kind", "peak_mem_gib_train") + MEMORY + SPARSITY + QUALITY \
    + PROVENANCE
# Run-level scalars that also go to the long table (task = "all").
RUN_METRICS = ("mean_acc", "perplexity", "trainable_params", "total_params", "step_ms_median", "step_ms_p90",
               "tokens_per_s", "train_wall_s", "final_loss", "peak_mem_gib_train", "prune_wall_s", "wall_s") \
    + MEMORY + SPARSITY
TASK_METRICS = ("acc", "acc_norm")
LONG_KEYS = ("run_dir", "run_name", "status", "regime", "block", "label", "model", "weights", "device_name",
             "eval_suite", "pruner", "pattern", "target_sparsity", "method", "variant", "seed")
LONG_COLUMNS = LONG_KEYS + ("task", "metric", "value", "stderr", "n")
ALL_TASKS = "all"


class ReportError(Exception):
    """Bad input to the report: the message is one line that says what and where."""


@dataclass(frozen=True)
class Collected:
    runs: pd.DataFrame
    long: pd.DataFrame
    inputs: tuple[str, ...]
    folders: dict[str, Path] = field(default_factory=dict)  # run_dir -> the run folder (per-example files)


def is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _find(paths: Iterable[str | Path]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(base, run.json) pairs and (base, job folder) pairs for Hydra job folders that have no run.json."""
    records, orphans, seen = [], [], set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"no such file or folder: {path}")
        if path.is_file():
            if path.name != RECORD_FILE:
                raise ReportError(f"{path} is not a {RECORD_FILE} (give run or sweep folders)")
            files, base = [path], path.parent.parent
        else:
            files, base = sorted(path.rglob(RECORD_FILE)), path.parent
            for hydra_dir in sorted(path.rglob(".hydra")):
                job = hydra_dir.parent
                if not (job / RECORD_FILE).exists() and job.resolve() not in seen:
                    seen.add(job.resolve())
                    orphans.append((base, job))
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                records.append((base, file))
    return records, orphans


def _read(file: Path) -> dict[str, Any]:
    """The record in `file`, or an `invalid` record saying why it cannot be used; a dead `running` one is `stale`."""
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        reason = f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except (OSError, UnicodeDecodeError) as exc:
        reason = f"cannot read: {exc}"
    else:
        problems = validate_record(record)
        if not problems:
            stale = liveness(record)
            if stale is not None:
                return {**record, "status": "stale", "error": f"stale (killed?): {stale}; status was running",
                        "phase_failed": record.get("phase_failed")}
            return record
        reason = "not a valid run record: " + "; ".join(problems)
    return {"status": "invalid", "run_name": file.parent.name, "error": f"{file}: {reason}"}


def _orphan_record(job: Path) -> dict[str, Any]:
    """What a Hydra job folder without run.json still tells: its composed config."""
    record: dict[str, Any] = {"status": "no_record", "run_name": job.name,
                              "error": f"no {RECORD_FILE}: the job died before writing its record"}
    try:
        import yaml

        record["resolved_config"] = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    except Exception:  # noqa: BLE001 - the folder is listed as failed whatever its config says
        pass
    return record


def _from_config(record: dict[str, Any]) -> dict[str, Any]:
    """Fill factors that a record written before setup lacks from its resolved config."""
    cfg = record.get("resolved_config")
    if not isinstance(cfg, dict):
        return record

    def pick(*keys: str) -> Any:
        node: Any = cfg
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    filled = dict(record)
    pruner = pick("pruning", "name")
    guesses = {"run_name": pick("run_name"), "model": pick("model", "name"), "pruner": pruner,
               "pattern": pick("pattern", "name"), "method": pick("method", "name"), "seed": pick("seed"),
               "target_sparsity": 0.0 if pruner == "none" else pick("sparsity"), "smoke": pick("smoke"),
               "eval_suite": pick("eval", "suite"), "eval_limit": pick("eval", "limit"), "dtype": pick("dtype")}
    for key, value in guesses.items():
        if is_missing(filled.get(key)) and value is not None and not (isinstance(value, str) and "${" in value):
            filled[key] = value
    return filled


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def _flatten(record: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One wide row: scalars as they are, known dicts flattened with a dotted prefix, derived columns added."""
    row: dict[str, Any] = {"run_dir": run_dir}
    for key, value in record.items():
        if key in ("resolved_config", "tasks") or isinstance(value, dict):
            continue
        row[key] = _scalar(value)
    for key, value in (record.get("method_config") or {}).items():
        row[f"method.{key}"] = _scalar(value)
    for key, value in (record.get("versions") or {}).items():
        row[f"version.{key}"] = value
    for stage in STAGES:
        for kind, value in (record.get(f"sparsity_by_type_{stage}") or {}).items():
            row[f"sparsity_by_type_{stage}.{kind}"] = value
    tasks = record.get("tasks") or {}
    for task, scores in tasks.items():
        row[f"acc.{task}"] = (scores or {}).get("acc")
    if is_missing(row.get("mean_acc")) and tasks:
        accs = [s.get("acc") for s in tasks.values() if isinstance(s, dict) and not is_missing(s.get("acc"))]
        row["mean_acc"] = sum(accs) / len(accs) if accs else None
    norms = [s["acc_norm"] for s in tasks.values() if isinstance(s, dict) and not is_missing(s.get("acc_norm"))]
    row["mean_acc_norm"] = sum(norms) / len(norms) if norms else None  # over the tasks that record it
    if record.get("weights") == "random":  # random weights: efficiency only, accuracy is meaningless
        for key in [k for k in row if k.startswith("acc.")] + ["mean_acc", "mean_acc_norm", "perplexity"]:
            row[key] = None
    row["has_accuracy"] = record.get("status") == "success" and not is_missing(row.get("mean_acc"))
    smoke, limit = bool(record.get("smoke")), record.get("eval_limit")
    row["regime"] = "smoke" if smoke else (f"limit={limit}" if not is_missing(limit) else "full")
    world = record.get("world_size")
    if isinstance(world, int) and world > 1:  # a sharded run is its own block: "4× NVIDIA H200" (rank 0's memory)
        row["device_name"] = f"{world}× {row.get('device_name')}"
    if not is_missing(row.get("peak_alloc_gib_train")):
        row["memory_kind"], row["peak_mem_gib_train"] = "gpu_alloc", row["peak_alloc_gib_train"]
    elif not is_missing(row.get("peak_rss_gib_train")):
        row["memory_kind"], row["peak_mem_gib_train"] = "cpu_rss", row["peak_rss_gib_train"]
    return row


@functools.cache
def _method_order() -> tuple[dict[str, int], int]:
    """The registered methods' `report_order`s, and the default one (names without one sort among it by name)."""
    from lorsbench.method_sources import DEFAULT_REPORT_ORDER, report_orders

    return report_orders(), DEFAULT_REPORT_ORDER


def method_rank(method: Any) -> tuple[int, str]:
    """Sort key of a method's table rows: its `Method.report_order`, then its name."""
    orders, default = _method_order()
    name = str(method)
    return orders.get(name, default), name


def _add_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """`variant` (hyper-parameters that differ between runs of one method), `label` (the table row) and
    `block` (the table group: pruner . pattern . sparsity, plus model / suite / regime where those vary)."""
    runs = runs.copy()
    keys = [c for c in runs.columns if c.startswith("method.")] + [k for k in VARIANT_KEYS if k in runs.columns]
    runs["variant"] = ""
    for _, group in runs.groupby(["method", "regime"], dropna=False):
        ok = group[group["status"] == "success"]
        varying = [k for k in keys if ok[k].dropna().astype(str).nunique() > 1]
        for idx in group.index:
            parts = [f"{k.removeprefix('method.')}={runs.at[idx, k]}" for k in varying
                     if not is_missing(runs.at[idx, k])]
            runs.at[idx, "variant"] = ", ".join(parts)

    def label(row: pd.Series) -> str:
        name = str(row["method"]) if not is_missing(row["method"]) else "?"
        if row["variant"]:
            name += f" ({row['variant']})"
        if row["pruner"] == "none":
            return "dense" if row["method"] == "none" else f"dense + {name}"
        return "pruned only" if row["method"] == "none" else name

    many = {k: runs[k].dropna().nunique() > 1 for k in ("model", "eval_suite")}

    def block(row: pd.Series) -> str:
        if row["pruner"] == "none":
            parts = ["dense"]
        else:
            sparsity = row["target_sparsity"]
            parts = [str(row["pruner"]), str(row["pattern"]),
                     "?" if is_missing(sparsity) else f"{100 * float(sparsity):g}%"]
        parts += [str(row[k]) for k in ("model", "eval_suite") if many[k] and not is_missing(row[k])]
        if row.get("weights") == "random":
            parts.append("random weights")
        if row["regime"] != "full":
            parts.append(str(row["regime"]))
        return " · ".join(parts)

    runs["label"] = runs.apply(label, axis=1) if len(runs) else ""
    runs["block"] = runs.apply(block, axis=1) if len(runs) else ""
    return runs


def _integer_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns whose values are all ints (bools excluded): kept as nullable Int64, not floats, when some are missing."""
    seen: dict[str, bool] = {}
    for row in rows:
        for key, value in row.items():
            if not is_missing(value):
                seen[key] = seen.get(key, True) and isinstance(value, int) and not isinstance(value, bool)
    return [key for key, ok in seen.items() if ok]


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    runs = pd.DataFrame(rows)
    for column in _integer_columns(rows):
        runs[column] = runs[column].astype("Int64")
    for column in IDENTITY + FACTORS:
        if column not in runs.columns:
            runs[column] = None
    runs = _add_labels(runs)
    ordered = [c for c in WIDE_ORDER if c in runs.columns]
    prefixed = sorted(c for c in runs.columns if "." in c and c not in ordered)
    rest = sorted(c for c in runs.columns if c not in ordered and c not in prefixed)
    runs = runs[ordered + rest + prefixed]
    order = runs.assign(_m=runs["method"].map(method_rank)).sort_values(["block", "_m", "label", "seed", "run_dir"],
                                                                       na_position="last", kind="stable")
    return order.drop(columns="_m").reset_index(drop=True)


def long_frame(runs: pd.DataFrame, tasks_by_run: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Tidy metrics: per-task accuracy (acc, acc_norm with stderr and n) and run-level scalars (task 'all')."""
    out: list[dict[str, Any]] = []
    for _, run in runs.iterrows():
        keys = {k: run.get(k) for k in LONG_KEYS}
        if run.get("weights") != "random":
            for task, scores in sorted((tasks_by_run.get(run["run_dir"]) or {}).items()):
                for metric in TASK_METRICS:
                    value = (scores or {}).get(metric)
                    if not is_missing(value):
                        out.append({**keys, "task": task, "metric": metric, "value": float(value),
                                    "stderr": scores.get(f"{metric}_stderr"), "n": scores.get("n")})
        for metric in RUN_METRICS:
            value = run.get(metric)
            if not is_missing(value):
                out.append({**keys, "task": ALL_TASKS, "metric": metric, "value": float(value),
                            "stderr": None, "n": None})
    long = pd.DataFrame(out, columns=list(LONG_COLUMNS))
    for column in ("seed", "n"):
        try:
            long[column] = long[column].astype("Int64")
        except (TypeError, ValueError):  # not all integral: keep as read
            pass
    return long


def collect(paths: Iterable[str | Path]) -> Collected:
    """Every run under `paths` -> Collected(runs, long). Raises ReportError (one line) on bad input."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ReportError("give at least one run or sweep folder")
    found, orphans = _find(paths)
    if not found:
        extra = f" ({len(orphans)} Hydra job folders without one: jobs that died early)" if orphans else ""
        raise ReportError(f"no {RECORD_FILE} found under {', '.join(paths)}{extra}")
    rows, tasks_by_run, folders = [], {}, {}
    for base, file in found:
        record = _read(file)
        record = _from_config(record) if record["status"] != "invalid" else record
        run_dir = os.path.relpath(file.parent, base)
        rows.append(_flatten(record, run_dir))
        tasks_by_run[run_dir] = record.get("tasks") if isinstance(record.get("tasks"), dict) else {}
        folders[run_dir] = file.parent
    for base, job in orphans:
        rows.append(_flatten(_from_config(_orphan_record(job)), os.path.relpath(job, base)))
    runs = runs_frame(rows)
    return Collected(runs=runs, long=long_frame(runs, tasks_by_run), inputs=tuple(paths), folders=folders)
