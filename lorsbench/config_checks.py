"""Checks of a RunConfig that need a registry or the loaded model (the value checks are in `lorsbench.config`).

`check_run_config` runs before any model is loaded: method and pruner names, their options, the model source, the
eval suite, method x pattern;
`resolve_lr` then applies `trainer.lr_from` (a chosen-lr file, `lorsbench.lr_choice`: it needs the method registry).
`check_model_fits` runs right after the load: every target name exists in the model, and every sequence length
fits the model's positions.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from lorsbench.config import RunConfig
from lorsbench.errors import ConfigError, unknown_name_error
from lorsbench.evaluation.lm_eval_runner import SUITES
from lorsbench.models import MODEL_LOADERS
from lorsbench.registry import build_method, check_pattern, get_method, list_methods
from lorsbench.modules import target_linears
from lorsbench.pruning import build_pruner, list_pruners


def check_run_config(cfg: RunConfig) -> None:
    """Registry names, their options and method x pattern: one ConfigError, before anything is loaded."""
    if cfg.model.source not in MODEL_LOADERS:
        raise unknown_name_error("model source", cfg.model.source, list(MODEL_LOADERS))
    if cfg.eval.suite not in SUITES:
        raise unknown_name_error("eval suite", cfg.eval.suite, list(SUITES))
    if cfg.pruning.name not in list_pruners():
        raise unknown_name_error("pruner", cfg.pruning.name, list_pruners())
    build_pruner(cfg.pruning)  # unknown or bad pruner options
    if cfg.method.name not in list_methods():
        raise unknown_name_error("method", cfg.method.name, list_methods())
    build_method(cfg.method)  # unknown or out-of-range method options
    if cfg.pruning.sparsity > 0:
        check_pattern(cfg.method.name, cfg.pruning.pattern)


def resolve_lr(cfg: RunConfig) -> RunConfig:
    """`cfg` with trainer.lr taken from `trainer.lr_from` (and `lr_source` saying so); unchanged without one."""
    if not cfg.trainer.lr_from or cfg.lr_source != "config":
        return cfg
    if not get_method(cfg.method.name).trains:
        return replace(cfg, lr_source="none (the method trains no parameter)")
    from lorsbench.lr_choice import chosen_lr

    lr, lr_source = chosen_lr(cfg.trainer.lr_from, cfg.model.name, cfg.pruning.name, cfg.pruning.pattern.name,
                              cfg.pruning.sparsity, cfg.method.name)
    return replace(cfg, trainer=replace(cfg.trainer, lr=lr), lr_source=lr_source)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last-name components of the linears inside the model's decoder layers (what targets name)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and ".layers." in f".{name}."}
    return sorted(names)


def check_model_fits(cfg: RunConfig, model: nn.Module, method_targets: tuple[str, ...] = ()) -> None:
    """Every target (the run's and the method's own) names a linear of `model`; sequence lengths fit its positions."""
    valid = linear_names(model)
    for where, targets in (("targets", cfg.pruning.targets), ("method.targets", method_targets)):
        missing = [t for t in targets if not target_linears(model, (t,))]
        if missing:
            raise ConfigError(f"{where}: {missing} name no linear inside this model's decoder layers. "
                              f"This model's linears: {', '.join(valid)}")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    lengths = {"trainer.seq_len": cfg.trainer.seq_len}
    if cfg.pruning.calibration is not None and cfg.pruning.name != "none":
        lengths["pruning.calibration.seq_len"] = cfg.pruning.calibration.seq_len
    if cfg.eval.perplexity is not None:
        lengths["eval.perplexity.window"] = cfg.eval.perplexity.window
    for key, value in lengths.items():
        if value > positions:
            raise ConfigError(f"{key}={value} exceeds model '{cfg.model.name}''s max_position_embeddings={positions}; "
                              f"use {key}<={positions}")
