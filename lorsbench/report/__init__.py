"""Comparison reports: run records -> `runs.csv`, `metrics_long.csv`, `report.md`, `report.html` and PNG plots.

    python -m lorsbench.report results/raw/sweeps/<stamp> [more folders...] --name main_table [--reference lora,none]

Needs pandas, matplotlib and scipy only (no torch): it runs wherever the run folders are copied to. Paired
comparisons on the runs' per-example files: `paired.py`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from lorsbench.records import write_text_atomic
from lorsbench.report import paired as paired_stats
from lorsbench.report import tables
from lorsbench.report.collect import Collected, ReportError, collect
from lorsbench.report.document import Document, Figure, Section, to_markdown
from lorsbench.report.html import to_html
from lorsbench.report.paired import StatsOptions
from lorsbench.report.plots import PLOTS, to_png
from lorsbench.report.stats import MIN_RESAMPLES

__all__ = ["Collected", "ReportError", "StatsOptions", "build_document", "collect", "write_report"]

OUTPUT_FILES = ("runs.csv", "metrics_long.csv", "paired.csv", "report.md", "report.html")


def _summary(data: Collected) -> list:
    runs = data.runs
    counts = runs["status"].value_counts()
    text = [f"{len(runs)} runs from {', '.join(Path(p).name or p for p in data.inputs)}: "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "."]
    notes = []
    limited = runs[runs["regime"] != "full"]
    if len(limited):
        notes.append(f"**{len(limited)} smoke/limit run(s)** (blocks marked `smoke` or `limit=N`): "
                     "not results, never averaged with full runs.")
    random = int((runs["weights"] == "random").sum()) if "weights" in runs else 0
    if random:
        notes.append(f"{random} random-weight run(s): efficiency only, no accuracy.")
    ok = runs[runs["status"] == "success"]
    dup = ok.groupby(["block", "label", "seed"], dropna=False).size()
    if (dup > 1).any():
        notes.append("**Repeated runs** of one configuration and seed (counted separately in n): "
                     + "; ".join(f"{b} / {lab} / seed {s}" for (b, lab, s) in dup[dup > 1].index) + ".")
    text += notes
    text.append("Accuracy: lm-eval `acc` in %, mean ± std (ddof=1) over the n runs (seeds) of a row; the mean column "
                "averages each run's tasks first (equal weight). `mean acc_norm` beside it averages lm-eval `acc_norm` "
                "over the tasks that record it. Perplexity on held-out text (lower is better).")
    return text + [tables.overview_table(runs)]


def build_document(data: Collected, name: str, paired: paired_stats.Paired) -> Document:
    figures = []
    for stem, (draw, caption) in PLOTS.items():
        fig = draw(data.long)
        if fig is not None:
            figures.append(Figure(f"{stem}.png", caption, to_png(fig)))
    return Document(f"lorsbench report: {name}", [
        Section("Summary", _summary(data)),
        Section("Failed and incomplete runs", tables.failure_table(data.runs)),
        Section("Accuracy", tables.accuracy_tables(data.runs, paired_stats.marks(paired))
                + paired_stats.legend(paired)),
        Section("Paired comparisons", paired_stats.section(paired)),
        Section("Cost", tables.cost_tables(data.runs)),
        Section("Sparsity", tables.sparsity_tables(data.runs)),
        Section("Plots", figures or ["Nothing to plot (no successful run with the needed metrics)."]),
        Section("Provenance", [tables.provenance_table(data.runs)]),
    ])


def write_report(paths: Iterable[str | Path], name: str, out: str | Path = "results/reports",
                 stats: StatsOptions | None = None) -> Path:
    """Collect the runs under `paths` and write the report files into `out/name/`; returns that folder."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ReportError(f"--name must be a plain folder name (letters, digits, . _ -), got {name!r}")
    stats = stats or StatsOptions()
    if stats.resamples < MIN_RESAMPLES:
        raise ReportError(f"--resamples must be at least {MIN_RESAMPLES}, got {stats.resamples}")
    data = collect(paths)
    paired = paired_stats.compare(data, stats)
    doc = build_document(data, name, paired)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    for stem in PLOTS:
        (folder / f"{stem}.png").unlink(missing_ok=True)
    write_text_atomic(folder / "runs.csv", data.runs.to_csv(index=False))
    write_text_atomic(folder / "metrics_long.csv", data.long.to_csv(index=False))
    write_text_atomic(folder / "paired.csv", paired_stats.frame(paired).to_csv(index=False))
    for section in doc.sections:
        for item in section.items:
            if isinstance(item, Figure):
                (folder / item.file).write_bytes(item.png)
    write_text_atomic(folder / "report.md", to_markdown(doc))
    write_text_atomic(folder / "report.html", to_html(doc))
    return folder
