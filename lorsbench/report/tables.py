"""The report's tables from the wide `runs` frame: accuracy (papers' layout), cost, sparsity, failures, provenance.

Seeds are aggregated here: mean ± std (sample std, ddof=1) over the runs of one row, with n shown.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lorsbench.report.collect import is_missing, method_rank
from lorsbench.report.document import Table

MEMORY_COLUMNS = {"peak_alloc_gib_train": "peak alloc GiB (train)",
                  "peak_reserved_gib_train": "peak reserved GiB (train)", "peak_rss_gib_train": "peak RSS GiB (train)"}
COST_COLUMNS = {"trainable_params": "trainable params", **MEMORY_COLUMNS, "step_ms_median": "step ms (median)",
                "step_ms_p90": "step ms (p90)", "tokens_per_s": "tokens/s"}
STATUS_TEXT = {"failed": "**FAILED**", "oom": "**OOM**", "running": "**incomplete** (status running)",
               "no_record": "**no record**", "interrupted": "**interrupted**", "stale": "**stale (killed?)**",
               "invalid": "**invalid record**"}


def fmt_stats(values: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    """'m' for one value, 'm ± s' for several, '—' for none."""
    v = pd.to_numeric(values, errors="coerce").dropna() * scale
    if v.empty:
        return "—"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def fmt_count(value: float) -> str:
    if is_missing(value):
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def fmt_bool(values: pd.Series) -> str:
    v = values.dropna().astype(bool)
    if v.empty:
        return "n/a"
    if v.all():
        return "yes"
    return "**NO**" if not v.any() else f"**NO** ({int((~v).sum())}/{len(v)})"


def _label_order(rows: pd.DataFrame) -> list[str]:
    first = rows.drop_duplicates("label")
    key = {r.label: (r.pruner != "none", method_rank(r.method), r.label) for r in first.itertuples()}
    return sorted(key, key=key.get)


def _same(a: Any, b: Any) -> bool:
    return (is_missing(a) and is_missing(b)) or a == b


def _blocks(rows: pd.DataFrame, keys: tuple[str, ...] = ("block",)) -> list[tuple[str, pd.DataFrame]]:
    out = []
    for values, group in rows.groupby(list(keys), sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((" · ".join(str(v) for v in values if not is_missing(v)), group))
    return out


def accuracy_tables(runs: pd.DataFrame, marks: dict[tuple[str, str, str], str] | None = None) -> list[str | Table]:
    """Rows = method (dense and pruned-only first), columns = tasks + mean acc + perplexity, one table per
    pruner · pattern · sparsity block; the dense runs of the same model/suite/regime head every block.
    `marks` (block, label, column) -> symbols appended to a cell (the paired comparisons that survive BH)."""
    acc = runs[runs["has_accuracy"] == True]  # noqa: E712 - a column of bools / NaN
    if acc.empty:
        return ["No run with accuracy (successful, pretrained weights, tasks evaluated)."]
    dense, pruned = acc[acc["pruner"] == "none"], acc[acc["pruner"] != "none"]
    items: list[str | Table] = []
    blocks = _blocks(pruned) if not pruned.empty else _blocks(dense)
    for title, group in blocks:
        head = group.iloc[0]
        ref = dense[[all(_same(r[k], head[k]) for k in ("model", "eval_suite", "regime", "weights"))
                     for _, r in dense.iterrows()]] if not pruned.empty else dense.iloc[0:0]
        block_marks = {(lab, col): m for (b, lab, col), m in (marks or {}).items() if b == title}
        items += [f"**{title}**", _accuracy_table(pd.concat([ref, group]), block_marks)]
    return items


def _accuracy_table(rows: pd.DataFrame, marks: dict[tuple[str, str], str]) -> Table:
    tasks = sorted(c for c in rows.columns if c.startswith("acc.") and rows[c].notna().any())
    metrics = [(c, c.removeprefix("acc."), 100.0, max) for c in tasks] + [("mean_acc", "mean", 100.0, max)]
    if "perplexity" in rows and rows["perplexity"].notna().any():
        metrics.append(("perplexity", "perplexity", 1.0, min))
    if "mean_acc_norm" in rows and rows["mean_acc_norm"].notna().any():
        metrics.append(("mean_acc_norm", "mean acc_norm", 100.0, max))
    labels = _label_order(rows)
    by_label = {label: rows[rows["label"] == label] for label in labels}
    best = {}
    contenders = [lab for lab in labels if (by_label[lab]["pruner"] != "none").all()]
    for column, _, _, pick in metrics:
        means = {lab: by_label[lab][column].astype(float).mean() for lab in contenders}
        means = {k: v for k, v in means.items() if not math.isnan(v)}
        if len(means) > 1:
            best[column] = pick(means, key=means.get)
    table_rows = []
    for label in labels:
        sub = by_label[label]
        cells = [label, str(len(sub))]
        for column, _, scale, _ in metrics:
            text = fmt_stats(sub[column], scale)
            text = f"**{text}**" if best.get(column) == label else text
            cells.append(text + marks.get((label, column), ""))
        table_rows.append(cells)
    return Table(["method", "n"] + [name for _, name, _, _ in metrics], table_rows)


def _reference(group: pd.DataFrame, row: pd.Series) -> pd.DataFrame | None:
    """The lora runs a row's costs are divided by: the block's single lora row, else lora at the same rank."""
    lora = group[group["method"] == "lora"]
    if lora["label"].nunique() == 1:
        return lora
    if "method.rank" in group and not is_missing(row.get("method.rank")):
        same = lora[lora["method.rank"] == row["method.rank"]]
        return same if same["label"].nunique() == 1 else None
    return None


def cost_tables(runs: pd.DataFrame) -> list[str | Table]:
    """Trainable params, train-phase peak memory, step time and throughput; each also as a ratio to lora."""
    ok = runs[runs["status"] == "success"]
    present = [c for c in COST_COLUMNS if c in ok.columns]
    ok = ok[ok[present].notna().any(axis=1)] if present else ok.iloc[0:0]
    if ok.empty:
        return ["No successful run with cost measurements."]
    items: list[str | Table] = []
    for title, group in _blocks(ok, ("block", "device_name", "dtype")):
        columns = [c for c in present if group[c].notna().any()]
        kinds = [MEMORY_COLUMNS[c] for c in columns if c in MEMORY_COLUMNS]
        table_rows = []
        for label in _label_order(group):
            sub = group[group["label"] == label]
            ref = _reference(group, sub.iloc[0])
            cells = [label, str(len(sub))]
            for column in columns:
                value = sub[column].astype(float).mean()
                text = fmt_count(value) if column == "trainable_params" else _num(value)
                if ref is not None and not sub["method"].isin(["lora", "none"]).all():  # none trains nothing
                    base = ref[column].astype(float).mean()
                    if not is_missing(value) and not is_missing(base) and base != 0:
                        text += f" ({value / base:.2f}×)"
                cells.append(text)
            table_rows.append(cells)
        memory = "; ".join(kinds) if kinds else "no memory measurement"
        items += [f"**{title}** — memory: {memory}",
                  Table(["method", "n"] + [COST_COLUMNS[c] for c in columns], table_rows)]
    items.append("Means over the runs of a row. (x×) = ratio to the `lora` row of the same block (at equal rank "
                 "where there are several). GPU memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` "
                 "in the train phase; CPU memory: the process's peak RSS (high-water mark) during the train phase.")
    return items


def _num(value: float) -> str:
    if is_missing(value):
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _column(rows: pd.DataFrame, column: str) -> pd.Series:
    return rows[column] if column in rows else pd.Series(dtype=float)


def _sparsity_row(label: str, sub: pd.DataFrame) -> list[str]:
    merged = [_column(sub, c).dropna().astype(bool) for c in ("mask_preserved_after_merge", "nm_valid_after_merge")]
    declared = _column(sub, "preserves_sparsity").dropna().astype(bool)
    if any((~m).any() for m in merged):
        verdict = "✗ **sparsity lost**" + (" (declared preserving!)" if declared.any() else "")
    else:
        verdict = "✓ kept" if any(len(m) for m in merged) else "?"
    percents = [fmt_stats(_column(sub, c), 100.0) for c in ("target_sparsity", "sparsity_after_prune",
                                                             "sparsity_after_train", "sparsity_after_merge")]
    return [label, str(len(sub)), fmt_bool(declared).replace("**", ""), *percents,
            fmt_bool(_column(sub, "nm_valid_after_merge")), fmt_bool(_column(sub, "mask_preserved_after_merge")),
            verdict]


def sparsity_tables(runs: pd.DataFrame) -> list[str | Table]:
    """Sparsity after prune/train/merge, N:M validity and mask preservation after merge; lost sparsity is marked."""
    ok = runs[(runs["status"] == "success") & (runs["pruner"] != "none")]
    if ok.empty:
        return ["No successful pruned run."]
    items: list[str | Table] = []
    for title, group in _blocks(ok):
        rows = [_sparsity_row(label, group[group["label"] == label]) for label in _label_order(group)]
        items += [f"**{title}**", Table(["method", "n", "declared preserving", "target %", "after prune %",
                                         "after train %", "after merge %", "N:M valid (merged)",
                                         "mask preserved (merged)", "verdict"], rows)]
    items.append("Sparsity = fraction of exact zeros over the target linears. Mask preserved: every weight the "
                 "stored mask pruned is still zero in the merged model. N:M valid: every group of M has at most N "
                 "non-zeros (n/a for unstructured).")
    return items


def failure_table(runs: pd.DataFrame) -> list[str | Table]:
    bad = runs[runs["status"] != "success"]
    if bad.empty:
        return ["None: every run succeeded."]
    rows = []
    for _, r in bad.iterrows():
        error = "" if is_missing(r.get("error")) else str(r["error"]).strip().splitlines()[0]
        if len(error) > 240:
            error = error[:237] + "..."
        phase = r.get("phase_failed")
        rows.append([f"`{r['run_dir']}`", STATUS_TEXT.get(r["status"], f"**{r['status']}**"),
                     "" if is_missing(phase) else str(phase), error])
    return [Table(["run", "status", "phase", "error"], rows)]


def overview_table(runs: pd.DataFrame) -> Table:
    """Runs per block and status (every run is counted here, whatever its status)."""
    statuses = [s for s in ("success", "failed", "oom", "running", "no_record") if (runs["status"] == s).any()]
    statuses += sorted(set(runs["status"].dropna()) - set(statuses))
    rows = []
    for title, group in _blocks(runs):
        seeds = sorted({int(s) for s in group["seed"].dropna()})
        rows.append([title, str(len(group))] + [str(int((group["status"] == s).sum())) for s in statuses]
                    + [",".join(map(str, seeds))])
    return Table(["block", "runs"] + statuses + ["seeds"], rows)


def _counts(values: pd.Series) -> str:
    counts = values.dropna().astype(str).value_counts()
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "—"


def provenance_table(runs: pd.DataFrame) -> Table:
    started = runs["started_at"].dropna().astype(str) if "started_at" in runs else pd.Series(dtype=str)
    finished = runs["finished_at"].dropna().astype(str) if "finished_at" in runs else pd.Series(dtype=str)
    span = f"{started.min()} … {finished.max() if not finished.empty else '?'}" if not started.empty else "—"
    rows = [["runs", f"{len(runs)}: {_counts(runs['status'])}"], ["dates (UTC)", span]]
    if "git_sha" in runs:
        sha = runs["git_sha"].dropna().astype(str).str[:10]
        dirty = int(runs["git_dirty"].fillna(False).astype(bool).sum()) if "git_dirty" in runs else 0
        rows.append(["git sha", _counts(sha) + (f"; {dirty} run(s) from a dirty tree" if dirty else "")])
    for column, name in (("model", "models"), ("weights", "weights"), ("device_name", "devices"),
                         ("dtype", "dtypes"), ("eval_suite", "eval suites"), ("regime", "regimes")):
        if column in runs:
            rows.append([name, _counts(runs[column])])
    for column in sorted(c for c in runs.columns if c.startswith("version.")):
        rows.append([column.removeprefix("version."), _counts(runs[column])])
    return Table(["", "value"], rows)
