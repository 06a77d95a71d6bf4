"""The pruner interface: a pruner zeroes (and, for SparseGPT, updates) target weights and returns keep-masks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from lorsbench.config import PruningConfig
from lorsbench.pruning.masks import MaskSet

Batch = dict[str, torch.Tensor]


class Pruner(ABC):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: PruningConfig):
        self.config = config

    @abstractmethod
    def prune(self, model: nn.Module, calibration: list[Batch] | None) -> MaskSet:
        """Prune the target linears of `model` in place; return one keep-mask per target."""
