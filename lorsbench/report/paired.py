"""Paired comparisons for the report: each method row vs each chosen reference row of its block, same documents.

References (`--reference`, default `lora,none`): `none` = the block's pruned-only row, `dense` = the dense row of the
same model / suite / regime, any other name = that method's row in the block. Per comparison: per-task McNemar
(one seed a side) or two-level bootstrap p, the suite-mean `acc` difference with a paired bootstrap CI, `acc_norm`
beside it, the perplexity difference over the same windows, and the minimum detectable effect; p-values are
Benjamini-Hochberg adjusted over every test in the report. Statistics: `stats.py`; files: `samples.py`; how to
read it: README, "Reading a report".
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lorsbench.report.collect import Collected, ReportError, is_missing
from lorsbench.report.document import Table
from lorsbench.report.samples import (PairingError, RunSamples, common_tasks, common_windows, load_run,
                                      per_example_state, stack)
from lorsbench.report.stats import (DEFAULT_RESAMPLES, McNemar, PairedDifference, PerplexityDifference,
                                    benjamini_hochberg, mcnemar_exact, mde_from_se, mde_paired, paired_bootstrap,
                                    paired_perplexity)

DEFAULT_REFERENCES = ("lora", "none")
SYMBOLS = ("†", "‡", "§", "¶")  # one per reference, in the order given
FDR_Q = 0.05  # BH level; also the two-sided alpha of the MDE
POWER = 0.8
REFERENCE_NAMES = {"none": "pruned only", "dense": "dense"}
PAIRED_COLUMNS = ("block", "method", "reference", "seeds_method", "seeds_reference", "task", "docs", "diff_acc_pts",
                  "ci_low_acc_pts", "ci_high_acc_pts", "p", "p_bh", "test", "gains", "losses", "diff_acc_norm_pts",
                  "ci_low_acc_norm_pts", "ci_high_acc_norm_pts", "acc_norm_tasks", "delta_ppl", "ci_low_delta_ppl",
                  "ci_high_delta_ppl", "ratio_ppl", "mde_pts", "mde_with_seeds_pts", "resamples", "bootstrap_seed")


@dataclass(frozen=True)
class StatsOptions:
    references: tuple[str, ...] = DEFAULT_REFERENCES
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    explicit: bool = False  # given by the user: each reference must name a row of the report


@dataclass
class Comparison:
    block: str
    label: str
    reference: str  # the --reference token
    reference_label: str
    seeds: tuple[int, int]  # runs with per-example data: method, reference
    tasks: list[str]
    n_docs: list[int]
    mcnemar: list[McNemar | None]  # per task; None when a side has several seeds
    task_p: list[float]
    acc: PairedDifference
    acc_norm: PairedDifference | None
    acc_norm_tasks: list[str]
    perplexity: PerplexityDifference | None
    perplexity_note: str
    mde: float  # from the discordance: document sampling only
    mde_with_seeds: float | None  # from the two-level bootstrap SE, when a side has several seeds
    task_p_adjusted: list[float] = field(default_factory=list)
    p_adjusted: float = math.nan


@dataclass
class Paired:
    options: StatsOptions
    comparisons: list[Comparison]
    skipped: list[tuple[str, str, str, str]]  # block, method label, reference, why not paired
    without_samples: list[tuple[str, str]]  # run_dir, why it has no per-example data
    tests: int = 0  # size of the BH family


def parse_references(text: str | None) -> tuple[str, ...]:
    """'lora,none' -> ('lora', 'none'); ReportError on an empty, repeated or over-long list."""
    if text is None:
        return DEFAULT_REFERENCES
    refs = tuple(t.strip() for t in text.split(","))
    if not refs or any(not t for t in refs) or len(set(refs)) != len(refs) or len(refs) > len(SYMBOLS):
        raise ReportError(f"--reference must list 1 to {len(SYMBOLS)} distinct names separated by commas "
                          f"(dense, none = pruned only, or a method such as lora), got {text!r}")
    return refs


def _eligible(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[(runs["has_accuracy"] == True) & (runs["regime"] != "smoke")]  # noqa: E712 - bools / NaN
    return ok[ok["weights"] != "random"] if "weights" in ok else ok


def _check_references(runs: pd.DataFrame, options: StatsOptions) -> None:
    if not options.explicit:
        return
    methods = sorted({str(m) for m in runs["method"].dropna()} - {"none"})
    valid = ["dense", "none"] + methods
    for ref in options.references:
        present = ((runs["pruner"] == "none") & (runs["method"] == "none")).any() if ref == "dense" else \
            ((runs["pruner"] != "none") & (runs["method"] == ref)).any()
        if not present:
            raise ReportError(f"--reference {ref!r}: no successful run with accuracy for it; valid here: "
                              f"{', '.join(valid)}")


def _reference_rows(block: pd.DataFrame, dense: pd.DataFrame, ref: str) -> pd.DataFrame:
    if ref == "dense":
        head = block.iloc[0]
        keys = [k for k in ("model", "eval_suite", "regime", "weights") if k in dense]
        same = [all((is_missing(r[k]) and is_missing(head[k])) or r[k] == head[k] for k in keys)
                for _, r in dense.iterrows()]
        return dense[same] if len(dense) else dense
    return block[block["method"] == ref]


def _rng(options: StatsOptions, key: str) -> np.random.Generator:
    """One generator per comparison, so a comparison's numbers do not depend on what else is in the report."""
    return np.random.default_rng([options.seed, zlib.crc32(key.encode())])


def _compare(block: str, label: str, ref: str, ref_label: str, method: list[RunSamples],
             reference: list[RunSamples], options: StatsOptions) -> Comparison:
    tasks = common_tasks(method + reference)
    if not tasks:
        raise PairingError("no tasks in the per-example files")
    rng = _rng(options, f"{block}|{label}|{ref}")
    a = [stack(method, t, "acc") for t in tasks]
    b = [stack(reference, t, "acc") for t in tasks]
    single = len(method) == 1 and len(reference) == 1
    acc = paired_bootstrap(a, b, options.resamples, rng)
    tests = [mcnemar_exact(x[0], y[0]) if single else None for x, y in zip(a, b)]
    task_p = [t.p_value for t in tests] if single else list(acc.task_p_values)
    norm_pairs = [(t, stack(method, t, "acc_norm"), stack(reference, t, "acc_norm")) for t in tasks]
    norm_pairs = [(t, x, y) for t, x, y in norm_pairs if x is not None and y is not None]
    acc_norm = paired_bootstrap([x for _, x, _ in norm_pairs], [y for _, _, y in norm_pairs], options.resamples,
                                rng) if norm_pairs else None
    # Discordant fraction averaged over every (method seed, reference seed) pair.
    discordance = [float(np.mean(x.mean(0) * (1 - y.mean(0)) + (1 - x.mean(0)) * y.mean(0))) for x, y in zip(a, b)]
    n_docs = [x.shape[1] for x in a]
    ppl, note = None, ""
    try:
        nll, tokens = common_windows(method + reference)
        ppl = paired_perplexity(nll[:len(method)], nll[len(method):], tokens, options.resamples, rng)
    except PairingError as exc:
        note = str(exc)
    return Comparison(block, label, ref, ref_label, (len(method), len(reference)), tasks, n_docs, tests, task_p,
                      acc, acc_norm, [t for t, _, _ in norm_pairs], ppl, note,
                      mde_paired(discordance, n_docs, FDR_Q, POWER),
                      mde_from_se(acc.se, FDR_Q, POWER) if acc.two_level else None)


def compare(data: Collected, options: StatsOptions | None = None) -> Paired:
    """Every method row vs every reference row of its pruned block, on the runs' per-example files."""
    options = options or StatsOptions()
    runs = _eligible(data.runs)
    _check_references(runs, options)
    states = {str(r["run_dir"]): per_example_state(r.to_dict(), data.folders.get(str(r["run_dir"])))
              for _, r in runs.iterrows()}
    paired = Paired(options, [], [], sorted((r, why) for r, why in states.items() if why))
    loaded: dict[str, RunSamples] = {}

    def samples(rows: pd.DataFrame) -> list[RunSamples]:
        out = []
        for _, row in rows.iterrows():
            run_dir = str(row["run_dir"])
            if states[run_dir]:
                continue
            if run_dir not in loaded:
                tasks = [c.removeprefix("acc.") for c in row.index if c.startswith("acc.") and not is_missing(row[c])]
                loaded[run_dir] = load_run(row.to_dict(), Path(data.folders[run_dir]), tasks)
            out.append(loaded[run_dir])
        return out

    dense = runs[(runs["pruner"] == "none") & (runs["method"] == "none")]
    for block, group in runs[runs["pruner"] != "none"].groupby("block", sort=False):
        for ref in options.references:
            ref_rows = _reference_rows(group, dense, ref)
            name = REFERENCE_NAMES.get(ref, ref)
            if ref_rows.empty:
                if options.explicit:
                    paired.skipped.append((block, "every method", name, "no such row in this block"))
                continue
            if ref_rows["label"].nunique() > 1:
                paired.skipped.append((block, "every method", name, "several rows for this reference: "
                                       + ", ".join(ref_rows["label"].unique())))
                continue
            ref_label = str(ref_rows["label"].iloc[0])
            reference = samples(ref_rows)
            for label in group["label"].unique():
                rows = group[group["label"] == label]
                if label == ref_label or (rows["method"] == "none").all():
                    continue
                method = samples(rows)
                if not method or not reference:  # listed in without_samples
                    continue
                try:
                    paired.comparisons.append(_compare(block, label, ref, ref_label, method, reference, options))
                except PairingError as exc:
                    paired.skipped.append((block, label, ref_label, str(exc)))
    _adjust(paired)
    return paired


def _adjust(paired: Paired) -> None:
    """Benjamini-Hochberg over every test the report shows: each comparison's per-task p and its suite p."""
    family = [p for c in paired.comparisons for p in (*c.task_p, c.acc.p_value)]
    adjusted = list(benjamini_hochberg(family))
    paired.tests = len(family)
    for c in paired.comparisons:
        c.task_p_adjusted = [float(adjusted.pop(0)) for _ in c.task_p]
        c.p_adjusted = float(adjusted.pop(0))


def marks(paired: Paired) -> dict[tuple[str, str, str], str]:
    """(block, label, accuracy-table column) -> the symbols of the references it differs from after BH."""
    out: dict[tuple[str, str, str], str] = {}
    for c in paired.comparisons:
        symbol = SYMBOLS[paired.options.references.index(c.reference)]
        cells = [f"acc.{t}" for t, p in zip(c.tasks, c.task_p_adjusted) if p <= FDR_Q]
        cells += ["mean_acc"] if c.p_adjusted <= FDR_Q else []
        for column in cells:
            key = (c.block, c.label, column)
            out[key] = out.get(key, "") + symbol
    return out


def legend(paired: Paired) -> list[str]:
    if not paired.comparisons:
        return []
    refs = " / ".join(f"{SYMBOLS[i]} {REFERENCE_NAMES.get(r, r)}" for i, r in enumerate(paired.options.references))
    return [(f"Marks on a cell: that row differs from the block's reference row on the same documents ({refs}), "
             f"Benjamini–Hochberg-adjusted p ≤ {FDR_Q:g} over the report's {paired.tests} paired tests (see Paired "
             "comparisons for the direction, CI and p).")]


def frame(paired: Paired) -> pd.DataFrame:
    """`paired.csv`: one row per comparison x task and one per comparison with task 'all' (the suite)."""
    rows = []
    for c in paired.comparisons:
        keys = {"block": c.block, "method": c.label, "reference": c.reference_label, "seeds_method": c.seeds[0],
                "seeds_reference": c.seeds[1]}
        for i, task in enumerate(c.tasks):
            test = c.mcnemar[i]
            rows.append({**keys, "task": task, "docs": c.n_docs[i], "diff_acc_pts": 100 * c.acc.task_differences[i],
                         "p": c.task_p[i], "p_bh": c.task_p_adjusted[i],
                         "test": "mcnemar_exact" if test else "bootstrap_two_level",
                         "gains": test.gains if test else None, "losses": test.losses if test else None})
        norm, ppl = c.acc_norm, c.perplexity
        rows.append({**keys, "task": "all", "docs": sum(c.n_docs), "diff_acc_pts": 100 * c.acc.difference,
                     "ci_low_acc_pts": 100 * c.acc.ci_low, "ci_high_acc_pts": 100 * c.acc.ci_high,
                     "p": c.acc.p_value, "p_bh": c.p_adjusted,
                     "test": "bootstrap_two_level" if c.acc.two_level else "bootstrap",
                     "diff_acc_norm_pts": None if norm is None else 100 * norm.difference,
                     "ci_low_acc_norm_pts": None if norm is None else 100 * norm.ci_low,
                     "ci_high_acc_norm_pts": None if norm is None else 100 * norm.ci_high,
                     "acc_norm_tasks": len(c.acc_norm_tasks),
                     "delta_ppl": None if ppl is None else ppl.delta,
                     "ci_low_delta_ppl": None if ppl is None else ppl.ci_low,
                     "ci_high_delta_ppl": None if ppl is None else ppl.ci_high,
                     "ratio_ppl": None if ppl is None else ppl.ratio, "mde_pts": 100 * c.mde,
                     "mde_with_seeds_pts": None if c.mde_with_seeds is None else 100 * c.mde_with_seeds,
                     "resamples": paired.options.resamples, "bootstrap_seed": paired.options.seed})
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _ci(d: PairedDifference | None) -> str:
    return "—" if d is None else f"{_pts(d.difference)} [{_pts(d.ci_low)}, {_pts(d.ci_high)}]"


def _ppl(d: PerplexityDifference | None) -> str:
    if d is None:
        return "—"
    return f"{d.delta:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}] (×{d.ratio:.3f})"


def _bold(text: str, survives: bool) -> str:
    return f"**{text}**" if survives else text


def _block_table(comparisons: list[Comparison]) -> Table:
    tasks = sorted({t for c in comparisons for t in c.tasks})
    rows = []
    for c in comparisons:
        cells = [c.label, c.reference_label, f"{c.seeds[0]}/{c.seeds[1]}", str(sum(c.n_docs))]
        by_task = {t: i for i, t in enumerate(c.tasks)}
        for task in tasks:
            i = by_task.get(task)
            cells.append("—" if i is None else _bold(f"{_pts(c.acc.task_differences[i])} ({_p(c.task_p[i])})",
                                                    c.task_p_adjusted[i] <= FDR_Q))
        norm_text = _ci(c.acc_norm) + (f" ({len(c.acc_norm_tasks)} of {len(c.tasks)} tasks)" if c.acc_norm is not None
                                  else "")
        cells += [_bold(_ci(c.acc), c.p_adjusted <= FDR_Q), _p(c.acc.p_value), _bold(_p(c.p_adjusted),
                                                                                     c.p_adjusted <= FDR_Q),
                  norm_text, _ppl(c.perplexity),
                  f"{100 * c.mde:.2f}" + ("" if c.mde_with_seeds is None else f" ({100 * c.mde_with_seeds:.2f})")]
        rows.append(cells)
    return Table(["method", "vs", "seeds", "docs"] + [f"{t} Δ (p)" for t in tasks]
                 + ["mean Δ acc [95% CI]", "p", "p (BH)", "mean Δ acc_norm [95% CI]", "Δ ppl [95% CI] (ratio)",
                    "MDE"], rows)


def _intro(paired: Paired) -> str:
    o = paired.options
    return (
        f"Each method row vs the reference rows of its block (`--reference {','.join(o.references)}`: "
        + ", ".join(REFERENCE_NAMES.get(r, r) for r in o.references)
        + "), on the same documents. Metric: lm-eval `acc`, mean over the tasks with equal weight; `acc_norm` "
        "beside it over the tasks that record it. Differences in points, method − reference. Task cells: Δ (p), p "
        "from McNemar's exact test with one seed a side, else from the two-level bootstrap. Suite: paired "
        f"bootstrap, 95 % percentile CI, documents resampled within tasks, {o.resamples} resamples, seed {o.seed}; "
        "with several seeds a side, seeds are resampled first, so seed variance is in the interval; bootstrap p "
        f"values are no finer than 2 / (resamples + 1) = {2 / (o.resamples + 1):.1e}. p (BH): "
        f"Benjamini–Hochberg over all {paired.tests} tests of this report (every task p and suite p); **bold** "
        f"survives at q = {FDR_Q:g}. Δ ppl: perplexity over the same windows, bootstrapped over windows. MDE: the "
        f"suite-mean difference (points) detectable with {POWER:.0%} power at two-sided α = {FDR_Q:g}, from the "
        "observed discordance (paired, documents only); in parentheses, from the two-level bootstrap's standard "
        "error where a side has several seeds (seed variance included).")


def section(paired: Paired) -> list[str | Table]:
    """The report's "Paired comparisons" section."""
    if not paired.comparisons:
        items: list[str | Table] = [
            ("No paired comparison: no method row and reference row of a block both have per-example data "
             f"(`--reference {','.join(paired.options.references)}`).")]
    else:
        items = [_intro(paired)]
        for block in dict.fromkeys(c.block for c in paired.comparisons):
            items += [f"**{block}**", _block_table([c for c in paired.comparisons if c.block == block])]
        unpaired_ppl = [f"{c.label} vs {c.reference_label} ({c.block}): {c.perplexity_note}"
                        for c in paired.comparisons if c.perplexity_note]
        if unpaired_ppl:
            items.append("Δ ppl not paired: " + "; ".join(unpaired_ppl) + ".")
        mdes = sorted(100 * c.mde for c in paired.comparisons)
        spread = f"{mdes[0]:.2f}" if len(mdes) == 1 else \
            f"{mdes[0]:.2f}–{mdes[-1]:.2f} (median {float(np.median(mdes)):.2f})"
        items.append(f"**Minimum detectable effect reached**: {spread} points of suite-mean `acc` at "
                     f"{POWER:.0%} power, α = {FDR_Q:g} ({len(mdes)} comparisons); smaller true differences are "
                     "likely to be missed.")
    if paired.skipped:
        items += ["Not paired:", Table(["block", "method", "vs", "why"], [list(s) for s in paired.skipped])]
    if paired.without_samples:
        items += [f"{len(paired.without_samples)} run(s) without per-example data take no part in paired tests:",
                  Table(["run", "why"], [[f"`{r}`", why] for r, why in paired.without_samples])]
    return items
