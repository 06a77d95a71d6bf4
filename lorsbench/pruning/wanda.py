"""Wanda (Sun et al. 2023; docs/methods.md §Wanda): score |W_ij| * ||X_j||_2, comparison group = each output row.

No weight update. N:M: the (m - n) lowest scores of every m consecutive input columns of a row are dropped.
"""
from __future__ import annotations

import torch
from torch import nn

from lorsbench.config import PatternConfig
from lorsbench.modules import target_linears
from lorsbench.pruning.base import Batch, Pruner
from lorsbench.pruning.calibration import prune_layerwise
from lorsbench.pruning.masks import MaskSet, check_nm_divides, mask_from_scores


class InputNorms:
    """Sum over all calibration tokens of X_tj^2 per input feature j (fp32), and the number of sequences.

    The reference keeps a running mean over sequences; the constant factor does not change any ranking."""

    def __init__(self, d_in: int, device: torch.device):
        self.sum_sq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        self.nsamples += x.shape[0] if x.dim() > 2 else 1
        self.sum_sq += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

    @property
    def scaler_row(self) -> torch.Tensor:
        """Mean over sequences of sum_t X_tj^2 (the reference's `scaler_row`)."""
        return self.sum_sq / max(self.nsamples, 1)


def wanda_scores(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(scaler_row_j), in fp32."""
    return weight.detach().float().abs() * scaler_row.float().sqrt().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, pattern: PatternConfig) -> torch.Tensor:
    """Keep-mask: per output row the floor(sparsity * d_in) lowest scores dropped (stable sort), or N:M groups."""
    return mask_from_scores(wanda_scores(weight, scaler_row), sparsity, pattern, "row")


class WandaPruner(Pruner):
    name = "wanda"
    needs_calibration = True

    def prune(self, model: nn.Module, calibration: list[Batch] | None, device=None) -> MaskSet:
        config = self.config
        for name, linear in target_linears(model, config.targets).items():
            check_nm_divides(name, linear.weight.shape[1], config.pattern)

        def new_stats(linear: nn.Module) -> InputNorms:
            return InputNorms(linear.weight.shape[1], linear.weight.device)

        def prune_linear(name: str, linear: nn.Module, stats: InputNorms) -> torch.Tensor:
            mask = wanda_mask(linear.weight, stats.scaler_row, config.sparsity_of(name), config.pattern)
            linear.weight.mul_(mask.to(linear.weight.dtype))
            return mask

        return MaskSet(prune_layerwise(model, calibration or [], config.targets, new_stats, prune_linear, device))
