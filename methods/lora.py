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

from lorsbench.methods._adapter import (
    AdapterLinear, AdapterMethod, LowRankDropoutConfig, attach_adapters, lora_factors, merge_dtype,
)
from lorsbench.registry import MethodContext, register_method
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
class LoRA(AdapterMethod):
    preserves_sparsity = False
    report_order = 10

    @dataclass(frozen=True)
    class Config(LowRankDropoutConfig):  # rank 16, alpha 32: s = 2
        merge: str = "dense"  # dense | remask

        def __post_init__(self):
            super().__post_init__()
            if self.merge not in ("dense", "remask"):
                raise ValueError(f"merge must be dense or remask, got {self.merge!r}")

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        s = c.scaling_value
        return attach_adapters(
            model, masks, self.target_names(ctx),
            lambda name, linear, mask: LoRALinear(linear, mask, c.rank, s, c.dropout, c.merge == "remask", ctx.generator),
        )
