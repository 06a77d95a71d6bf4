"""The report's plots, drawn from the tidy `metrics_long` table alone (so a notebook can redraw them from the CSV).

Object-oriented matplotlib (`matplotlib.figure.Figure`, rendered by the Agg canvas): no pyplot, no global backend
state, nothing needs a display. Each function returns a Figure, or None when the runs hold nothing to plot.
"""
from __future__ import annotations

import io
import itertools

import pandas as pd
from matplotlib.figure import Figure

from lorsbench.report.collect import ALL_TASKS, LONG_KEYS, method_rank

MEMORY_METRICS = {"peak_alloc_gib_train": "GPU peak allocated", "peak_rss_gib_train": "CPU peak RSS"}


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def per_run(long: pd.DataFrame) -> pd.DataFrame:
    """Successful runs, one row each: the long table's factor columns plus one column per run-level metric."""
    long = long[long["status"] == "success"]
    if long.empty:
        return pd.DataFrame(columns=list(LONG_KEYS))
    keys = long.drop_duplicates("run_dir").set_index("run_dir")[[k for k in LONG_KEYS if k != "run_dir"]]
    keys = keys.copy()
    keys["variant"] = keys["variant"].astype(object).fillna("")
    for column in ("target_sparsity", "seed"):
        keys[column] = pd.to_numeric(keys[column], errors="coerce")
    for column in ("model", "weights", "device_name", "eval_suite", "pruner", "pattern", "method", "label", "block"):
        keys[column] = keys[column].map(lambda v: "?" if v is None or v != v else str(v))  # v != v: NaN
    level = long[long["task"] == ALL_TASKS]
    values = level.pivot_table(index="run_dir", columns="metric", values="value", aggfunc="first")
    return keys.join(values).reset_index()


def _colors(labels) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _ordered_labels(runs: pd.DataFrame) -> list[str]:
    first = runs.drop_duplicates("label")
    return sorted(first["label"], key=lambda lab: (
        first.loc[first["label"] == lab, "pruner"].iloc[0] != "none",
        method_rank(first.loc[first["label"] == lab, "method"].iloc[0]), lab))


def _context(runs: pd.DataFrame, with_pruner: bool, columns: tuple[str, ...] = ("model", "regime")) -> pd.Series:
    """Facet names: model / regime (/ ...) only where they vary, plus the pruner when asked."""
    parts = []
    for column in columns:
        if runs[column].nunique() > 1:
            parts.append(runs[column])
    if with_pruner:
        parts.append(runs["pruner"])
    if not parts:
        return pd.Series("", index=runs.index)
    out = parts[0]
    for part in parts[1:]:
        out = out + " · " + part
    return out


def accuracy_vs_sparsity(long: pd.DataFrame) -> Figure | None:
    """Mean accuracy (%) vs target sparsity, a line per method and pattern, a panel per pruner; dense dashed."""
    runs = per_run(long)
    if "mean_acc" not in runs or runs["mean_acc"].notna().sum() == 0:
        return None
    runs = runs[runs["mean_acc"].notna()].copy()
    runs["facet"] = _context(runs, with_pruner=False)
    pruned = runs[runs["pruner"] != "none"]
    if pruned.empty:
        return None
    pruned = pruned.assign(facet=(pruned["facet"] + " · " + pruned["pruner"]).str.strip(" ·"))
    facets = list(dict.fromkeys(pruned["facet"]))
    colors = _colors(_ordered_labels(runs))
    fig = Figure(layout="constrained", figsize=(5.2 * len(facets), 4.0))
    axes = fig.subplots(1, len(facets), squeeze=False)[0]
    for ax, facet in zip(axes, facets, strict=True):
        panel = pruned[pruned["facet"] == facet]
        for (label, pattern), group in panel.groupby(["label", "pattern"], sort=False):
            stats = group.groupby("target_sparsity")["mean_acc"].agg(["mean", "std"]).sort_index() * 100
            nm = pattern != "unstructured"
            ax.errorbar(stats.index * 100, stats["mean"], yerr=stats["std"].fillna(0), color=colors[label],
                        marker="s" if nm else "o", linestyle="--" if nm else "-", capsize=3,
                        label=f"{label} ({pattern})" if nm else label)
        context = runs.loc[panel.index[0], "facet"]
        dense = runs[(runs["pruner"] == "none") & (runs["facet"] == context)]
        for label, group in dense.groupby("label", sort=False):
            ax.axhline(group["mean_acc"].mean() * 100, color=colors[label], linestyle=":", label=label)
        ax.set(title=facet, xlabel="target sparsity (%)", ylabel="mean accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _memory_metric(runs: pd.DataFrame) -> tuple[str | None, str]:
    if "peak_mem_gib_train" not in runs or runs.empty:
        return None, ""
    for metric, name in MEMORY_METRICS.items():
        if metric in runs and runs[metric].notna().any():
            name = name if runs["peak_mem_gib_train"].notna().sum() == runs[metric].notna().sum() else \
                "peak memory (GPU alloc or CPU RSS)"
            return "peak_mem_gib_train", f"{name}, train (GiB)"
    return None, ""


def cost_per_method(long: pd.DataFrame) -> Figure | None:
    """Train-phase peak memory and median step time per method (bars: mean over runs, whiskers: std)."""
    runs = per_run(long)
    memory, memory_name = _memory_metric(runs)
    panels = [(m, n) for m, n in ((memory, memory_name), ("step_ms_median", "median step time (ms)"))
              if m is not None and m in runs and runs[m].notna().any()]
    if not panels:
        return None
    runs = runs[runs[[m for m, _ in panels]].notna().any(axis=1)].copy()
    runs["hue"] = runs["model"] + " · " + runs["device_name"]
    labels, hues = _ordered_labels(runs), list(dict.fromkeys(runs["hue"]))
    colors = _colors(hues)
    height = 0.8 / len(hues)
    fig = Figure(layout="constrained", figsize=(6.0 * len(panels), 0.45 * len(labels) * max(1, len(hues) * 0.6) + 1.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, name) in zip(axes, panels, strict=True):
        for j, hue in enumerate(hues):
            stats = runs[runs["hue"] == hue].groupby("label")[metric].agg(["mean", "std"]).reindex(labels)
            positions = [i + (j - (len(hues) - 1) / 2) * height for i in range(len(labels))]
            ax.barh(positions, stats["mean"], xerr=stats["std"].fillna(0), height=height, color=colors[hue],
                    label=hue, capsize=2)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set(xlabel=name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points that no other point beats on both lower `x` and higher `y`, by increasing x."""
    ordered = points.sort_values([x, y], ascending=[True, False])
    front, best = [], float("-inf")
    for idx, row in ordered.iterrows():
        if row[y] > best:
            front.append(idx)
            best = row[y]
    return ordered.loc[front]


def accuracy_vs_memory(long: pd.DataFrame) -> Figure | None:
    """Mean accuracy vs train-phase peak memory, one point per method row of each block, with the Pareto front
    of the fine-tuned rows (dense and pruned-only train nothing: hollow reference markers, not on the front).
    Colour = method row, marker = block, each named once in the legend (no per-point labels to overlap)."""
    from matplotlib.lines import Line2D

    runs = per_run(long)
    if "mean_acc" not in runs or "peak_mem_gib_train" not in runs:
        return None
    runs = runs[runs["peak_mem_gib_train"].notna() & runs["mean_acc"].notna()].copy()
    memory, memory_name = _memory_metric(runs)
    if memory is None:
        return None
    points = runs.groupby(["block", "label"], sort=False).agg(
        memory=(memory, "mean"), acc=("mean_acc", "mean"), method=("method", "first"), model=("model", "first"),
        regime=("regime", "first"), device_name=("device_name", "first")).reset_index()
    points["acc"] *= 100
    points["facet"] = _context(points, with_pruner=False, columns=("model", "regime", "device_name"))
    facets = list(dict.fromkeys(points["facet"]))
    labels = _ordered_labels(runs)
    colors = _colors(labels)
    markers = dict(zip(dict.fromkeys(points["block"]), itertools.cycle("osD^vP*Xh<>p")))
    fig = Figure(layout="constrained", figsize=(7.5 * len(facets), 4.5))
    axes = fig.subplots(1, len(facets), squeeze=False)[0]
    for ax, facet in zip(axes, facets, strict=True):
        panel = points[points["facet"] == facet]
        tuned = panel[panel["method"] != "none"]
        for _, p in panel.iterrows():
            reference = p["method"] == "none"
            ax.scatter(p["memory"], p["acc"], s=36, zorder=3, marker=markers[p["block"]],
                       color="none" if reference else colors[p["label"]], edgecolors=colors[p["label"]])
        handles = [Line2D([], [], linestyle="", marker="o", color=colors[label], label=label,
                          markerfacecolor="none" if (panel.loc[panel["label"] == label, "method"] == "none").all()
                          else colors[label])
                   for label in labels if label in set(panel["label"])]
        handles += [Line2D([], [], linestyle="", marker=markers[block], color="dimgray", markerfacecolor="none",
                           label=block) for block in dict.fromkeys(panel["block"])]
        if not tuned.empty:
            front = pareto_front(tuned, "memory", "acc")
            handles += ax.plot(front["memory"], front["acc"], color="black", alpha=0.5, drawstyle="steps-post",
                               marker="o", markersize=9, markerfacecolor="none",
                               label="Pareto front (fine-tuned rows)")
        ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.set(title=facet or "accuracy vs memory", xlabel=memory_name, ylabel="mean accuracy (%)")
        ax.grid(alpha=0.3)
    return fig


def task_heatmap(long: pd.DataFrame) -> Figure | None:
    """Accuracy (%) per task (columns) for every block · method row (mean over seeds)."""
    acc = long[(long["status"] == "success") & (long["metric"] == "acc") & (long["task"] != ALL_TASKS)]
    if acc.empty:
        return None
    acc = acc.assign(row=acc["block"].astype(str) + " | " + acc["label"].astype(str))
    table = acc.pivot_table(index="row", columns="task", values="value", aggfunc="mean") * 100
    table = table.reindex(list(dict.fromkeys(acc["row"])))
    fig = Figure(layout="constrained", figsize=(1.0 + 1.1 * table.shape[1] + 2.5, 0.35 * table.shape[0] + 1.8))
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
    middle = (table.max().max() + table.min().min()) / 2
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            value = table.iat[i, j]
            if pd.notna(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6,
                        color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig


PLOTS = {
    "accuracy_vs_sparsity": (accuracy_vs_sparsity, "Mean accuracy vs target sparsity per method (dense: dotted)."),
    "cost_per_method": (cost_per_method, "Train-phase peak memory and median step time per method."),
    "accuracy_vs_memory": (accuracy_vs_memory, "Mean accuracy vs train-phase peak memory, with the Pareto front."),
    "task_heatmap": (task_heatmap, "Accuracy per task for every method row (mean over seeds)."),
}
