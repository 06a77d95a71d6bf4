"""`full_sparse_ft`: full fine-tuning of the pruned target linears on their fixed stored mask (the upper anchor of
the efficiency benchmark, issue 5; docs/methods.md §Full sparse fine-tuning).

Every target weight is trained; its gradient is multiplied by the stored keep-mask (a tensor hook), so pruned
weights get zero gradient, zero Adam moments and hence zero updates (decoupled weight decay only scales
weights, so zeros stay zero): the model stays exactly as sparse as the mask. Everything else (embeddings, norms,
lm_head) stays frozen. Parameters and optimizer state live in the model dtype (bf16 in the benchmark), as plain
PyTorch AdamW keeps them; no fp32 master copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.method import Method, MethodContext, register_method
from lorsbench.methods._adapter import AdapterLinear, attach_adapters, merge_adapters, merge_dtype
from lorsbench.pruning.masks import MaskSet


class SparseTrainableLinear(AdapterLinear):
    """A target linear whose own (pruned) weight is trainable; its gradient is masked by the stored mask."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__(base, mask)
        self.weight.requires_grad_(True)
        self.weight.register_hook(self._mask_grad)

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def merged_weight(self) -> torch.Tensor:
        return self.weight.detach().to(merge_dtype(self.weight)) * self.mask


@register_method("full_sparse_ft")
class FullSparseFT(Method):
    preserves_sparsity = True

    @dataclass(frozen=True)
    class Config:
        targets: tuple[str, ...] | None = None  # None: the run's targets

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        return attach_adapters(model, masks, self.config.targets or ctx.targets,
                               lambda name, linear, mask: SparseTrainableLinear(linear, mask))

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)
