"""Pruners by name. Each entry is 'module:Class', imported on first use."""
from __future__ import annotations

import importlib

from lorsbench.config import PruningConfig, unknown_name_error

_PRUNERS = {
    "none": "lorsbench.pruning.magnitude:NoPruner",
    "magnitude": "lorsbench.pruning.magnitude:MagnitudePruner",
    "wanda": "lorsbench.pruning.wanda:WandaPruner",
    "sparsegpt": "lorsbench.pruning.sparsegpt:SparseGPTPruner",
}


def list_pruners() -> list[str]:
    return sorted(_PRUNERS)


def build_pruner(config: PruningConfig):
    if config.name not in _PRUNERS:
        raise unknown_name_error("pruner", config.name, list_pruners())
    module_name, _, class_name = _PRUNERS[config.name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
