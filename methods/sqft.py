"""`sqft`: SQFT SparsePEFT, with QA-SparsePEFT and NLS options (Munoz et al., EMNLP Findings 2024;
docs/methods.md §SQFT).

SparsePEFT, as published: `Y = X Wᵀ + b + D(X) ((s U V) ⊙ M)ᵀ`, a second GEMM with the materialised
masked delta and plain autograd (its memory and time cost is the point of comparison). Merge
`W' = W + (s U V) ⊙ M` is exactly zero where the stored mask is.

`quantize=int4` (QA-SparsePEFT, §SQFT QA-SparsePEFT): per-group (along d_in) asymmetric INT4 scales and integer zero
points are computed once from the sparse base (round-to-nearest min-max; SQFT takes them from a GPTQ model, which this
harness does not build). Forward `Y = D(X) Q(W_m)ᵀ + b`, `W_m = W + (s U V) ⊙ M`, with a straight-through
estimator. Zeros survive because the zero point is an integer. Merge puts the dequantized `Q(W_m)` in the model
(bit-equal to the training forward's) and keeps the packed INT4 form in `SQFT.packed_int4`.

`nls=true` (§SQFT NLS): a super-adapter of rank `rank`; in every training forward each decoder layer draws a rank
from `nls_space`, shared by its `nls_targets` modules, which use `U[:, :ρ]`, `V[:ρ]` (scaling stays α/rank).
Evaluation and merge use the heuristic sub-adapter `nls_space[(len - 1) // 2]`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.method import Method, MethodContext, register_method
from lorsbench.methods._adapter import (
    AdapterLinear, attach_adapters, lora_factors, merge_adapters, merge_dtype, scaling_factor,
)
from lorsbench.modules import decoder_layers
from lorsbench.pruning.masks import MaskSet

QUANTIZE = ("none", "int4")
INT4_MAX = 15


def _expand(per_group: torch.Tensor, group_size: int, d_in: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=1)[:, :d_in]


def int4_params(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric INT4 scales and integer zero points per (output row, group of `group_size` input columns).

    Min-max with the range widened to include 0 (as the GPTQ quantizer), so every zero weight maps to the
    integer zero point and dequantizes to exactly 0. A ragged last group is allowed.
    """
    d_out, d_in = weight.shape
    n_groups = math.ceil(d_in / group_size)
    padded = F.pad(weight, (0, n_groups * group_size - d_in)).reshape(d_out, n_groups, group_size)
    low = padded.amin(-1).clamp(max=0)
    high = padded.amax(-1).clamp(min=0)
    empty = (low == 0) & (high == 0)
    low = torch.where(empty, -torch.ones_like(low), low)
    high = torch.where(empty, torch.ones_like(high), high)
    scales = (high - low) / INT4_MAX
    zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    return scales, zeros


def int4_quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`q = clamp(round(W / scale) + zero, 0, 15)` and `Q(W) = scale (q - zero)`
    (docs/methods.md §SQFT QA-SparsePEFT)."""
    d_in = weight.shape[1]
    scale_e, zero_e = _expand(scales, group_size, d_in), _expand(zeros, group_size, d_in)
    q = torch.clamp(torch.round(weight / scale_e) + zero_e, 0, INT4_MAX)
    return q, scale_e * (q - zero_e)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward `Q(W_m)` exactly; backward passes the gradient through as if Q were the identity (STE)."""

    @staticmethod
    def forward(ctx, w_m, scales, zeros, group_size: int):
        return int4_quantize(w_m, scales, zeros, group_size)[1]

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


@dataclass(frozen=True)
class PackedInt4:
    """A merged QA-SparsePEFT weight as INT4: two 4-bit codes per byte (even column in the low nibble)."""

    qweight: torch.Tensor  # uint8, d_out x ceil(d_in / 2)
    scales: torch.Tensor  # d_out x n_groups
    zeros: torch.Tensor  # uint8, d_out x n_groups
    group_size: int
    in_features: int

    @classmethod
    def pack(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> "PackedInt4":
        d_out, d_in = q.shape
        codes = F.pad(q.to(torch.uint8), (0, d_in % 2)).reshape(d_out, -1, 2)
        packed = codes[..., 0] | (codes[..., 1] << 4)
        return cls(packed.contiguous(), scales.detach().clone(), zeros.to(torch.uint8), group_size, d_in)

    def codes(self) -> torch.Tensor:
        low, high = self.qweight & 0x0F, self.qweight >> 4
        return torch.stack((low, high), dim=-1).reshape(self.qweight.shape[0], -1)[:, :self.in_features]

    def dequantize(self) -> torch.Tensor:
        """`scale (q - zero)` in the scales' dtype; bit-equal to the training forward's Q(W_m)."""
        dtype = self.scales.dtype
        q = self.codes().to(dtype)
        return _expand(self.scales, self.group_size, self.in_features) * (
            q - _expand(self.zeros.to(dtype), self.group_size, self.in_features))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


class SQFTLinear(AdapterLinear):
    def __init__(self, base: nn.Linear, mask: torch.Tensor, rank: int, scaling: float, dropout: float,
                 quantize: str, group_size: int, merge_rank: int, generator: torch.Generator):
        super().__init__(base, mask)
        self.rank = rank
        self.scaling = scaling
        self.quantize = quantize
        self.group_size = group_size
        self.active_rank = rank  # set per training forward by the NLS layer hook
        self.merge_rank = merge_rank  # rank used in eval mode and at merge (NLS heuristic sub-adapter)
        self.lora_U, self.lora_V = lora_factors(self.out_features, self.in_features, rank, generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if quantize == "int4":
            scales, zeros = int4_params(self.weight.detach().to(merge_dtype(self.weight)), group_size)
            self.register_buffer("quant_scales", scales, persistent=False)
            self.register_buffer("quant_zeros", zeros, persistent=False)

    def _factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_U[:, :rank].to(dtype), self.lora_V[:rank].to(dtype)

    def _merged_fp(self, rank: int) -> torch.Tensor:
        """`W_m = W + (s U V) ⊙ M` in the merge dtype (float32, float64 for float64 weights)."""
        dtype = merge_dtype(self.weight)
        U, V = self._factors(rank, dtype)
        return self.weight.to(dtype) + (self.scaling * (U @ V)) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.active_rank if self.training else self.merge_rank
        if self.quantize == "int4":
            w_q = _FakeQuantSTE.apply(self._merged_fp(rank), self.quant_scales, self.quant_zeros, self.group_size)
            return F.linear(self.dropout(x), w_q.to(x.dtype), self.bias)
        U, V = self._factors(rank, x.dtype)
        delta = (self.scaling * (U @ V)) * self.mask
        return F.linear(x, self.weight, self.bias) + F.linear(self.dropout(x), delta)

    def merged_weight(self) -> torch.Tensor:
        w_m = self._merged_fp(self.merge_rank)
        if self.quantize == "int4":
            return int4_quantize(w_m, self.quant_scales, self.quant_zeros, self.group_size)[1]
        return w_m

    def pack_int4(self) -> PackedInt4:
        q, _ = int4_quantize(self._merged_fp(self.merge_rank), self.quant_scales, self.quant_zeros, self.group_size)
        return PackedInt4.pack(q, self.quant_scales, self.quant_zeros, self.group_size)


def _sample_layer_rank(modules: list[SQFTLinear], space: tuple[int, ...], rng: random.Random,
                       layer: nn.Module, args: Any) -> None:
    """NLS: one rank per decoder layer per training forward, shared by its elastic modules
    (docs/methods.md §SQFT NLS)."""
    if layer.training:
        rank = rng.choice(space)
        for module in modules:
            module.active_rank = rank


@register_method("sqft")
class SQFT(Method):
    preserves_sparsity = True

    @dataclass(frozen=True)
    class Config:
        rank: int = 32  # r_max of the super-adapter when nls=true
        alpha: float = 64.0
        scaling: str = "alpha_over_r"  # s = 64 / 32 = 2 (SQFT runs)
        dropout: float = 0.1
        quantize: str = "none"  # none | int4 (QA-SparsePEFT)
        quant_group_size: int = 128  # input columns per INT4 scale/zero (HF GPTQConfig default)
        nls: bool = False
        nls_space: tuple[int, ...] = (32, 24, 16)
        nls_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
        targets: tuple[str, ...] | None = None  # None: the run's targets

        def __post_init__(self):
            scaling_factor(self.scaling, self.alpha, self.rank)
            if self.rank <= 0:
                raise ValueError(f"rank must be > 0, got {self.rank}")
            if self.quantize not in QUANTIZE:
                raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
            if self.quant_group_size <= 0:
                raise ValueError(f"quant_group_size must be > 0, got {self.quant_group_size}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
            if self.nls:
                if not self.nls_space or any(not 0 < r <= self.rank for r in self.nls_space):
                    raise ValueError(
                        f"nls_space {list(self.nls_space)} must be non-empty ranks in [1, rank={self.rank}]")

        @property
        def nls_merge_rank(self) -> int:
            """SQFT's heuristic sub-adapter: the median element `space[(len - 1) // 2]`."""
            return self.nls_space[(len(self.nls_space) - 1) // 2]

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.packed_int4: dict[str, PackedInt4] = {}
        self._hooks: list[Any] = []

    def describe(self) -> dict[str, Any]:
        c = self.config
        described = {**super().describe(), "scaling_value": scaling_factor(c.scaling, c.alpha, c.rank)}
        if c.quantize == "int4":
            described["quant_scheme"] = "int4 asymmetric per-group min-max (RTN) from the sparse base, STE"
        if c.nls:
            described["nls_merge_rank"] = c.nls_merge_rank
        return described

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        s = scaling_factor(c.scaling, c.alpha, c.rank)

        def make(name: str, linear: nn.Linear, mask: torch.Tensor) -> SQFTLinear:
            elastic = c.nls and name.rsplit(".", 1)[-1] in c.nls_targets
            return SQFTLinear(linear, mask, c.rank, s, c.dropout, c.quantize, c.quant_group_size,
                              c.nls_merge_rank if elastic else c.rank, ctx.generator)

        trainable = attach_adapters(model, masks, c.targets or ctx.targets, make)
        if c.nls:
            rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
            for layer in decoder_layers(model):
                elastic = [m for n, m in layer.named_modules()
                           if isinstance(m, SQFTLinear) and n.rsplit(".", 1)[-1] in c.nls_targets]
                if elastic:
                    hook = partial(_sample_layer_rank, elastic, tuple(c.nls_space), rng)
                    self._hooks.append(layer.register_forward_pre_hook(hook))
                    # a CUDA graph would replay the ranks drawn at capture (lorsbench/training.py)
                    layer.cuda_graph_unsupported = "NLS draws each layer's rank on the host every forward"
        return trainable

    def merge(self, model: nn.Module) -> nn.Module:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.config.quantize == "int4":
            self.packed_int4 = {name: m.pack_int4() for name, m in model.named_modules() if isinstance(m, SQFTLinear)}
        return merge_adapters(model)
