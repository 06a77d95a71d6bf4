"""`none`: the pruned model without fine-tuning (the pruned-only reference row)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorsbench.registry import Method, MethodContext, register_method
from lorsbench.pruning.masks import MaskSet


@register_method("none")
class NoFineTuning(Method):
    preserves_sparsity = True
    report_order = 0
    trains = False

    @dataclass(frozen=True)
    class Config:
        pass

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        for param in model.parameters():
            param.requires_grad_(False)
        return []

    def merge(self, model: nn.Module) -> nn.Module:
        return model
