"""The pruner interface: a pruner zeroes (and, for SparseGPT, updates) target weights and returns keep-masks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from lorsbench.config import PruningConfig
from lorsbench.errors import Batch, ConfigError  # noqa: F401 - Batch re-exported for the pruners
from lorsbench.pruning.masks import MaskSet


@dataclass(frozen=True)
class NoOptions:
    """A pruner without options."""


class Pruner(ABC):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # True when kept weights change (SparseGPT): the artifact must then store the weights, not only the masks.
    updates_weights: ClassVar[bool] = False
    # False for the dense reference: nothing worth caching.
    cacheable: ClassVar[bool] = True
    # Pruner-specific settings: the extra keys of the pruning YAML (`PruningConfig.options`).
    Options: ClassVar[type] = NoOptions

    def __init__(self, config: PruningConfig):
        self.config = config
        self.options = _build_options(self.Options, config.options, config.name)

    def options_dict(self) -> dict[str, Any]:
        """The resolved options (defaults filled in): what the artifact key hashes."""
        return asdict(self.options)

    @abstractmethod
    def prune(self, model: nn.Module, calibration: list[Batch] | None, device: torch.device | str | None = None) -> MaskSet:
        """Prune the target linears of `model` in place; return one keep-mask per target.

        `device`: where calibrated pruners run each decoder block (default: where the model is)."""


def _build_options(cls: type, values: dict[str, Any], pruner: str):
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        listed = ", ".join(sorted(valid)) or "none"
        raise ConfigError(f"pruning={pruner}: unknown option(s) {unknown}. Valid options: {listed}")
    return cls(**values)
