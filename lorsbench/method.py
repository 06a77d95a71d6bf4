"""The method interface and registry (docs/methods.md §Method interface).

A method is a class in `methods/<name>.py` (installed as `lorsbench.methods.<name>`), decorated with
`@register_method("<name>")`, with a dataclass `Config` of its hyper-parameters. Registry key == file stem ==
`conf/method/<name>.yaml` stem. The pipeline, training loop, evaluation and report never name a method.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from lorsbench.config import MethodSpec, PatternConfig, RunConfig, check_number
from lorsbench.errors import Batch, ConfigError, unknown_name_error
from lorsbench.pruning.masks import MaskSet
from lorsbench.schedule import Round, default_schedule

# Ranges of the hyper-parameters several methods share, checked by name before a method's Config is built, so a
# bad value is one clear error naming the option (not a ZeroDivisionError from the scaling).
# name -> (kind, lowest, lowest allowed?, highest, highest allowed?)
OPTION_RANGES: dict[str, tuple[type, float | None, bool, float | None, bool]] = {
    "rank": (int, 0, False, None, False), "rows": (int, 0, False, None, False),
    "alpha": (float, 0, False, None, False), "dropout": (float, 0, True, 1, False),
    "init_samples": (int, 0, False, None, False), "init_gamma": (float, 0, False, None, False),
    "quant_group_size": (int, 0, False, None, False), "nls_space": (int, 0, False, None, False),
}


@dataclass
class MethodContext:
    """What a method may use while attaching: targets, placement, randomness, and training data for
    data-dependent initialisation (LoRS gradient-SVD init)."""

    targets: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    train_batches: Callable[[], Iterator[Batch]] | None = None  # a fresh iterator over training batches
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    calibration: Callable[[], list[Batch]] | None = None  # the pruning calibration batches (None without)


class Method(ABC):
    name: ClassVar[str]
    preserves_sparsity: ClassVar[bool]
    trains: ClassVar[bool] = True  # False: attach returns no parameters, so no lr applies (an lr sweep skips it)
    Config: ClassVar[type]
    # The N:M pattern (n, m) the method's base must have, e.g. (2, 4) for SLoPe; None: any pattern.
    required_pattern: ClassVar[tuple[int, int] | None] = None
    # The tuner of the method's own GPU kernels, for `python -m lorsbench.bench.layer --tune`:
    # (device, dtype, time_ms, **options) -> an object with `markdown` and `files`; None: nothing to tune.
    kernel_tuner: ClassVar[Callable[..., Any] | None] = None

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        """Replace target linears in place; freeze everything else; return the trainable parameters."""

    @abstractmethod
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold adapters into plain nn.Linear modules; the result is an ordinary HF model."""

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters for the run record (scaling conventions included)."""
        return asdict(self.config) if self.config is not None else {}

    # A method that prunes while it fine-tunes declares its rounds (lorsbench.schedule); the defaults are one
    # round at the run's settings, i.e. prune once, attach, train, merge.
    def schedule(self, cfg: RunConfig) -> list[Round]:
        """The (target sparsity, training steps) rounds; the steps sum to `cfg.trainer.max_steps`."""
        return default_schedule(cfg)

    def plan_round(self, model: nn.Module, index: int, rnd: Round, ctx: MethodContext) -> Round:
        """Called before round `index` (0-based) prunes `model` (the earlier rounds' merged weights); may return
        the round with per-layer rates."""
        return rnd

    def round_details(self) -> dict[str, Any]:
        """What the round's record entry adds after attach (e.g. allocated ranks)."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: register a Method under `name` (must equal its module's file stem)."""

    def decorate(cls: type[Method]) -> type[Method]:
        stem = cls.__module__.rsplit(".", 1)[-1]
        if stem != name:
            raise ValueError(f"method '{name}' must live in methods/{name}.py (found in {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def methods_package():
    """The `lorsbench.methods` package: installed by the build (package-dir), or the repository's
    top-level `methods/` folder in a source checkout."""
    if "lorsbench.methods" in sys.modules:
        return sys.modules["lorsbench.methods"]
    try:
        return importlib.import_module("lorsbench.methods")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parent.parent / "methods"
        spec = importlib.util.spec_from_file_location(
            "lorsbench.methods", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or not (folder / "__init__.py").exists():
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["lorsbench.methods"] = module
        spec.loader.exec_module(module)
        return module


def list_methods() -> list[str]:
    package = methods_package()
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def get_method(name: str) -> type[Method]:
    valid = list_methods()
    if name not in valid:
        raise unknown_name_error("method", name, valid)
    if name not in _REGISTRY:
        methods_package()
        importlib.import_module(f"lorsbench.methods.{name}")
    if name not in _REGISTRY:
        raise ConfigError(f"methods/{name}.py does not register a method named '{name}'")
    return _REGISTRY[name]


def check_pattern(name: str, pattern: PatternConfig) -> None:
    """Method x pattern compatibility from the method's `required_pattern` (before any model is loaded)."""
    required = get_method(name).required_pattern
    if required is not None and (pattern.n, pattern.m) != tuple(required):
        n, m = required
        raise ConfigError(f"method={name} needs a {n}:{m} base (pattern={n}of{m} sparsity={1 - n / m:g}); "
                          f"got pattern={pattern.name}")


def _check_option_ranges(method: str, params: dict[str, Any]) -> None:
    for key, value in params.items():
        if key in OPTION_RANGES:
            kind, low, low_ok, high, high_ok = OPTION_RANGES[key]
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                check_number(f"method '{method}': {key} (method.{key})", item, kind, low, low_ok, high, high_ok)

def kernel_tuners() -> dict[str, Callable[..., Any]]:
    """Each distinct `Method.kernel_tuner` of the registry, under the first method name that carries it."""
    tuners: dict[str, Callable[..., Any]] = {}
    for name in list_methods():
        tuner = get_method(name).kernel_tuner
        if tuner is not None and all(tuner is not t for t in tuners.values()):
            tuners[name] = tuner
    return tuners


def build_method(spec: MethodSpec) -> Method:
    """Instantiate a method from its registry name and raw hyper-parameters (unknown keys -> clear error)."""
    cls = get_method(spec.name)
    valid = {f.name for f in fields(cls.Config)}
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.params.items()}
    unknown = sorted(set(params) - valid)
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        hint = "; ".join(f"'{k}' -> did you mean '{h[0]}'?" for k, h in hints.items() if h)
        raise ConfigError(
            f"method '{spec.name}': unknown option(s) {unknown}. Valid: {sorted(valid)}" + (f". {hint}" if hint else "")
        )
    _check_option_ranges(spec.name, params)
    try:
        config = cls.Config(**params)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(f"method '{spec.name}': {exc}") from exc
    return cls(config)
