"""Paired statistics for comparing two methods on the same documents (numpy / scipy only).

- `mcnemar_exact`: McNemar's exact test = a two-sided binomial test on the discordant documents.
- `paired_bootstrap`: the suite-mean accuracy difference (tasks weighted equally) with a percentile CI; documents
  are resampled within each task with the same indices for both sides (paired, Koehn 2004). With several seeds a
  side, seeds are resampled first (two-level), so seed variance is inside the interval.
- `benjamini_hochberg`: FDR-adjusted p-values across a report's comparisons.
- `mde_paired`: minimum detectable suite-mean difference at a given power from the observed discordance.
- `paired_perplexity`: perplexity difference over the same windows, bootstrapped over windows (and seeds).

How the report uses them: README, "Reading a report". Every resampling function takes a numpy Generator or a seed,
so a report is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

DEFAULT_RESAMPLES = 2000
MIN_RESAMPLES = 100  # fewer make the 2.5 % / 97.5 % percentiles rest on a couple of replicates
# Resamples per vectorized block: bounds memory at CHUNK x (distinct document patterns or windows) values.
CHUNK = 250


@dataclass(frozen=True)
class McNemar:
    gains: int  # documents the method gets right and the reference wrong
    losses: int  # documents the reference gets right and the method wrong
    p_value: float


@dataclass(frozen=True)
class PairedDifference:
    """method - reference, in the units of the inputs (fractions for accuracy)."""
    difference: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, from the bootstrap distribution (resolution 2 / (resamples + 1))
    se: float  # standard deviation of the bootstrap distribution
    task_differences: tuple[float, ...]
    task_p_values: tuple[float, ...]
    resamples: int
    two_level: bool


@dataclass(frozen=True)
class PerplexityDifference:
    ppl_method: float
    ppl_reference: float
    delta: float  # ppl_method - ppl_reference
    ci_low: float
    ci_high: float
    ratio: float  # ppl_method / ppl_reference
    ratio_ci_low: float
    ratio_ci_high: float
    windows: int
    resamples: int
    two_level: bool


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_resamples(resamples: int) -> None:
    if not isinstance(resamples, (int, np.integer)) or resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples must be an integer >= {MIN_RESAMPLES}, got {resamples!r}")


def mcnemar_exact(method: Sequence[int] | np.ndarray, reference: Sequence[int] | np.ndarray) -> McNemar:
    """McNemar's exact test on paired 0/1 correctness (one entry per document, same order on both sides)."""
    a, b = np.asarray(method).astype(bool), np.asarray(reference).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-d arrays of equal length, got shapes {a.shape} and {b.shape}")
    gains, losses = int((a & ~b).sum()), int((~a & b).sum())
    if gains + losses == 0:
        return McNemar(0, 0, 1.0)
    return McNemar(gains, losses, float(sps.binomtest(gains, gains + losses, 0.5).pvalue))


def _two_sided_p(replicates: np.ndarray) -> np.ndarray:
    """Bootstrap p-value of 'difference = 0': twice the smaller tail mass at 0, with the +1 correction."""
    r = replicates.shape[0]
    below = (1 + (replicates <= 0).sum(axis=0)) / (r + 1)
    above = (1 + (replicates >= 0).sum(axis=0)) / (r + 1)
    return np.minimum(1.0, 2 * np.minimum(below, above))


def _as_side(values: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    out = []
    for t, v in enumerate(values):
        arr = np.asarray(v, dtype=np.float64)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise ValueError(f"{name} task {t}: need (seeds, documents) values, got shape {arr.shape}")
        if np.isnan(arr).any():
            raise ValueError(f"{name} task {t}: missing values (NaN)")
        out.append(arr)
    if not out:
        raise ValueError(f"{name}: no tasks")
    if len({a.shape[0] for a in out}) != 1:
        raise ValueError(f"{name}: every task needs the same seeds, got {[a.shape[0] for a in out]}")
    return out


def _seed_weights(rng: np.random.Generator, size: int, seeds: int, resample: bool) -> np.ndarray:
    """(size, seeds) weights summing to 1 per row: multinomial seed counts, or equal weights (seeds fixed)."""
    if not resample or seeds == 1:
        return np.full((size, seeds), 1.0 / seeds)
    return rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=size) / seeds


def _patterns(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct per-document (method seeds, reference seeds) columns and how many documents share each.

    Drawing documents with replacement is drawing multinomial counts over documents; documents with equal columns
    have equal values in every replicate, so their counts can be drawn together: for 0/1 correctness there are at most
    2^seeds patterns, whatever the number of documents.
    """
    unique, counts = np.unique(np.vstack([x, y]), axis=1, return_counts=True)
    return unique[:x.shape[0]], unique[x.shape[0]:], counts


def paired_bootstrap(method: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                     resamples: int = DEFAULT_RESAMPLES, rng: np.random.Generator | int | None = 0,
                     confidence: float = 0.95, resample_seeds: bool = True) -> PairedDifference:
    """Suite-mean difference method - reference with a paired percentile-bootstrap CI.

    `method[t]` and `reference[t]` hold task t's per-document values, shape (seeds, documents) or (documents,),
    aligned on documents. Each replicate resamples seeds per side (when `resample_seeds` and a side has several;
    the same seeds for every task, as a seed is one run), then documents within each task with the same indices for
    both sides, and averages the tasks with equal weight.
    """
    _check_resamples(resamples)
    a, b = _as_side(method, "method"), _as_side(reference, "reference")
    if len(a) != len(b) or any(x.shape[1] != y.shape[1] for x, y in zip(a, b)):
        raise ValueError("method and reference need the same tasks with the same documents")
    gen = _rng(rng)
    two_level = resample_seeds and (a[0].shape[0] > 1 or b[0].shape[0] > 1)
    observed = np.array([x.mean() - y.mean() for x, y in zip(a, b)])
    patterns = [_patterns(x, y) for x, y in zip(a, b)]
    reps = np.empty((resamples, len(a)))
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        wa = _seed_weights(gen, size, a[0].shape[0], two_level)
        wb = _seed_weights(gen, size, b[0].shape[0], two_level)
        for t, (xu, yu, counts) in enumerate(patterns):
            n = int(counts.sum())
            drawn = gen.multinomial(n, counts / n, size=size)  # documents drawn with replacement, per pattern
            reps[start:start + size, t] = (drawn * (wa @ xu - wb @ yu)).sum(axis=1) / n
    suite = reps.mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(suite, [tail, 100 - tail])
    return PairedDifference(
        difference=float(observed.mean()), ci_low=float(low), ci_high=float(high),
        p_value=float(_two_sided_p(suite[:, None])[0]), se=float(suite.std(ddof=1)),
        task_differences=tuple(float(d) for d in observed), task_p_values=tuple(float(p) for p in _two_sided_p(reps)),
        resamples=resamples, two_level=two_level)


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (reject where adjusted <= q controls the FDR at q)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1) | np.isnan(p)).any():
        raise ValueError(f"p-values must be a 1-d sequence in [0, 1], got {p_values!r}")
    return np.asarray(sps.false_discovery_control(p, method="bh")) if p.size else p


def mde_paired(discordance: Sequence[float], n_docs: Sequence[int], alpha: float = 0.05,
               power: float = 0.8) -> float:
    """Smallest suite-mean difference (fraction) a two-sided paired test detects with `power` at `alpha`.

    Task t with n_t documents and discordant fraction d_t has a per-document difference in {-1, 0, 1} with variance
    about d_t near the null, so its mean has SE sqrt(d_t / n_t); the equally weighted suite mean has
    SE = sqrt(sum_t d_t / n_t) / T, and MDE = (z_{1-alpha/2} + z_power) * SE.
    """
    d, n = np.asarray(discordance, dtype=np.float64), np.asarray(n_docs, dtype=np.float64)
    if d.shape != n.shape or d.size == 0 or (n <= 0).any() or ((d < 0) | (d > 1)).any():
        raise ValueError(f"need one discordant fraction in [0, 1] and a positive document count per task, "
                         f"got {discordance!r} and {n_docs!r}")
    return mde_from_se(float(np.sqrt((d / n).sum()) / d.size), alpha, power)


def mde_from_se(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """(z_{1-alpha/2} + z_power) * se: the difference a two-sided z-test at `alpha` detects with `power`."""
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se)


def _ppl_side(nll: np.ndarray, name: str, windows: int) -> np.ndarray:
    arr = np.asarray(nll, dtype=np.float64)
    arr = arr[None, :] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != windows or not np.isfinite(arr).all():
        raise ValueError(f"{name}: need finite (seeds, {windows}) per-window NLL sums, got shape {arr.shape}")
    return arr


def paired_perplexity(method_nll: np.ndarray, reference_nll: np.ndarray, tokens: Sequence[int],
                      resamples: int = DEFAULT_RESAMPLES, rng: np.random.Generator | int | None = 0,
                      confidence: float = 0.95, resample_seeds: bool = True) -> PerplexityDifference:
    """Perplexity difference over the same windows: ppl = exp(sum NLL / sum tokens) per run, averaged over seeds.

    `*_nll` are per-window NLL sums, shape (seeds, windows) or (windows,); `tokens` the scored tokens per window
    (the same text on both sides). Replicates resample seeds (two-level, as `paired_bootstrap`) then windows.
    """
    _check_resamples(resamples)
    tok = np.asarray(tokens, dtype=np.float64)
    if tok.ndim != 1 or tok.size == 0 or (tok <= 0).any():
        raise ValueError(f"tokens must be positive counts, one per window, got shape {tok.shape}")
    a = _ppl_side(method_nll, "method", tok.size)
    b = _ppl_side(reference_nll, "reference", tok.size)
    gen = _rng(rng)
    two_level = resample_seeds and (a.shape[0] > 1 or b.shape[0] > 1)

    def ppl(counts: np.ndarray, nll: np.ndarray) -> np.ndarray:  # (size, windows) counts -> (size, seeds)
        return np.exp((counts @ nll.T) / (counts @ tok)[:, None])

    ones = np.ones((1, tok.size))
    obs_a, obs_b = float(ppl(ones, a).mean()), float(ppl(ones, b).mean())
    delta, ratio = np.empty(resamples), np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        wa = _seed_weights(gen, size, a.shape[0], two_level)
        wb = _seed_weights(gen, size, b.shape[0], two_level)
        counts = gen.multinomial(tok.size, np.full(tok.size, 1.0 / tok.size), size=size).astype(np.float64)
        pa, pb = (wa * ppl(counts, a)).sum(axis=1), (wb * ppl(counts, b)).sum(axis=1)
        delta[start:start + size], ratio[start:start + size] = pa - pb, pa / pb
    tail = 100 * (1 - confidence) / 2
    d_low, d_high = np.percentile(delta, [tail, 100 - tail])
    r_low, r_high = np.percentile(ratio, [tail, 100 - tail])
    return PerplexityDifference(obs_a, obs_b, obs_a - obs_b, float(d_low), float(d_high), obs_a / obs_b,
                                float(r_low), float(r_high), int(tok.size), resamples, two_level)
