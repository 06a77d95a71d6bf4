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


def pruner_class(name: str) -> type:
    """The Pruner class registered under `name`."""
    if name not in _PRUNERS:
        raise unknown_name_error("pruner", name, list_pruners())
    module_name, _, class_name = _PRUNERS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_pruner(config: PruningConfig):
    return pruner_class(config.name)(config)
