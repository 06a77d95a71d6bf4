"""Tuning the LoRS GPU kernels (`methods/_lors_triton.py`): every candidate tile configuration of the fused
W_eff GEMMs and the one-pass W_eff builder, timed against cuBLAS on the dense W and the unfused torch path
(docs/measurement.md §Per-layer benchmark). Exposed to the benchmark as `LoRSBase.kernel_tuner`
(`lorsbench.method.kernel_tuners`), so `python -m lorsbench.bench.layer --tune` names no method.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from lorsbench.methods import _lors_triton as lt
from lorsbench.methods._lors import _effective_weight

from lorsbench.report.document import Table, table_markdown

TimeMs = Callable[[Callable[[], object]], float]  # median ms of a callable (the benchmark's timer)
BUILD_CANDIDATES = ((64, 128, 4), (128, 128, 8), (64, 256, 4), (32, 256, 4), (128, 64, 4))
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # every Llama-3-8B projection
TOKENS = (512, 1024, 2048, 8192)


@dataclass
class KernelTuning:
    """What a tuning run found: every timed row, the best fused entry per (kind, N, K, T) (the format of
    `LORSBENCH_LORS_TILES`), and the Markdown summary."""

    rows: list[dict]
    best: list[dict]
    markdown: str
    files: dict[str, object]  # file name -> JSON payload the benchmark writes beside its tables


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


def tune_rows(shapes, tokens, device, dtype, time_ms: TimeMs, scaling: float = 4.0,
              all_configs: bool = False) -> tuple[list[dict], list[dict]]:
    """Time both Triton paths per GEMM against cuBLAS on the dense W and the unfused torch path: the one-pass
    W_eff builder (each block candidate, at the first T: it does not depend on T) + cuBLAS, and the fused GEMMs
    (their default config, or every candidate with `all_configs`). Only outputs that match the reference are
    timed. Returns (all rows, the best fused entry per (kind, N, K, T))."""
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
                ("fwd", "triton_build+cublas"): lambda: lt.forward("triton", x, w, u, v, mask, scaling),
                ("dx", "triton_build+cublas"): lambda: lt.grad_input("triton", dy, w, u, v, mask, scaling),
            }
            for (kind, label), fn in timings.items():
                ms = time_ms(fn)
                out = fn()
                ref = y_ref if kind == "fwd" else dx_ref
                err = 0.0 if label == "cublas_dense" else float((out.float() - ref.float()).norm() / ref.float().norm())
                rows.append({**base, "kind": kind, "config": label, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
            if t == tokens[0]:
                for blocks in BUILD_CANDIDATES:
                    built = lt.build_weff(w, u, v, mask, scaling, blocks=blocks)
                    ok = (bool((built[~mask] == 0).all())
                          and float((built.float() - w_eff.float()).abs().max()) <= float(w_eff.float().abs().max()) * 2**-7)
                    ms = time_ms(lambda blocks=blocks: lt.build_weff(w, u, v, mask, scaling, blocks=blocks))
                    rows.append({**base, "kind": "build", "config": "n{}k{}w{}".format(*blocks), "ms": ms,
                                 "tb_s": n * k * 5 / ms / 1e9, "ok": ok})
                    print(f"[tune] build {n}x{k} {blocks}: {ms:.4f} ms ({n * k * 5 / ms / 1e9:.2f} TB/s) ok={ok}",
                          flush=True)
                ms = time_ms(lambda: _effective_weight(w, u, v, mask, scaling))
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
                            row["ms"] = time_ms(fn)
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


def _ratio(value, base) -> str:
    return f"{value / base:.2f}" if value and base else "–"


def tune_markdown(rows: list[dict]) -> str:
    """Per GEMM: cuBLAS dense, unfused torch, Triton build + cuBLAS, best fused (its config), ratios; then the
    W_eff builder alone."""
    body = []
    for kind, n, k, t in dict.fromkeys((r["kind"], r["N"], r["K"], r["T"]) for r in rows if r["kind"] != "build"):
        group = [r for r in rows if (r["kind"], r["N"], r["K"], r["T"]) == (kind, n, k, t)]
        by_label = {r["config"]: r.get("ms") for r in group}
        dense, unfused = by_label.get("cublas_dense"), by_label.get("torch_unfused")
        build = by_label.get("triton_build+cublas")
        fused = [r for r in group if r["config"] not in ("cublas_dense", "torch_unfused", "triton_build+cublas")
                 and r.get("ms")]
        top = min(fused, key=lambda r: r["ms"]) if fused else None
        body.append([kind, f"{n}×{k}", str(t), f"{dense:.4f}", f"{unfused:.4f}", f"{build:.4f}",
                     f"{top['ms']:.4f} ({top['config']})" if top else "none correct",
                     _ratio(top and top["ms"], dense), _ratio(top and top["ms"], unfused)])
    text = table_markdown(Table(["kind", "N×K", "T", "cuBLAS dense ms", "unfused torch ms", "triton build + cuBLAS ms",
                                 "best fused ms (config)", "fused / dense", "fused / unfused"], body))
    builds = [r for r in rows if r["kind"] == "build"]
    if builds:
        text += ("\n\nW_eff construction alone (bytes: W 2 + mask 1 + out 2 per element for the Triton pass; "
                 "addmm + mul_ moves 9):\n\n" + table_markdown(Table(
                     ["N×K", "config", "ms", "effective TB/s", "matches addmm+mask"],
                     [[f"{r['N']}×{r['K']}", r["config"], f"{r['ms']:.4f}", f"{r['tb_s']:.2f}", str(r["ok"])]
                      for r in builds])))
    return text + "\n"


def tune(device: torch.device, dtype: torch.dtype, time_ms: TimeMs, shapes=SHAPES, tokens=TOKENS,
         all_configs: bool = False) -> KernelTuning:
    """The kernel tuner the registry exposes (`LoRSBase.kernel_tuner`)."""
    rows, best = tune_rows(shapes, tokens, device, dtype, time_ms, all_configs=all_configs)
    markdown = ("## Fused LoRS kernels (`methods/_lors_triton.py`) vs cuBLAS (dense W) and the unfused torch path "
                "(W_eff built in memory), one GEMM each\n\n" + tune_markdown(rows))
    return KernelTuning(rows, best, markdown, {"lors_kernel_tune.json": {"rows": rows, "best": best},
                                               "lors_tiles.json": best})
