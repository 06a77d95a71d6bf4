"""Shared machinery for adapter methods: frozen pruned base + stored keep-mask + trainable parameters, the
low-rank hyper-parameters (rank, alpha, scaling convention, dropout, targets) with their checks, and the merge.

Adapters keep float32 master parameters (as SQFT's training script does) and cast to the activation dtype in
the forward, so bf16 runs do not update bf16 parameters.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lorsbench.modules import replace_module, target_linears
from lorsbench.pruning.masks import MaskSet
from lorsbench.registry import Method, MethodContext

SCALINGS = ("alpha_over_r", "alpha_over_sqrt_r", "one")


def scaling_factor(kind: str, alpha: float, rank: int) -> float:
    """The adapter scale s: alpha/r (LoRA, SQFT, SPP), alpha/sqrt(r) (LoRS, rsLoRA) or 1."""
    if kind == "alpha_over_r":
        return alpha / rank
    if kind == "alpha_over_sqrt_r":
        return alpha / math.sqrt(rank)
    if kind == "one":
        return 1.0
    raise ValueError(f"unknown scaling '{kind}'. Valid: {', '.join(SCALINGS)}")


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


@dataclass(frozen=True)
class LowRankConfig:
    """The hyper-parameters of an adapter `s U V` (U d_out x r, V r x d_in) and their checks; a method's Config
    subclasses it, redeclaring a field only to change its default."""

    rank: int = 16
    alpha: float = 32.0
    scaling: str = "alpha_over_r"  # alpha_over_r | alpha_over_sqrt_r | one
    targets: tuple[str, ...] | None = None  # None: the run's targets

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        scaling_factor(self.scaling, self.alpha, self.rank)

    @property
    def scaling_value(self) -> float:
        """The adapter scale s (recorded as `method_config.scaling_value`)."""
        return scaling_factor(self.scaling, self.alpha, self.rank)


@dataclass(frozen=True)
class LowRankDropoutConfig(LowRankConfig):
    """A low-rank adapter whose input passes through dropout (LoRA's D(X))."""

    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_dropout(self.dropout)


def merge_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype merges are computed in: float32, or the weight's dtype when it is wider (float64 tests)."""
    return torch.promote_types(weight.dtype, torch.float32)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's lora_A init: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def lora_factors(d_out: int, d_in: int, rank: int, generator: torch.Generator) -> tuple[nn.Parameter, nn.Parameter]:
    """U (d_out x r, zeros) and V (r x d_in, kaiming-uniform): the adapter is the identity at init."""
    return (
        nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float32)),
        nn.Parameter(kaiming_uniform((rank, d_in), generator)),
    )


class AdapterLinear(nn.Module):
    """A target linear with its frozen base weight (`.weight`, `.bias`), its stored mask and an adapter.

    `keep_mask=False` for adapters whose training never reads the mask (plain LoRA, SPP): the mask is checked
    against the base weight here and then not kept, so it costs no device memory (6.5 GiB of bool at Llama-3-8B).
    """

    def __init__(self, base: nn.Linear, mask: torch.Tensor, keep_mask: bool = True):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if tuple(mask.shape) != tuple(base.weight.shape):
            raise ValueError(f"stored mask has shape {tuple(mask.shape)}, weight has {tuple(base.weight.shape)}")
        mask = mask.to(device=base.weight.device, dtype=torch.bool)
        with torch.no_grad():
            if bool((self.weight[~mask] != 0).any()):
                raise ValueError("the base weight is non-zero where the stored mask prunes it: "
                                 "apply the masks (lorsbench.pruning.masks.apply_masks) before attaching")
        self.register_buffer("mask", mask if keep_mask else None, persistent=False)

    @abstractmethod
    def merged_weight(self) -> torch.Tensor:
        """The plain weight (in `merge_dtype(self.weight)`) that reproduces this module's forward."""

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight().to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(False)
        return linear


def attach_adapters(
    model: nn.Module,
    masks: MaskSet,
    targets: tuple[str, ...],
    make: Callable[[str, nn.Linear, torch.Tensor], AdapterLinear],
) -> list[nn.Parameter]:
    """Freeze the whole model, replace each target linear by `make(name, linear, mask)` and return the
    adapters' trainable parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for name, linear in target_linears(model, targets).items():
        if name not in masks:
            raise KeyError(f"no stored mask for target {name}")
        adapter = make(name, linear, masks[name])
        adapter.to(linear.weight.device)
        adapter.train(linear.training)  # a new module starts in training mode; keep the model's mode
        replace_module(model, name, adapter)
        trainable.extend(p for p in adapter.parameters() if p.requires_grad)
    return trainable


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every AdapterLinear by a plain nn.Linear holding its merged weight."""
    names = [name for name, module in model.named_modules() if isinstance(module, AdapterLinear)]
    for name in names:
        adapter = model.get_submodule(name)
        linear = adapter.to_linear()
        linear.train(adapter.training)
        replace_module(model, name, linear)
    return model


class AdapterMethod(Method):
    """A method that replaces target linears by AdapterLinear modules: merge folds each into a plain nn.Linear."""

    def target_names(self, ctx: MethodContext) -> tuple[str, ...]:
        """The method's own targets, else the run's."""
        return getattr(self.config, "targets", None) or ctx.targets

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)
