"""Measure the pruners on the default model: held-out perplexity, prune time, cache-hit time and peak memory for
dense and each pruner x {50 % unstructured, 2of4, 4of8}. Writes `<out>/pruning_<model>.csv` and `.md`.

    nice -n 10 python -m lorsbench.pruning.measure --out results/pruning

Every prune starts from the dense weights and goes through `prune_model` with a fresh temporary cache (so the
prune time is a real prune), then the same settings run again to time the cache hit. Peak memory: process peak
RSS (CPU) or peak allocated (GPU) during the first prune, reset before it (lorsbench.profiling).
"""
from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorsbench.config import CalibrationConfig, ModelConfig, PatternConfig, PerplexityConfig, PruningConfig
from lorsbench.modules import target_linears
from lorsbench.pruning.artifacts import prune_model
from lorsbench.pruning.calibration import calibration_source

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATTERNS = {
    "unstructured": PatternConfig("unstructured"),
    "2of4": PatternConfig("2of4", 2, 4),
    "4of8": PatternConfig("4of8", 4, 8),
}
PRUNERS = ("magnitude", "wanda", "sparsegpt")
# Wanda README, LLaMA-2-7B, WikiText-2 (docs/methods.md §Wanda): the expected ordering, not a target.
LITERATURE = {
    ("dense", "-"): 5.12,
    ("magnitude", "unstructured"): 14.89, ("wanda", "unstructured"): 6.42, ("sparsegpt", "unstructured"): 6.51,
    ("magnitude", "4of8"): 16.48, ("wanda", "4of8"): 7.97, ("sparsegpt", "4of8"): 8.12,
    ("magnitude", "2of4"): 54.59, ("wanda", "2of4"): 11.02, ("sparsegpt", "2of4"): 10.17,
}
COLUMNS = ["pruner", "pattern", "target_sparsity", "sparsity", "nm_valid", "perplexity", "nll_mean", "ppl_tokens",
           "prune_wall_s", "cache_hit_wall_s", "peak_rss_gib_prune", "peak_alloc_gib_prune", "mask_digest",
           "llama2_7b_wikitext2_ppl"]


@dataclass
class Row:
    pruner: str
    pattern: str
    target_sparsity: float
    sparsity: float
    nm_valid: bool | None
    perplexity: float
    nll_mean: float
    ppl_tokens: int
    prune_wall_s: float | None
    cache_hit_wall_s: float | None
    peak_rss_gib_prune: float | None
    peak_alloc_gib_prune: float | None
    mask_digest: str | None
    llama2_7b_wikitext2_ppl: float | None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--cache-dir", default=str(Path("~/.cache/lorsbench").expanduser()))
    parser.add_argument("--out", default="results/pruning")
    args = parser.parse_args(argv)

    from lorsbench.evaluation.perplexity import perplexity
    from lorsbench.models import load_model
    from lorsbench.profiling import PhaseMeter

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    loaded = load_model(ModelConfig(name=args.model, source="bundled"), dtype, device, Path(args.cache_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"loaded {args.model} ({loaded.source}) in {time.perf_counter() - t0:.1f} s", flush=True)
    dense = {name: linear.weight.detach().clone() for name, linear in target_linears(model, TARGETS).items()}
    ppl_config = PerplexityConfig(source="pydoc", window=512, stride=512, max_tokens=16384, batch_size=4)
    calibration = CalibrationConfig(source="pydoc", nsamples=args.nsamples, seq_len=args.seq_len, seed=0)

    def evaluate():
        return perplexity(model, tokenizer, ppl_config, device)

    result = evaluate()
    rows = [Row("dense", "-", 0.0, 0.0, None, result.perplexity, result.nll_mean, result.tokens,
                None, None, None, None, None, LITERATURE[("dense", "-")])]
    print(_line(rows[-1]), flush=True)
    for name in args.pruners:
        for pattern_name in args.patterns:
            pattern = PATTERNS[pattern_name]
            config = PruningConfig(name, pattern.sparsity or 0.5, pattern, TARGETS,
                                   calibration if name != "magnitude" else None, {})
            loader = calibration_source(tokenizer, calibration)
            with tempfile.TemporaryDirectory(prefix="lorsbench-measure-") as cache:
                _restore(model, dense)
                with PhaseMeter("prune", device) as meter:
                    outcome = prune_model(model, config, loader, Path(cache), f"{args.model}|{loaded.source}|{args.dtype}")
                _restore(model, dense)
                hit = prune_model(model, config, loader, Path(cache), f"{args.model}|{loaded.source}|{args.dtype}")
                assert hit.cache_hit and hit.masks.digest() == outcome.masks.digest()
            result = evaluate()
            rows.append(Row(
                name, pattern_name, config.sparsity, outcome.report.sparsity, outcome.report.nm_valid,
                result.perplexity, result.nll_mean, result.tokens, outcome.prune_wall_s, hit.prune_wall_s,
                meter.stats.peak_rss_gib, meter.stats.peak_alloc_gib, outcome.masks.digest()[:16],
                LITERATURE.get((name, pattern_name)),
            ))
            print(_line(rows[-1]), flush=True)
    _restore(model, dense)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pruning_{args.model}"
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: getattr(row, k) for k in COLUMNS})
    (out / f"{stem}.md").write_text(_markdown(rows, args, loaded.source, device))
    print(f"wrote {out / stem}.csv and .md", flush=True)


def _restore(model, dense: dict[str, torch.Tensor]) -> None:
    linears = target_linears(model, TARGETS)
    with torch.no_grad():
        for name, weight in dense.items():
            linears[name].weight.copy_(weight)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _line(row: Row) -> str:
    return (f"{row.pruner:10s} {row.pattern:12s} sparsity={row.sparsity:.4f} ppl={row.perplexity:.2f} "
            f"prune={_fmt(row.prune_wall_s, 1)} s hit={_fmt(row.cache_hit_wall_s, 2)} s "
            f"peak_rss={_fmt(row.peak_rss_gib_prune)} GiB")


def ordering_checks(rows: list[Row]) -> list[str]:
    """The literature's orderings (Wanda README, LLaMA-2-7B): magnitude is worst at every pattern; for every
    pruner unstructured 50 % < 4:8 < 2:4; Wanda vs SparseGPT: close at 50 % / 4:8, SparseGPT better at 2:4."""
    ppl = {(r.pruner, r.pattern): r.perplexity for r in rows}
    lines = []
    for pattern in PATTERNS:
        if all((p, pattern) in ppl for p in PRUNERS):
            worst = max(PRUNERS, key=lambda p: ppl[(p, pattern)])
            lines.append(f"- {pattern}: magnitude worst: {'yes' if worst == 'magnitude' else 'NO (' + worst + ')'}; "
                         f"SparseGPT {'<' if ppl[('sparsegpt', pattern)] < ppl[('wanda', pattern)] else '>'} Wanda "
                         f"({ppl[('sparsegpt', pattern)]:.2f} vs {ppl[('wanda', pattern)]:.2f}; "
                         f"LLaMA-2-7B: {LITERATURE[('sparsegpt', pattern)]} vs {LITERATURE[('wanda', pattern)]})")
    for pruner in PRUNERS:
        if all((pruner, p) in ppl for p in ("unstructured", "4of8", "2of4")):
            ok = ppl[(pruner, "unstructured")] < ppl[(pruner, "4of8")] < ppl[(pruner, "2of4")]
            lines.append(f"- {pruner}: unstructured < 4of8 < 2of4: {'yes' if ok else 'NO'}")
    return lines


def _markdown(rows: list[Row], args, source: str, device: torch.device) -> str:
    header = ("| pruner | pattern | sparsity | N:M valid | perplexity | prune s | cache hit s | peak RSS GiB (prune) "
              "| LLaMA-2-7B WikiText-2 (Wanda README) |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r.pruner} | {r.pattern} | {r.sparsity:.4f} | {_fmt(r.nm_valid)} | {r.perplexity:.2f} | "
        f"{_fmt(r.prune_wall_s, 1)} | {_fmt(r.cache_hit_wall_s, 2)} | "
        f"{_fmt(r.peak_rss_gib_prune if r.peak_alloc_gib_prune is None else r.peak_alloc_gib_prune)} | "
        f"{_fmt(r.llama2_7b_wikitext2_ppl)} |\n"
        for r in rows
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return (
        f"# Pruning on {args.model}\n\n"
        f"Generated by `python -m lorsbench.pruning.measure` on {time.strftime('%Y-%m-%d')}.\n\n"
        f"- model: {source}; weights and activations in **{args.dtype}** (SparseGPT's Hessian and updates in fp32)\n"
        f"- device: {device_name}; torch {torch.__version__}\n"
        f"- targets: {', '.join(TARGETS)} (embeddings and lm_head dense)\n"
        f"- calibration (Wanda, SparseGPT): {args.nsamples} x {args.seq_len} tokens of the pydoc calibration split, "
        f"seed 0 (papers: 128 x 2048 C4); SparseGPT blocksize 128, percdamp 0.01\n"
        f"- perplexity: held-out pydoc split, first 16384 tokens, windows of 512, stride 512\n"
        f"- prune s: wall time of a real prune (calibration text + layer-wise pruning) through a fresh cache; "
        f"cache hit s: the same settings again (verify + load the artifact); peak RSS: process peak during the "
        f"prune (includes the loaded model)\n\n"
        + header + body
        + "\nOrdering checks against the literature:\n\n" + "\n".join(ordering_checks(rows)) + "\n"
    )


if __name__ == "__main__":
    main()
