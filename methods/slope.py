"""`slope`: SLoPe as a fine-tuning method, frozen-base variant (docs/methods.md §SLoPe; Mozaffari et al., arXiv
2405.16325).

Frozen 2:4 base `W_s = W ⊙ M_R` (M_R = the stored mask, 2:4 along d_in), a column-wise 2:4 mask `M_C` of W_s
along d_out (groups of 4 consecutive output rows per input column, magnitude), and a low-rank adapter that
is never merged during training:
    forward   `Y = X W_sᵀ + b + s (D(X) Vᵀ) Uᵀ`
    backward  `dX = dY (W_s ⊙ M_C) + s (dY U) V` (double-pruned: only the base term is approximate),
              `dU = s dYᵀ (X Vᵀ)`, `dV = s (dY U)ᵀ X`; no dW.
`s = 1/r` (the repo's `(X L) R / r`), V ~ N(0, 1), U = 0, as the SLoPe code.

On CPU (or with `semi_structured=off`) the sparse GEMMs are dense GEMMs on masked weights. On CUDA,
`semi_structured=auto|on` runs the forward on `to_sparse_semi_structured(W_s)` and the backward on
`to_sparse_semi_structured((W_s ⊙ M_C)ᵀ)` (fp16/bf16, both dims multiples of 64).

Merge: SLoPe deploys the adapter beside the sparse weight; an HF model has no place for it, so `merge` returns
plain linears holding `W_s + s U V` — dense. `preserves_sparsity = False`, and the record says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.config import ConfigError, PatternConfig
from lorsbench.method import Method, MethodContext, register_method
from lorsbench.methods._adapter import AdapterLinear, attach_adapters, merge_adapters, merge_dtype, scaling_factor
from lorsbench.modules import target_linears
from lorsbench.pruning.masks import MaskSet, mask_from_scores, nm_valid

SEMI_STRUCTURED = ("auto", "on", "off")
_TWO_OF_FOUR = PatternConfig(name="2of4", n=2, m=4)
_SEMI_DTYPES = (torch.float16, torch.bfloat16)
_SEMI_MULTIPLE = 64  # both dims of W_s and W_dpᵀ: safe for the CUTLASS and cuSPARSELt backends


def column_mask(weight_s: torch.Tensor) -> torch.Tensor:
    """M_C: keep the 2 largest |W_s| of every 4 consecutive output rows, per input column
    (docs/methods.md §SLoPe masks)."""
    return mask_from_scores(weight_s.detach().abs().t(), 0.5, _TWO_OF_FOUR).t().contiguous()


class _SemiStructuredPair:
    """The compressed 2:4 forward weight W_s and backward weight W_dpᵀ (kept out of autograd's inputs)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, forward_weight: Any, backward_weight_t: Any):
        self.device, self.dtype = device, dtype
        self.forward_weight, self.backward_weight_t = forward_weight, backward_weight_t


class _DoublePrunedLinear(torch.autograd.Function):
    """`X W_sᵀ` forward, `dY W_dp` backward (W_dp = W_s ⊙ M_C); W gets no gradient (docs/methods.md §SLoPe backward)."""

    @staticmethod
    def forward(ctx, x, weight, mask_col, sparse: _SemiStructuredPair | None):
        ctx.save_for_backward(weight, mask_col)
        ctx.sparse = sparse
        if sparse is not None:
            return F.linear(x.reshape(-1, x.shape[-1]), sparse.forward_weight).reshape(*x.shape[:-1], -1)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight, mask_col = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.sparse is not None:
            dx = F.linear(dy, ctx.sparse.backward_weight_t)
        else:
            dx = dy @ (weight * mask_col).to(dy.dtype)
        return dx.reshape(*grad_out.shape[:-1], -1), None, None, None


class SLoPeLinear(AdapterLinear):
    def __init__(self, base: nn.Linear, mask: torch.Tensor, rank: int, scaling: float, dropout: float,
                 semi_structured: str, generator: torch.Generator):
        super().__init__(base, mask)
        self.scaling = scaling
        self.semi_structured = semi_structured
        self.register_buffer("mask_col", column_mask(self.weight * self.mask), persistent=False)
        self.lora_U = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))
        self.lora_V = nn.Parameter(torch.randn(rank, self.in_features, generator=generator, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._sparse: _SemiStructuredPair | None = None

    def double_pruned_weight(self) -> torch.Tensor:
        """`W_dp = W ⊙ M_R ⊙ M_C`: the weight the backward multiplies dY with."""
        return self.weight * self.mask * self.mask_col

    def _use_semi_structured(self, x: torch.Tensor) -> bool:
        if self.semi_structured == "off":
            return False
        reasons = []
        if not x.is_cuda:
            reasons.append("the input is not on a CUDA device")
        if x.dtype not in _SEMI_DTYPES:
            reasons.append(f"dtype {x.dtype} is not float16/bfloat16")
        if self.in_features % _SEMI_MULTIPLE or self.out_features % _SEMI_MULTIPLE:
            reasons.append(f"shape {self.out_features}x{self.in_features} is not a multiple of {_SEMI_MULTIPLE}")
        if reasons and self.semi_structured == "on":
            raise ConfigError(f"slope semi_structured=on cannot run: {'; '.join(reasons)} (use auto or off)")
        return not reasons

    def _sparse_weights(self, x: torch.Tensor) -> _SemiStructuredPair:
        if self._sparse is None or (self._sparse.device, self._sparse.dtype) != (x.device, x.dtype):
            from torch.sparse import to_sparse_semi_structured

            w_s = (self.weight * self.mask).to(x.dtype)
            w_dp_t = (w_s * self.mask_col).t().contiguous()
            self._sparse = _SemiStructuredPair(x.device, x.dtype, to_sparse_semi_structured(w_s),
                                               to_sparse_semi_structured(w_dp_t))
        return self._sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = self._sparse_weights(x) if self._use_semi_structured(x) else None
        base = _DoublePrunedLinear.apply(x, self.weight, self.mask_col, sparse)
        if self.bias is not None:
            base = base + self.bias.to(x.dtype)
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_V.to(x.dtype)), self.lora_U.to(x.dtype))
        return base + self.scaling * low_rank

    def merged_weight(self) -> torch.Tensor:
        """`W_s + s U V`: dense (SLoPe keeps its adapter unmerged; a plain HF linear cannot)."""
        dtype = merge_dtype(self.weight)
        return self.weight.to(dtype) + self.scaling * (self.lora_U.to(dtype) @ self.lora_V.to(dtype))


@register_method("slope")
class SLoPe(Method):
    preserves_sparsity = False  # the base stays 2:4 during training; the merged HF model is dense
    required_pattern = (2, 4)  # checked at the config edge, before the model loads

    @dataclass(frozen=True)
    class Config:
        rank: int = 16
        alpha: float = 1.0
        scaling: str = "alpha_over_r"  # s = 1 / r, as the repo's (X L) R / r
        dropout: float = 0.0
        semi_structured: str = "auto"  # auto (CUDA + fp16/bf16 + shapes allow) | on | off (masked dense GEMMs)
        targets: tuple[str, ...] | None = None  # None: the run's targets

        def __post_init__(self):
            scaling_factor(self.scaling, self.alpha, self.rank)
            if self.rank <= 0:
                raise ValueError(f"rank must be > 0, got {self.rank}")
            if self.semi_structured not in SEMI_STRUCTURED:
                raise ValueError(f"semi_structured must be one of {', '.join(SEMI_STRUCTURED)}, "
                                 f"got {self.semi_structured!r}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**super().describe(), "scaling_value": scaling_factor(c.scaling, c.alpha, c.rank),
                "merge": "dense: W_s + s U V (SLoPe deploys the adapter unmerged beside the 2:4 weight)",
                "backward": "double-pruned dX = dY (W_s ⊙ M_C)"}

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        targets = c.targets or ctx.targets
        for name, linear in target_linears(model, targets).items():
            mask = masks.get(name)
            d_out, d_in = linear.weight.shape
            if mask is None:
                continue  # attach_adapters reports the missing mask
            if d_in % 4 or d_out % 4 or not nm_valid(mask, 2, 4):
                raise ConfigError(
                    f"slope needs pattern=2of4: the stored mask of {name} ({d_out}x{d_in}) is not 2:4 along the "
                    "input dimension (and both dimensions must be multiples of 4)"
                )
        s = scaling_factor(c.scaling, c.alpha, c.rank)
        return attach_adapters(
            model, masks, targets,
            lambda name, linear, mask: SLoPeLinear(linear, mask, c.rank, s, c.dropout, c.semi_structured,
                                                   ctx.generator),
        )

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)
