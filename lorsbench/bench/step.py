"""One efficiency configuration (method × sequence length), measured through the pipeline's own pieces.

    python -m lorsbench.bench.step --model random-llama3-8b --pattern 2of4 --method lors --seq-len 2048

Random-weight model at real shapes (`lorsbench.models.load_model`) in bf16 on the device; magnitude keep-masks
(the rule of `lorsbench.pruning.magnitude`, computed on the device so an 8B model's masks never cross PCIe);
the method attached through the registry (`build_method(MethodSpec)`); THE training loop `lorsbench.training.train`
(AdamW, clipping 1.0) on fixed-length batches; `PhaseMeter` around training for max_memory_allocated/reserved.
The protocol is methods.md 5.5 "Efficiency protocol": batch 1, sequences exactly `seq_len` tokens, r = 16, all 7
projections, no gradient checkpointing, warm-up steps excluded, device-synchronized step times.

Run it in a fresh process per configuration (`python -m lorsbench.bench` does) so allocator state and caches
do not leak between methods. Prints one JSON row (and writes it to `--json-out`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from lorsbench.config import ConfigError, MethodSpec, ModelConfig, PatternConfig, ProfileConfig, TrainerConfig
from lorsbench.records import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = float(1 << 30)


@dataclass(frozen=True)
class StepSpec:
    """One configuration of the benchmark."""

    model: str = "random-llama3-8b"
    pattern: str = "2of4"
    sparsity: float = 0.5
    method: str = "lora"  # registry name, optionally with overrides: "lors:kernel=torch,rank=32"
    seq_len: int = 512
    batch_size: int = 1
    rank: int = 16
    warmup_steps: int = 5
    measured_steps: int = 20
    profiled_steps: int = 3  # after the timed ones, under torch.profiler: device kernel time (CUDA only)
    seed: int = 0
    dtype: str = "bfloat16"
    device: str = "cuda"
    targets: tuple[str, ...] = TARGETS
    cuda_graph: bool = False  # trainer.cuda_graph: capture the step once, replay it


@dataclass
class StepRow:
    """One row of the efficiency table (units in field names)."""

    label: str
    method: str
    model: str
    pattern: str
    sparsity: float
    seq_len: int
    batch_size: int
    dtype: str = "bfloat16"
    status: str = "ok"  # ok | oom | failed
    error: str | None = None
    phase: str | None = None
    step_ms_median: float | None = None
    step_ms_p90: float | None = None
    gpu_kernel_ms: float | None = None  # device kernel time per step (the GPU's busy time, host gaps excluded)
    measured_steps: int = 0
    peak_alloc_gib: float | None = None
    peak_reserved_gib: float | None = None
    static_alloc_gib: float | None = None  # allocated when training starts: weights, masks, adapters
    saved_activations_gib: float | None = None  # bytes autograd saves in one forward (parameters/buffers excluded)
    trainable_params: int | None = None
    tokens_per_s: float | None = None
    final_loss: float | None = None
    step_mode: str | None = None  # eager | cuda_graph (TrainResult.step_mode)
    cuda_graph_fallback: str | None = None  # why cuda_graph ran eagerly
    method_config: dict[str, Any] = field(default_factory=dict)
    gpu: str | None = None
    torch_version: str = torch.__version__
    triton_version: str | None = None
    date_utc: str | None = None
    wall_s: float | None = None


def read_yaml(kind: str, name: str) -> dict[str, Any]:
    """conf/<kind>/<name>.yaml as a plain dict (no Hydra; `${...}` interpolations are dropped)."""
    path = CONF / kind / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in (CONF / kind).glob("*.yaml"))
        raise ConfigError(f"unknown {kind} '{name}'. Valid: {', '.join(valid)}")
    data = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in data.items() if not (isinstance(v, str) and v.startswith("${"))}


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """'lors:kernel=torch,rank=32' -> ('lors', {'kernel': 'torch', 'rank': 32}) (values parsed as YAML)."""
    name, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"method override '{item}' in '{text}' is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


def method_spec(text: str, rank: int) -> MethodSpec:
    """The method's conf/method yaml defaults, then the protocol (r = `rank` where the method has a rank,
    `init=lora` where it has an init: data-dependent initialisation is not part of a training step), then the
    overrides written after ':'."""
    from dataclasses import fields

    from lorsbench.method import get_method

    name, overrides = parse_method(text)
    params = read_yaml("method", name)
    params.pop("name", None)
    valid = {f.name for f in fields(get_method(name).Config)}
    if "rank" in valid:
        params["rank"] = rank
    if "init" in valid:
        params["init"] = "lora"
    params.update(overrides)
    return MethodSpec(name=name, params=params)


def model_config(name: str) -> ModelConfig:
    raw = read_yaml("model", name)
    return ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})


def pattern_config(name: str) -> PatternConfig:
    raw = read_yaml("pattern", name)
    return PatternConfig(**{k: v for k, v in raw.items() if k in PatternConfig.__dataclass_fields__})


def magnitude_masks(model: torch.nn.Module, targets: tuple[str, ...], sparsity: float, pattern: PatternConfig):
    """Magnitude keep-masks (methods.md 2.3, the rule of `lorsbench.pruning.magnitude`), kept on the device;
    the weights are zeroed where pruned."""
    from lorsbench.modules import target_linears
    from lorsbench.pruning.masks import MaskSet, check_nm_divides, mask_from_scores

    masks = MaskSet()
    with torch.no_grad():
        for name, linear in target_linears(model, targets).items():
            check_nm_divides(name, linear.weight.shape[1], pattern)
            mask = mask_from_scores(linear.weight.abs(), sparsity, pattern, "matrix")
            linear.weight.mul_(mask.to(linear.weight.dtype))
            masks[name] = mask
    return masks


def fixed_batches(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int) -> Iterator[dict]:
    """Endless identical batches of exactly `seq_len` random tokens (no padding positions: every token counts)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen).to(device)
    batch_dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    while True:
        yield batch_dict


def saved_activation_bytes(model: torch.nn.Module, batch: dict, loss_fn) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters and buffers
    excluded): the activation memory each method adds (methods.md 7.1)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return sum(seen.values())


def _gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run_step(spec: StepSpec) -> StepRow:
    """Build, prune, attach and train one configuration; every failure becomes a row (status oom | failed)."""
    from lorsbench.method import MethodContext, build_method
    from lorsbench.models import load_model
    from lorsbench.profiling import PhaseMeter, kernel_ms_per_step
    from lorsbench.runtime import resolve_device, torch_dtype
    from lorsbench.training import causal_lm_loss, train

    t0 = time.perf_counter()
    row = StepRow(label=spec.method, method=parse_method(spec.method)[0], model=spec.model, pattern=spec.pattern,
                  sparsity=spec.sparsity, seq_len=spec.seq_len, batch_size=spec.batch_size, dtype=spec.dtype,
                  date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton

        row.triton_version = triton.__version__
    except ImportError:
        pass
    phase = "setup"
    try:
        device = resolve_device(spec.device)
        row.gpu = _gpu_name(device)
        dtype = torch_dtype(spec.dtype, device)
        pattern = pattern_config(spec.pattern)
        sparsity = pattern.sparsity if pattern.is_nm else spec.sparsity
        row.sparsity = sparsity
        method = build_method(method_spec(spec.method, spec.rank))
        row.method_config = method.describe()
        phase = "load"
        torch.manual_seed(spec.seed)
        loaded = load_model(model_config(spec.model), dtype, device, REPO / ".cache")
        model = loaded.model
        model.config.use_cache = False
        phase = "prune"
        masks = magnitude_masks(model, spec.targets, sparsity, pattern)
        phase = "attach"
        ctx = MethodContext(targets=spec.targets, device=device, dtype=dtype,
                            generator=torch.Generator().manual_seed(spec.seed), loss_fn=causal_lm_loss)
        params = method.attach(model, masks, ctx)
        del masks  # the modules hold their own references
        row.trainable_params = sum(p.numel() for p in params)
        phase = "train"
        trainer = TrainerConfig(max_steps=spec.warmup_steps + spec.measured_steps, micro_batch_size=spec.batch_size,
                                grad_accum=1, seq_len=spec.seq_len, lr=1e-5, warmup_steps=0, max_grad_norm=1.0,
                                cuda_graph=spec.cuda_graph)
        batches = fixed_batches(model.config.vocab_size, spec.batch_size, spec.seq_len, device, spec.seed)
        with PhaseMeter("train", device) as meter:
            result = train(model, params, batches, trainer, ProfileConfig(warmup_steps=spec.warmup_steps), device)
        stats = meter.stats
        row.static_alloc_gib = stats.start_alloc_gib
        row.peak_alloc_gib = stats.peak_alloc_gib
        row.peak_reserved_gib = stats.peak_reserved_gib
        if device.type == "cpu":
            row.peak_alloc_gib = stats.peak_rss_gib
        row.step_ms_median, row.step_ms_p90 = result.step_ms_median, result.step_ms_p90
        row.measured_steps, row.tokens_per_s, row.final_loss = result.measured_steps, result.tokens_per_s, result.final_loss
        row.step_mode, row.cuda_graph_fallback = result.step_mode, result.cuda_graph_fallback
        if spec.profiled_steps > 0:
            phase = "kernel_time"
            profiled = replace(trainer, max_steps=2 + spec.profiled_steps)
            row.gpu_kernel_ms = kernel_ms_per_step(
                lambda after_step: train(model, params, batches, profiled, ProfileConfig(warmup_steps=0), device,
                                         after_step=after_step),
                skip_steps=1, active_steps=spec.profiled_steps, device=device)
        phase = "saved_tensors"
        row.saved_activations_gib = saved_activation_bytes(model, next(batches), causal_lm_loss) / GIB
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row.status = "oom" if oom else "failed"
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        row.phase = phase
        if not oom:
            traceback.print_exc(file=sys.stderr)
    row.wall_s = time.perf_counter() - t0
    return row


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=StepSpec.model, help="conf/model/<name>.yaml (source: random)")
    parser.add_argument("--pattern", default=StepSpec.pattern, help="conf/pattern/<name>.yaml")
    parser.add_argument("--sparsity", type=float, default=StepSpec.sparsity, help="unstructured only")
    parser.add_argument("--rank", type=int, default=StepSpec.rank)
    parser.add_argument("--batch-size", type=int, default=StepSpec.batch_size)
    parser.add_argument("--warmup", type=int, default=StepSpec.warmup_steps, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=StepSpec.measured_steps, help="measured steps")
    parser.add_argument("--profiled-steps", type=int, default=StepSpec.profiled_steps,
                        help="steps after the timed ones under torch.profiler for the kernel time (CUDA); 0: off")
    parser.add_argument("--seed", type=int, default=StepSpec.seed)
    parser.add_argument("--dtype", default=StepSpec.dtype)
    parser.add_argument("--device", default=StepSpec.device)
    parser.add_argument("--cuda-graph", action="store_true", help="trainer.cuda_graph=true (CUDA; else recorded fallback)")


def spec_from_args(args: argparse.Namespace, method: str, seq_len: int) -> StepSpec:
    return StepSpec(model=args.model, pattern=args.pattern, sparsity=args.sparsity, method=method, seq_len=seq_len,
                    batch_size=args.batch_size, rank=args.rank, warmup_steps=args.warmup,
                    measured_steps=args.steps, profiled_steps=args.profiled_steps, seed=args.seed, dtype=args.dtype,
                    device=args.device, cuda_graph=args.cuda_graph)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench.step", description=__doc__.splitlines()[0])
    add_spec_arguments(parser)
    parser.add_argument("--method", default="lora", help="registry name[:key=value,...]")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    row = run_step(spec_from_args(args, args.method, args.seq_len))
    text = json.dumps(asdict(row))
    if args.json_out is not None:
        write_text_atomic(args.json_out, text + "\n")
    print(text)
    return 0 if row.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
