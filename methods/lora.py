"""`lora`: plain LoRA on the frozen pruned base (Hu et al. 2021, Sec. 4.1; docs/methods.md §LoRA).

Forward `Y = X Wᵀ + s (D(X) Vᵀ) Uᵀ`. The merge `W + s U V` is dense (docs/methods.md §Merge and sparsity): LoRA is the
baseline that does not preserve sparsity. `merge="remask"` re-applies the stored mask after merging, so the deployed
model is sparse but differs from the trained one by `s (U V) ⊙ (1 - M)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.method import Method, MethodContext, register_method
from lorsbench.methods._adapter import (
    AdapterLinear, attach_adapters, lora_factors, merge_adapters, merge_dtype, scaling_factor,
)
from lorsbench.pruning.masks import MaskSet


class LoRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, mask: torch.Tensor, rank: int, scaling: float, dropout: float,
                 remask: bool, generator: torch.Generator):
        super().__init__(base, mask, keep_mask=False)  # training never reads it
        self.scaling = scaling
        self.remask = remask
        # merge=remask needs the mask once, at merge: a host copy, so training holds no mask on the device
        self.merge_mask = mask.to("cpu", torch.bool) if remask else None
        self.lora_U, self.lora_V = lora_factors(self.out_features, self.in_features, rank, generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_V.to(x.dtype)), self.lora_U.to(x.dtype))
        return base + self.scaling * low_rank

    def merged_weight(self) -> torch.Tensor:
        dtype = merge_dtype(self.weight)
        merged = self.weight.to(dtype) + self.scaling * (self.lora_U.to(dtype) @ self.lora_V.to(dtype))
        return merged * self.merge_mask.to(merged.device) if self.remask else merged


@register_method("lora")
class LoRA(Method):
    preserves_sparsity = False

    @dataclass(frozen=True)
    class Config:
        rank: int = 8
        alpha: float = 16.0
        scaling: str = "alpha_over_r"
        dropout: float = 0.0
        targets: tuple[str, ...] | None = None  # None: the run's targets
        merge: str = "dense"  # dense | remask

        def __post_init__(self):
            scaling_factor(self.scaling, self.alpha, self.rank)
            if self.merge not in ("dense", "remask"):
                raise ValueError(f"merge must be dense or remask, got {self.merge!r}")
            if self.rank <= 0:
                raise ValueError(f"rank must be > 0, got {self.rank}")

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        s = scaling_factor(c.scaling, c.alpha, c.rank)
        return attach_adapters(
            model, masks, c.targets or ctx.targets,
            lambda name, linear, mask: LoRALinear(linear, mask, c.rank, s, c.dropout, c.merge == "remask", ctx.generator),
        )

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)
