"""Per-layer micro-benchmark: forward + backward of ONE adapted linear, built by each method's own `attach`
(docs/measurement.md §Per-layer benchmark: bf16, 2:4 magnitude mask, r = 16, x requires grad so dX is computed).

    python -m lorsbench.bench.layer                       # methods × shapes × T: median ms, peak extra MiB
    python -m lorsbench.bench.layer --tune                # every method's kernel tuner (Method.kernel_tuner)
    python -m lorsbench.bench.layer --semi                # 2:4 semi-structured base GEMMs vs dense

Each layer is built like a benchmark cell: its config composed by Hydra (`experiment=bench`, `targets=[proj]`),
pruned through `lorsbench.pruning` (masks on the device), the method attached through the registry.
Shapes are d_out × d_in. `dense` is the frozen base alone (the two GEMMs every method pays). Time: median of
`triton.testing.do_bench` (CUDA events, L2 flushed between repeats); memory: `max_memory_allocated` during one
fwd+bwd minus what was allocated before it (outputs, gradients and transients).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.bench import table
from lorsbench.records import write_text_atomic
from lorsbench.report.document import Table, table_markdown

SHAPES = ((4096, 4096), (14336, 4096))
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
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
    from lorsbench.bench.cell import CellSpec, compose_cell
    from lorsbench.method import MethodContext, build_method
    from lorsbench.pruning import build_pruner

    cfg = compose_cell(CellSpec(method="none" if method == "dense" else method, pattern=pattern_name, rank=rank,
                                seed=seed, device=str(device), dtype=str(dtype).removeprefix("torch."),
                                overrides=("targets=[proj]",)))
    torch.manual_seed(seed)
    holder = _Holder(d_out, d_in).to(device=device, dtype=dtype)
    with torch.no_grad():
        holder.layers[0].proj.weight.normal_(0, 0.02)
    masks = build_pruner(cfg.pruning).prune(holder, None, keep_on_device=True)
    if method == "dense":
        holder.requires_grad_(False)
        return holder.layers[0].proj, []
    ctx = MethodContext(targets=cfg.pruning.targets, device=device, dtype=dtype,
                        generator=torch.Generator().manual_seed(seed))
    params = build_method(cfg.method).attach(holder, masks, ctx)
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
        body = []
        for method in dict.fromkeys(r.method for r in rows):
            cells = []
            for t in tokens:
                r = next((r for r in rows if (r.method, r.d_out, r.d_in, r.tokens) == (method, d_out, d_in, t)), None)
                if r is None:
                    cells.append("")
                elif r.status != "ok":
                    cells.append(f"**{r.status.upper()}**")
                else:
                    ratio = f" ({r.vs_lora:.2f})" if r.vs_lora else ""
                    mem = f" / {r.peak_extra_mib:.0f}" if r.peak_extra_mib is not None else ""
                    cells.append(f"{r.ms_median:.3f}{ratio}{mem}")
            body.append([f"`{method}`", *cells])
        lines += [f"### d_out × d_in = {d_out} × {d_in}: fwd+bwd median ms (× lora) / peak extra MiB", "",
                  table_markdown(Table(["method", *(f"T={t}" for t in tokens)], body)), ""]
    return "\n".join(lines)


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
    body = []
    for r in rows:
        if "error" in r:
            body.append([f"{r['N']}×{r['K']}", str(r["T"]), r["gemm"], f"error: {r['error']}", "", "", ""])
        else:
            body.append([f"{r['N']}×{r['K']}", str(r["T"]), r["gemm"], f"{r['dense_ms']:.4f}", f"{r['sparse_ms']:.4f}",
                         f"{r['speedup']:.2f}×", f"{r['rel_err']:.1e}"])
    return table_markdown(Table(["N×K", "T", "GEMM", "dense ms", "2:4 sparse ms", "speed-up", "rel. diff"], body)) + "\n"


def ceilings(device: torch.device) -> dict[str, float]:
    """The two measured ceilings: device-to-device copy bandwidth and an 8192³ bf16 GEMM."""
    from lorsbench.bench.flops import gemm_tflops

    a = torch.randn(1 << 28, device=device, dtype=torch.bfloat16)  # 512 MiB
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a), device)
    return {"copy_tb_s": 2 * a.numel() * 2 / copy_ms / 1e9, "gemm_tflops": gemm_tflops(device)}


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
    parser.add_argument("--tune", action="store_true", help="run every method's kernel tuner (Method.kernel_tuner)")
    parser.add_argument("--tune-all", action="store_true", help="every candidate config, not the default")
    parser.add_argument("--tune-shapes", nargs="+", default=None, help="d_out x d_in; default: the tuner's")
    parser.add_argument("--tune-tokens", type=int, nargs="+", default=None, help="default: the tuner's")
    parser.add_argument("--semi", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=None, help="default <paths.output_root>/bench/<gpu>")
    args = parser.parse_args(argv)

    from lorsbench.bench.cell import output_root
    from lorsbench.method import kernel_tuners, methods_package
    from lorsbench.runtime import device_name, resolve_device, torch_dtype

    methods_package()
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    shapes = [_shape(s) for s in args.shapes]
    out_dir = args.out_dir or output_root() / "bench" / table.slug(device_name(device))
    header = _header(device)
    report = [f"# Per-layer micro-benchmark\n\n{header}\n"]
    if device.type == "cuda":
        c = ceilings(device)
        report.append(f"Measured ceilings: device copy {c['copy_tb_s']:.2f} TB/s (read + write), "
                      f"bf16 8192³ GEMM {c['gemm_tflops']:.0f} TFLOP/s.\n")
        print(report[-1], flush=True)
    if args.tune:
        options = {"all_configs": args.tune_all}
        if args.tune_shapes:
            options["shapes"] = [_shape(s) for s in args.tune_shapes]
        if args.tune_tokens:
            options["tokens"] = args.tune_tokens
        for tuner in kernel_tuners().values():
            tuning = tuner(device, dtype, lambda fn: median_ms(fn, device, rep_ms=60), **options)
            for file, payload in tuning.files.items():
                write_text_atomic(out_dir / file, json.dumps(payload, indent=1))
            report.append(tuning.markdown)
            print(report[-1], flush=True)
    if args.semi:
        rows = semi_rows(shapes, args.tokens, device, dtype)
        write_text_atomic(out_dir / "semi_structured.json", json.dumps(rows, indent=1))
        report.append("## 2:4 semi-structured (`torch.sparse.to_sparse_semi_structured`) vs dense base GEMMs\n\n"
                      + semi_markdown(rows))
        print(report[-1], flush=True)
    if not args.skip_layers:
        rows = layer_rows(args.methods, shapes, args.tokens, args.pattern, device, dtype, args.rep_ms)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(LayerRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
        write_text_atomic(out_dir / "layer.csv", buffer.getvalue())
        report.append(layer_markdown(rows, "## fwd+bwd of one adapted linear (bf16, 2:4, r = 16, x requires grad)"))
        print(report[-1], flush=True)
    write_text_atomic(out_dir / "layer.md", "\n".join(report))
    print(f"[layer] wrote {out_dir}/layer.md")
    return 0


def _shape(text: str) -> tuple[int, int]:
    return tuple(int(v) for v in text.lower().split("x"))


if __name__ == "__main__":
    sys.exit(main())
