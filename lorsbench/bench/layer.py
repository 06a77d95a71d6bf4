"""Per-layer micro-benchmark: forward + backward of ONE adapted linear, built by each method's own `attach`
(methods.md 7.5 protocol: bf16, 2:4 magnitude mask, r = 16, x requires grad so dX is computed).

    python -m lorsbench.bench.layer                       # methods × shapes × T: median ms, peak extra MiB
    python -m lorsbench.bench.layer --tune                # fused LoRS kernel: every tile config vs cuBLAS/unfused
    python -m lorsbench.bench.layer --semi                # 2:4 semi-structured base GEMMs vs dense

Shapes are d_out × d_in. `dense` is the frozen base alone (the two GEMMs every method pays). Time: median of
`triton.testing.do_bench` (CUDA events, L2 flushed between repeats); memory: `max_memory_allocated` during one
fwd+bwd minus what was allocated before it (outputs, gradients and transients).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.bench import table
from lorsbench.records import write_text_atomic

SHAPES = ((4096, 4096), (14336, 4096))
TUNE_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # every Llama-3-8B projection
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
TUNE_TOKENS = (512, 1024, 2048, 8192)
METHODS = ("dense", "lora", "spp", "sqft", "lors", "lors:kernel=torch", "lors:kernel=fused,mask_source=stored", "lors_exact",
           "lors_exact:kernel=torch", "slope", "full_sparse_ft")
MIB = float(1 << 20)


class _Block(nn.Module):
    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)


class _Holder(nn.Module):
    """`layers.0.proj`: the path `lorsbench.modules.target_linears` looks for."""

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.layers = nn.ModuleList([_Block(d_out, d_in)])


def build_layer(method: str, d_out: int, d_in: int, pattern_name: str, device: torch.device, dtype: torch.dtype,
                rank: int = 16, seed: int = 0) -> tuple[nn.Module, list[nn.Parameter]]:
    """One pruned linear with `method` attached through the registry ('dense': the frozen base, no adapter)."""
    from lorsbench.bench.step import magnitude_masks, method_spec, pattern_config
    from lorsbench.method import MethodContext, build_method

    torch.manual_seed(seed)
    holder = _Holder(d_out, d_in).to(device=device, dtype=dtype)
    with torch.no_grad():
        holder.layers[0].proj.weight.normal_(0, 0.02)
    pattern = pattern_config(pattern_name)
    masks = magnitude_masks(holder, ("proj",), pattern.sparsity or 0.5, pattern)
    if method == "dense":
        holder.requires_grad_(False)
        return holder.layers[0].proj, []
    spec = method_spec(method, rank)
    ctx = MethodContext(targets=("proj",), device=device, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    params = build_method(spec).attach(holder, masks, ctx)
    module = holder.layers[0].proj
    with torch.no_grad():  # non-zero adapters (a zero U or β would hide real work); never the base weight
        for p in params:
            if p is not module.weight:
                p.normal_(0, 0.02)
    return module, params


def median_ms(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor] = (),
              rep_ms: int = 100) -> float:
    """Median time of `fn` in ms: `triton.testing.do_bench` on CUDA, a wall-clock loop on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(grad_to_none), return_mode="median"))
    times = []
    for i in range(4):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


@dataclass
class LayerRow:
    method: str
    d_out: int
    d_in: int
    tokens: int
    status: str = "ok"
    ms_median: float | None = None
    vs_lora: float | None = None
    peak_extra_mib: float | None = None
    error: str | None = None


def layer_rows(methods, shapes, tokens, pattern: str, device: torch.device, dtype: torch.dtype,
               rep_ms: int = 100) -> list[LayerRow]:
    rows: list[LayerRow] = []
    for d_out, d_in in shapes:
        for method in methods:
            try:
                module, params = build_layer(method, d_out, d_in, pattern, device, dtype)
            except Exception as exc:  # noqa: BLE001 - reported as a row
                rows += [LayerRow(method, d_out, d_in, t, "failed", error=f"{type(exc).__name__}: {exc}") for t in tokens]
                continue
            for t in tokens:
                row = LayerRow(method, d_out, d_in, t)
                try:
                    x = torch.randn(t, d_in, device=device, dtype=dtype, requires_grad=True)
                    dy = torch.randn(t, d_out, device=device, dtype=dtype)

                    def step():
                        module(x).backward(dy)

                    step()  # compile / first-use work outside the measurements
                    row.peak_extra_mib = peak_extra_mib(step, device)
                    row.ms_median = median_ms(step, device, [x, *params], rep_ms)
                except Exception as exc:  # noqa: BLE001
                    oom = isinstance(exc, torch.OutOfMemoryError)
                    row.status, row.error = ("oom" if oom else "failed"), f"{type(exc).__name__}: {str(exc)[:200]}"
                finally:
                    x = dy = None
                    for p in params:
                        p.grad = None
                rows.append(row)
                print(f"[layer] {method:26s} {d_out}x{d_in} T={t:6d}: {row.status} {row.ms_median} ms "
                      f"{row.peak_extra_mib} MiB", flush=True)
            del module, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = {(r.d_out, r.d_in, r.tokens): r.ms_median for r in rows if r.method == "lora" and r.status == "ok"}
    for r in rows:
        base = ref.get((r.d_out, r.d_in, r.tokens))
        r.vs_lora = r.ms_median / base if r.ms_median and base else None
    return rows


def layer_markdown(rows: list[LayerRow], header: str) -> str:
    tokens = sorted({r.tokens for r in rows})
    lines = [header, ""]
    for d_out, d_in in dict.fromkeys((r.d_out, r.d_in) for r in rows):
        lines += [f"### d_out × d_in = {d_out} × {d_in}: fwd+bwd median ms (× lora) / peak extra MiB", "",
                  "| method | " + " | ".join(f"T={t}" for t in tokens) + " |", "|---" * (1 + len(tokens)) + "|"]
        for method in dict.fromkeys(r.method for r in rows):
            cells = []
            for t in tokens:
                r = next((r for r in rows if (r.method, r.d_out, r.d_in, r.tokens) == (method, d_out, d_in, t)), None)
                if r is None:
                    cells.append("")
                elif r.status != "ok":
                    cells.append(r.status.upper())
                else:
                    ratio = f" ({r.vs_lora:.2f})" if r.vs_lora else ""
                    mem = f" / {r.peak_extra_mib:.0f}" if r.peak_extra_mib is not None else ""
                    cells.append(f"{r.ms_median:.3f}{ratio}{mem}")
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# --tune: the fused LoRS kernels, every candidate tile configuration, against cuBLAS and the unfused path


def _masked_problem(d_out: int, d_in: int, tokens: int, device, dtype, rank: int = 16):
    from lorsbench.config import PatternConfig
    from lorsbench.pruning.masks import mask_from_scores

    w = torch.randn(d_out, d_in, device=device, dtype=dtype) * 0.02
    mask = mask_from_scores(w.abs(), 0.5, PatternConfig("2of4", 2, 4))
    w = w * mask
    u = torch.randn(d_out, rank, device=device) * 0.02
    v = torch.randn(rank, d_in, device=device) * 0.02
    x = torch.randn(tokens, d_in, device=device, dtype=dtype)
    dy = torch.randn(tokens, d_out, device=device, dtype=dtype)
    return w, mask, u, v, x, dy


BUILD_CANDIDATES = ((64, 128, 4), (128, 128, 8), (64, 256, 4), (32, 256, 4), (128, 64, 4))


def tune_rows(shapes, tokens, device, dtype, scaling: float = 4.0, rep_ms: int = 60,
              all_configs: bool = False) -> tuple[list[dict], list[dict]]:
    """Time both Triton paths per GEMM against cuBLAS on the dense W and the unfused torch path: the one-pass
    W_eff builder (each block candidate, at the first T: it does not depend on T) + cuBLAS, and the fused GEMMs
    (their default config, or every candidate with `all_configs`). Only outputs that match the reference are
    timed. Returns (all rows, the best fused entry per (kind, N, K, T))."""
    from lorsbench.methods import _lors_triton as lt
    from lorsbench.methods._lors import _effective_weight

    rows, best = [], []
    for n, k in shapes:
        for t in tokens:
            w, mask, u, v, x, dy = _masked_problem(n, k, t, device, dtype)
            w_eff = _effective_weight(w, u, v, mask, scaling)
            y_ref, dx_ref = F.linear(x, w_eff), dy @ w_eff
            flops = 2.0 * t * n * k
            base = {"N": n, "K": k, "T": t}
            timings = {
                ("fwd", "cublas_dense"): lambda: F.linear(x, w),
                ("fwd", "torch_unfused"): lambda: F.linear(x, _effective_weight(w, u, v, mask, scaling)),
                ("dx", "cublas_dense"): lambda: dy @ w,
                ("dx", "torch_unfused"): lambda: dy @ _effective_weight(w, u, v, mask, scaling),
            }
            timings[("fwd", "triton_build+cublas")] = lambda: lt.forward("triton", x, w, u, v, mask, scaling)
            timings[("dx", "triton_build+cublas")] = lambda: lt.grad_input("triton", dy, w, u, v, mask, scaling)
            for (kind, label), fn in timings.items():
                ms = median_ms(fn, device, rep_ms=rep_ms)
                out = fn()
                err = float((out.float() - (y_ref if kind == "fwd" else dx_ref).float()).norm()
                            / (y_ref if kind == "fwd" else dx_ref).float().norm()) if "cublas_dense" != label else 0.0
                rows.append({**base, "kind": kind, "config": label, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
            if t == tokens[0]:
                for blocks in BUILD_CANDIDATES:
                    built = lt.build_weff(w, u, v, mask, scaling, blocks=blocks)
                    ok = (bool((built[~mask] == 0).all())
                          and float((built.float() - w_eff.float()).abs().max()) <= float(w_eff.float().abs().max()) * 2**-7)
                    ms = median_ms(lambda blocks=blocks: lt.build_weff(w, u, v, mask, scaling, blocks=blocks), device,
                                   rep_ms=rep_ms)
                    rows.append({**base, "kind": "build", "config": "n{}k{}w{}".format(*blocks), "ms": ms,
                                 "tb_s": n * k * 5 / ms / 1e9, "ok": ok})
                    print(f"[tune] build {n}x{k} {blocks}: {ms:.4f} ms ({n * k * 5 / ms / 1e9:.2f} TB/s) ok={ok}",
                          flush=True)
                ms = median_ms(lambda: _effective_weight(w, u, v, mask, scaling), device, rep_ms=rep_ms)
                rows.append({**base, "kind": "build", "config": "torch_addmm_mul", "ms": ms,
                             "tb_s": n * k * 9 / ms / 1e9, "ok": True})
            del w_eff
            for kind, ref in (("fwd", y_ref), ("dx", dx_ref)):
                winner = None
                for cfg in (lt.CANDIDATES if all_configs else (lt.pick_config(kind, t, n, k),)):
                    if kind == "fwd":
                        fn = lambda cfg=cfg: lt.weff_linear(x, w, u, v, mask, scaling, config=cfg)  # noqa: E731
                    else:
                        fn = lambda cfg=cfg: lt.weff_grad_input(dy, w, u, v, mask, scaling, config=cfg)  # noqa: E731
                    row = {**base, "kind": kind, "config": cfg.label()}
                    try:
                        out = fn()
                        err = float((out.float() - ref.float()).norm() / ref.float().norm())
                        row["rel_err"] = err
                        if not err < 1e-2:
                            row["error"] = "mismatch"
                        else:
                            row["ms"] = median_ms(fn, device, rep_ms=rep_ms)
                            row["tflops"] = flops / row["ms"] / 1e9
                            if winner is None or row["ms"] < winner[1]:
                                winner = (cfg, row["ms"])
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a config
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    rows.append(row)
                if winner is not None:
                    best.append({"kind": kind, **base, "config": asdict(winner[0]), "ms": winner[1]})
                print(f"[tune] {kind:3s} {n}x{k} T={t}: best {winner[0].label() if winner else None} "
                      f"{winner[1] if winner else float('nan'):.4f} ms", flush=True)
            del w, mask, u, v, x, dy, y_ref, dx_ref
    return rows, best


def tune_markdown(rows: list[dict]) -> str:
    lines = ["| kind | N×K | T | cuBLAS dense ms | unfused torch ms | best fused ms (config) | fused / dense | "
             "fused / unfused |", "|---|---|---|---|---|---|---|---|"]
    lines[0] = lines[0].replace("| best fused ms (config) |", "| triton build + cuBLAS ms | best fused ms (config) |")
    lines[1] += "---|"
    keys = dict.fromkeys((r["kind"], r["N"], r["K"], r["T"]) for r in rows if r["kind"] != "build")
    for kind, n, k, t in keys:
        group = [r for r in rows if (r["kind"], r["N"], r["K"], r["T"]) == (kind, n, k, t)]
        by_label = {r["config"]: r.get("ms") for r in group}
        dense, unfused = by_label.get("cublas_dense"), by_label.get("torch_unfused")
        build = by_label.get("triton_build+cublas")
        fused = [r for r in group if r["config"] not in ("cublas_dense", "torch_unfused", "triton_build+cublas")
                 and r.get("ms")]
        best = min(fused, key=lambda r: r["ms"]) if fused else None
        best_text = f"{best['ms']:.4f} ({best['config']})" if best else "none correct"
        ratio = lambda v, d: f"{v / d:.2f}" if v and d else "–"  # noqa: E731
        lines.append(f"| {kind} | {n}×{k} | {t} | {dense:.4f} | {unfused:.4f} | {build:.4f} | {best_text} | "
                     f"{ratio(best and best['ms'], dense)} | {ratio(best and best['ms'], unfused)} |")
    lines[0] = lines[0].replace("| fused / dense | fused / unfused |", "| fused / dense | fused / unfused |")
    builds = [r for r in rows if r["kind"] == "build"]
    if builds:
        lines += ["", "W_eff construction alone (bytes: W 2 + mask 1 + out 2 per element for the Triton pass; "
                  "addmm + mul_ moves 9):", "", "| N×K | config | ms | effective TB/s | matches addmm+mask |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['N']}×{r['K']} | {r['config']} | {r['ms']:.4f} | {r['tb_s']:.2f} | {r['ok']} |" for r in builds]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# --semi: 2:4 semi-structured kernels for the frozen base GEMMs


def semi_rows(shapes, tokens, device, dtype, rep_ms: int = 60) -> list[dict]:
    """Forward `X Wᵀ` and SLoPe's double-pruned backward `dY W_dp` with `to_sparse_semi_structured` vs dense."""
    from torch.sparse import to_sparse_semi_structured

    from lorsbench.config import PatternConfig
    from lorsbench.pruning.masks import mask_from_scores

    two_four = PatternConfig("2of4", 2, 4)
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        w = w * mask_from_scores(w.abs(), 0.5, two_four)
        w_dp_t = (w * mask_from_scores(w.abs().t(), 0.5, two_four).t()).t().contiguous()  # K×N, 2:4 along N
        try:
            w_sparse, w_dp_sparse = to_sparse_semi_structured(w), to_sparse_semi_structured(w_dp_t)
        except Exception as exc:  # noqa: BLE001
            rows.append({"N": n, "K": k, "T": None, "gemm": "setup", "error": f"{type(exc).__name__}: {exc}"})
            continue
        for t in tokens:
            x = torch.randn(t, k, device=device, dtype=dtype)
            dy = torch.randn(t, n, device=device, dtype=dtype)
            for gemm, dense_fn, sparse_fn, ref in (
                ("fwd X·Wᵀ", lambda: F.linear(x, w), lambda: F.linear(x, w_sparse), None),
                ("bwd dY·W_dp", lambda: F.linear(dy, w_dp_t), lambda: F.linear(dy, w_dp_sparse), None),
            ):
                row = {"N": n, "K": k, "T": t, "gemm": gemm}
                try:
                    dense_out, sparse_out = dense_fn(), sparse_fn()
                    row["rel_err"] = float((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm())
                    row["dense_ms"] = median_ms(dense_fn, device, rep_ms=rep_ms)
                    row["sparse_ms"] = median_ms(sparse_fn, device, rep_ms=rep_ms)
                    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                rows.append(row)
                print(f"[semi] {n}x{k} T={t} {gemm}: {row.get('speedup')} ({row.get('error', '')})", flush=True)
    return rows


def semi_markdown(rows: list[dict]) -> str:
    lines = ["| N×K | T | GEMM | dense ms | 2:4 sparse ms | speed-up | rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['N']}×{r['K']} | {r['T']} | {r['gemm']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['N']}×{r['K']} | {r['T']} | {r['gemm']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | "
                         f"{r['speedup']:.2f}× | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def ceilings(device: torch.device) -> dict[str, float]:
    """The two measured ceilings (METHOD.md): device-to-device copy bandwidth and an 8192³ bf16 GEMM."""
    a = torch.randn(1 << 28, device=device, dtype=torch.bfloat16)  # 512 MiB
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a), device)
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: m @ m, device)
    return {"copy_tb_s": 2 * a.numel() * 2 / copy_ms / 1e9, "gemm_tflops": 2 * 8192**3 / gemm_ms / 1e9}


def _header(device: torch.device) -> str:
    from datetime import datetime, timezone

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"GPU: {name} · torch {torch.__version__} · triton {triton_version} · "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} (UTC)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench.layer", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="d_out x d_in")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--pattern", default="2of4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--skip-layers", action="store_true", help="only --tune / --semi")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-all", action="store_true", help="every fused candidate config, not the default")
    parser.add_argument("--tune-shapes", nargs="+", default=[f"{n}x{k}" for n, k in TUNE_SHAPES])
    parser.add_argument("--tune-tokens", type=int, nargs="+", default=list(TUNE_TOKENS))
    parser.add_argument("--semi", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=None, help="default results/efficiency/<gpu>")
    args = parser.parse_args(argv)

    from lorsbench.method import methods_package
    from lorsbench.runtime import resolve_device, torch_dtype

    methods_package()
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    out_dir = args.out_dir or Path("results/efficiency") / table.slug(
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    header = _header(device)
    report = [f"# Per-layer micro-benchmark\n\n{header}\n"]
    if device.type == "cuda":
        c = ceilings(device)
        report.append(f"Measured ceilings: device copy {c['copy_tb_s']:.2f} TB/s (read + write), "
                      f"bf16 8192³ GEMM {c['gemm_tflops']:.0f} TFLOP/s.\n")
        print(report[-1], flush=True)
    if args.tune:
        tune_shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.tune_shapes]
        rows, best = tune_rows(tune_shapes, args.tune_tokens, device, dtype, all_configs=args.tune_all)
        write_text_atomic(out_dir / "lors_kernel_tune.json", json.dumps({"rows": rows, "best": best}, indent=1))
        write_text_atomic(out_dir / "lors_tiles.json", json.dumps(best, indent=1))
        report.append("## Fused LoRS kernels (`methods/_lors_triton.py`) vs cuBLAS (dense W) and the unfused "
                      "torch path (W_eff built in memory), one GEMM each\n\n" + tune_markdown(rows))
        print(report[-1], flush=True)
    if args.semi:
        rows = semi_rows(shapes, args.tokens, device, dtype)
        write_text_atomic(out_dir / "semi_structured.json", json.dumps(rows, indent=1))
        report.append("## 2:4 semi-structured (`torch.sparse.to_sparse_semi_structured`) vs dense base GEMMs\n\n"
                      + semi_markdown(rows))
        print(report[-1], flush=True)
    if not args.skip_layers:
        rows = layer_rows(args.methods, shapes, args.tokens, args.pattern, device, dtype, args.rep_ms)
        csv_rows = [asdict(r) for r in rows]
        import csv

        with open(out_dir / "layer.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
            writer.writeheader()
            writer.writerows(csv_rows)
        report.append(layer_markdown(rows, "## fwd+bwd of one adapted linear (bf16, 2:4, r = 16, x requires grad)"))
        print(report[-1], flush=True)
    write_text_atomic(out_dir / "layer.md", "\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
