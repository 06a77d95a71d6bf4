"""Magnitude pruning (methods.md 2.3): score |W|, one threshold per matrix; N:M per group of M input columns."""
from __future__ import annotations

import torch
from torch import nn

from lorsbench.modules import target_linears
from lorsbench.pruning.base import Batch, Pruner
from lorsbench.pruning.masks import MaskSet, check_nm_divides, mask_from_scores


class MagnitudePruner(Pruner):
    name = "magnitude"
    needs_calibration = False

    def prune(self, model: nn.Module, calibration: list[Batch] | None = None, device=None) -> MaskSet:
        masks = MaskSet()
        with torch.no_grad():
            for name, linear in target_linears(model, self.config.targets).items():
                check_nm_divides(name, linear.weight.shape[1], self.config.pattern)
                mask = mask_from_scores(linear.weight.abs(), self.config.sparsity_of(name), self.config.pattern, "matrix")
                linear.weight.mul_(mask.to(linear.weight.dtype))
                masks[name] = mask.cpu()
        return masks


class NoPruner(Pruner):
    """The dense reference: every weight kept."""

    name = "none"
    cacheable = False

    def prune(self, model: nn.Module, calibration: list[Batch] | None = None, device=None) -> MaskSet:
        return MaskSet({
            name: torch.ones_like(linear.weight, dtype=torch.bool, device="cpu")
            for name, linear in target_linears(model, self.config.targets).items()
        })
