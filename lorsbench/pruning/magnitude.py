"""Magnitude pruning (docs/methods.md §Magnitude): score |W|, one threshold per matrix; N:M per group of M input
columns."""
from __future__ import annotations

import torch
from torch import nn

from lorsbench.modules import target_linears
from lorsbench.pruning.base import Batch, Pruner
from lorsbench.pruning.masks import MaskSet, check_nm_divides, mask_from_scores


class MagnitudePruner(Pruner):
    name = "magnitude"
    needs_calibration = False

    def prune(self, model: nn.Module, calibration: list[Batch] | None = None, device=None,
              keep_on_device: bool = False) -> MaskSet:
        """`keep_on_device`: leave each mask where its weight is (the efficiency benchmark: an 8B model's masks
        never cross PCIe); by default masks move to the CPU, as the artifact cache stores them."""
        masks = MaskSet()
        with torch.no_grad():
            for name, linear in target_linears(model, self.config.targets).items():
                check_nm_divides(name, linear.weight.shape[1], self.config.pattern)
                mask = mask_from_scores(linear.weight.abs(), self.config.sparsity_of(name), self.config.pattern, "matrix")
                linear.weight.mul_(mask.to(linear.weight.dtype))
                masks[name] = mask if keep_on_device else mask.cpu()
        return masks


class NoPruner(Pruner):
    """The dense reference: every weight kept."""

    name = "none"
    cacheable = False

    def prune(self, model: nn.Module, calibration: list[Batch] | None = None, device=None,
              keep_on_device: bool = False) -> MaskSet:
        return MaskSet({
            name: torch.ones_like(linear.weight, dtype=torch.bool, device=None if keep_on_device else "cpu")
            for name, linear in target_linears(model, self.config.targets).items()
        })
