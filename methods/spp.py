"""`spp`: Sparsity-Preserved Parameter-efficient fine-tuning (Lu et al., ICML 2024; docs/methods.md §SPP).

`ΔW = (β 1ᵀ) ⊙ Rep(α) ⊙ W` with α (R×d_in, R = 16, kaiming-uniform) and β (d_out, zero); Rep repeats each row of α
d_out/R times consecutively (repeat_interleave). Forward `Y = X Wᵀ + b + s D(X) ΔWᵀ` (residual form of the
paper's Fig. 4), merge `W' = W ⊙ (1 + s β Rep(α))`: zero wherever W is zero, by construction.

Memory mode as the authors' default (§SPP memory forms): the adapter branch is recomputed in backward. `form=expanded`
uses a custom autograd function that saves only D(X), α, β (and a reference to W) and returns the exact gradients
(§SPP gradients); `form=grouped` computes the branch group by group without materialising Rep(α), under
`torch.utils.checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorsbench.config import ConfigError
from lorsbench.method import Method, MethodContext, register_method
from lorsbench.methods._adapter import (
    AdapterLinear, attach_adapters, kaiming_uniform, merge_adapters, merge_dtype, scaling_factor,
)
from lorsbench.modules import target_linears
from lorsbench.pruning.masks import MaskSet

FORMS = ("expanded", "grouped")


def spp_delta(weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """`ΔW = β ⊙ Rep(α) ⊙ W` (docs/methods.md §SPP), in the weight's dtype."""
    rows = alpha.shape[0]
    rep = alpha.to(weight.dtype).repeat_interleave(weight.shape[0] // rows, dim=0)
    return rep.mul_(beta.to(weight.dtype)[:, None]).mul_(weight)


class _SPPAdapter(torch.autograd.Function):
    """`s D(X) ΔWᵀ` saving only D(X), α, β and W (a reference); exact gradients of docs/methods.md §SPP gradients."""

    @staticmethod
    def forward(ctx, xd, weight, alpha, beta, scaling: float):
        delta = spp_delta(weight, alpha, beta).to(xd.dtype)
        out = F.linear(xd, delta).mul_(scaling)
        ctx.save_for_backward(xd, weight, alpha, beta)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd, weight, alpha, beta = ctx.saved_tensors
        need_x, _, need_alpha, need_beta, _ = ctx.needs_input_grad
        s, dtype = ctx.scaling, xd.dtype
        d_out, d_in = weight.shape
        rows = alpha.shape[0]
        dy = grad_out.reshape(-1, d_out).to(dtype)
        dx = d_alpha = d_beta = None
        if need_x:
            dx = (s * (dy @ spp_delta(weight, alpha, beta).to(dtype))).reshape(xd.shape)
        if need_alpha or need_beta:
            # P = G ⊙ W with G = dYᵀ D(X); dβ_i = s Σ_j P_ij Rep(α)_ij, dα_gj = s Σ_{i in g} P_ij β_i.
            p = (dy.t() @ xd.reshape(-1, d_in)).mul_(weight.to(dtype))
            if need_beta:
                rep = alpha.to(dtype).repeat_interleave(d_out // rows, dim=0)
                d_beta = (s * (p * rep).sum(1)).to(beta.dtype)
                del rep
            if need_alpha:
                d_alpha = (s * (p * beta.to(dtype)[:, None]).reshape(rows, d_out // rows, d_in).sum(1)).to(alpha.dtype)
        return dx, None, d_alpha, d_beta, None


def spp_adapter_expanded(xd, weight, alpha, beta, scaling: float) -> torch.Tensor:
    """Adapter branch `s D(X) ΔWᵀ` through the recomputing custom function."""
    return _SPPAdapter.apply(xd, weight, alpha, beta, float(scaling))


def spp_adapter_grouped(xd, weight, alpha, beta, scaling: float) -> torch.Tensor:
    """Same branch without Rep(α): for each row group g, `(D(X) ⊙ α_g) W_gᵀ`, then × β and s
    (docs/methods.md §SPP memory forms)."""
    rows = alpha.shape[0]
    size = weight.shape[0] // rows
    a = alpha.to(xd.dtype)
    parts = [F.linear(xd * a[g], weight[g * size:(g + 1) * size].to(xd.dtype)) for g in range(rows)]
    return torch.cat(parts, dim=-1) * beta.to(xd.dtype) * scaling


class SPPLinear(AdapterLinear):
    def __init__(self, base: nn.Linear, mask: torch.Tensor, rows: int, scaling: float, dropout: float,
                 form: str, generator: torch.Generator):
        super().__init__(base, mask, keep_mask=False)  # W ⊙ (1 + ...) keeps W's zeros without it
        if self.out_features % rows:
            raise ConfigError(f"spp needs d_out divisible by rows={rows}; this linear has d_out={self.out_features}")
        self.scaling = scaling
        self.form = form
        self.spp_alpha = nn.Parameter(kaiming_uniform((rows, self.in_features), generator))
        self.spp_beta = nn.Parameter(torch.zeros(self.out_features, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        xd = self.dropout(x)
        if self.form == "grouped":
            adapter = checkpoint(spp_adapter_grouped, xd, self.weight, self.spp_alpha, self.spp_beta, self.scaling,
                                 use_reentrant=False)
        else:
            adapter = spp_adapter_expanded(xd, self.weight, self.spp_alpha, self.spp_beta, self.scaling)
        return base + adapter

    def merged_weight(self) -> torch.Tensor:
        """`W' = W + s ΔW = W ⊙ (1 + s β Rep(α))` (docs/methods.md §SPP)."""
        dtype = merge_dtype(self.weight)
        weight = self.weight.to(dtype)
        return weight + self.scaling * spp_delta(weight, self.spp_alpha.to(dtype), self.spp_beta.to(dtype))


@register_method("spp")
class SPP(Method):
    preserves_sparsity = True

    @dataclass(frozen=True)
    class Config:
        rows: int = 16  # R: rows of α, hard-coded 16 in the authors' DiagonalLinear
        rank: int = 8  # only sets s = alpha / rank (the repo's lora_r); the adapter has `rows` rows
        alpha: float = 16.0
        scaling: str = "alpha_over_r"  # s = 16 / 8 = 2 at the authors' defaults
        dropout: float = 0.05  # applied to the adapter input only, as the repo
        form: str = "expanded"  # expanded (custom function) | grouped (checkpointed)
        targets: tuple[str, ...] | None = None  # None: the run's targets

        def __post_init__(self):
            scaling_factor(self.scaling, self.alpha, self.rank)
            if self.rows <= 0:
                raise ValueError(f"rows must be > 0, got {self.rows}")
            if self.form not in FORMS:
                raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**super().describe(), "scaling_value": scaling_factor(c.scaling, c.alpha, c.rank)}

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        s = scaling_factor(c.scaling, c.alpha, c.rank)
        targets = c.targets or ctx.targets
        for name, linear in target_linears(model, targets).items():  # fail before touching the model
            if linear.weight.shape[0] % c.rows:
                raise ConfigError(f"{name}: spp needs d_out divisible by rows={c.rows}; "
                                  f"this linear has d_out={linear.weight.shape[0]}")
        return attach_adapters(
            model, masks, targets,
            lambda name, linear, mask: SPPLinear(linear, mask, c.rows, s, c.dropout, c.form, ctx.generator),
        )

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)

