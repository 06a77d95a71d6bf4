"""The FLOP floor of a training step: the GEMM work the step cannot avoid, over the GPU's measured GEMM rate
(docs/measurement.md §FLOP floor; issue 13 item 4).

Counted per step of `tokens = batch × seq_len` (multiply-add = 2 FLOPs):
- every adapted (frozen) linear d_out × d_in: forward `X Wᵀ` and the input gradient `dY W` (no weight gradient):
  `4 · tokens · d_out · d_in`;
- the frozen lm_head (vocab × hidden) the same way;
- a rank-r adapter on each adapted linear (`X Aᵀ`, `(XAᵀ) Bᵀ` forward; `dB`, `d(XAᵀ)`, `dA`, its dX share
  backward): `6 · tokens · r · (d_in + d_out)`;
- causal attention (flash kernels skip the masked half): `QKᵀ` and `PV` forward `2 · batch · T² · width` per
  layer, backward twice that: `6 · batch · T² · width` per layer (width = heads × head_dim).
Element-wise work, norms, the optimizer and W_eff builds are not counted: the floor is a lower bound on time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepShapes:
    """The GEMM shapes of a decoder LM's training step."""

    linears: tuple[tuple[int, int], ...]  # (d_out, d_in) of every adapted target linear, all layers
    lm_head: tuple[int, int]  # (vocab, hidden)
    attention_layers: int
    attention_width: int  # query heads × head_dim


def model_shapes(model: nn.Module, targets: tuple[str, ...]) -> StepShapes:
    """The shapes of `model` (an HF causal LM) before any adapter is attached."""
    from lorsbench.modules import target_linears

    linears = tuple(tuple(m.weight.shape) for m in target_linears(model, targets).values())
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    head = model.get_output_embeddings().weight
    return StepShapes(linears=linears, lm_head=(int(head.shape[0]), int(head.shape[1])),
                      attention_layers=int(config.num_hidden_layers),
                      attention_width=int(config.num_attention_heads * head_dim))


def step_flops(shapes: StepShapes, batch_size: int, seq_len: int, rank: int) -> float:
    """Forward + backward GEMM FLOPs of one step (the module docstring's count)."""
    tokens = batch_size * seq_len
    base = sum(4 * tokens * d_out * d_in for d_out, d_in in shapes.linears)
    head = 4 * tokens * shapes.lm_head[0] * shapes.lm_head[1]
    adapters = sum(6 * tokens * rank * (d_out + d_in) for d_out, d_in in shapes.linears)
    attention = 6 * shapes.attention_layers * batch_size * seq_len**2 * shapes.attention_width
    return float(base + head + adapters + attention)


def gemm_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Measured dense GEMM rate (TFLOP/s) of an n³ matmul in `dtype` on `device`: the floor's denominator."""
    from lorsbench.profiling import synchronize

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=out)
    synchronize(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - start) / 1e12


def floor_ms(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) * 1e3
