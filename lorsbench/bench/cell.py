"""One benchmark cell: a method (or peer) × batch × sequence length × step mode, measured through the
pipeline's own pieces in its own process (docs/measurement.md §Cell protocol).

    python -m lorsbench.bench.cell --model random-llama3-8b --pattern 2of4 --method lors --seq-len 2048

The cell's config is composed by Hydra from the project's `conf/` (preset `experiment=bench`, then the cell's
overrides) and typed by the pipeline's `build_run_config`, so a cell runs what `python -m lorsbench` would build.
Then: the random-weight model at real shapes (`lorsbench.models.load_model`), the configured pruner
(`lorsbench.pruning`, masks kept on the device), the method through the registry (or a peer, `bench/peers.py`),
THE training loop `lorsbench.training.train` with `PhaseMeter` around it, kernel time under the profiler, the
bytes autograd saves, and the FLOP floor (`bench/flops.py`). Every failure becomes a result with status
`oom | failed` (`lorsbench.records.failure_status`) and the phase it happened in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from lorsbench.composition import compose_config
from lorsbench.config import ConfigError, MethodSpec, RunConfig
from lorsbench.records import failure_status, write_text_atomic

PRESET = "bench"  # conf/experiment/bench.yaml
GIB = float(1 << 30)
TOP_KERNELS = 5  # kernels listed per profiled cell: where the time beyond the FLOP floor goes


@dataclass(frozen=True)
class CellSpec:
    """One cell of the benchmark (what `python -m lorsbench.bench` varies), not a run configuration: the
    cell's `RunConfig` is composed from it by `compose_cell`."""

    model: str = "random-llama3-8b"
    pattern: str = "2of4"
    sparsity: float | None = None  # None: the config's (N:M patterns fix it)
    method: str = "lora"  # label: registry name[:key=value,...] ("lors:kernel=torch") or peer:<name>
    seq_len: int = 512
    batch_size: int = 1
    rank: int = 16
    warmup_steps: int = 5
    measured_steps: int = 20
    profiled_steps: int = 3  # after the timed ones, under torch.profiler: device kernel time (CUDA only)
    seed: int = 0
    dtype: str = "bfloat16"
    device: str = "cuda"
    cuda_graph: bool = False  # trainer.cuda_graph=true: the whole step captured and replayed
    overrides: tuple[str, ...] = ()  # further Hydra overrides (key=value) for the cell's config
    gemm_tflops: float | None = None  # the invocation's measured GEMM rate: the FLOP floor's denominator
    nproc: int = 1  # > 1: torchrun processes, distributed=fsdp (batch_size is per GPU; docs/distributed.md)


@dataclass
class CellResult:
    """One row of the efficiency table (units in field names)."""

    label: str
    method: str  # registry name, or "peer"
    model: str
    pattern: str
    sparsity: float | None
    seq_len: int
    batch_size: int
    dtype: str = "bfloat16"
    peer: bool = False
    cuda_graph: bool = False  # requested
    step_mode: str | None = None  # what ran: eager | cuda_graph (TrainResult.step_mode)
    cuda_graph_fallback: str | None = None  # why a requested graph ran eager
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
    step_gflop: float | None = None  # forward + backward GEMM work of the step (bench/flops.py)
    gemm_tflops: float | None = None  # measured GEMM rate of this GPU
    floor_ms: float | None = None  # step_gflop at gemm_tflops
    x_floor: float | None = None  # step_ms_median / floor_ms
    largest_batch: bool = False  # the largest batch that fit (--max-batch search)
    world_size: int = 1  # processes (GPUs) that trained the cell; tokens_per_s is then the global rate
    peak_alloc_gib_max_over_ranks: float | None = None  # peak_alloc_gib is rank 0's
    top_kernels: list[list[Any]] = field(default_factory=list)  # [kernel name, ms per step], longest first
    method_config: dict[str, Any] = field(default_factory=dict)
    gpu: str | None = None
    torch_version: str = torch.__version__
    triton_version: str | None = None
    date_utc: str | None = None
    wall_s: float | None = None


def parse_label(text: str) -> tuple[str, list[str]]:
    """'lors:kernel=torch,rank=32' -> ('lors', ['kernel=torch', 'rank=32']); 'peer:x' -> ('peer:x', [])."""
    if text.startswith("peer:"):
        return text, []
    name, _, rest = text.partition(":")
    items = [item.strip() for item in rest.split(",") if item.strip()]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"method override '{item}' in '{text}' is not key=value")
    return name.strip(), items


def cell_overrides(spec: CellSpec) -> list[str]:
    """The Hydra overrides of one cell: the preset, the cell's factors, the protocol (r = `rank` where the
    method has a rank, `init=lora` where it has an init: data-dependent initialisation is not a step cost),
    then `spec.overrides`, then the label's own `key=value`s (a later value of a key wins)."""
    from lorsbench.bench.peers import peer_of
    from lorsbench.registry import get_method

    name, method_items = parse_label(spec.method)
    peer = peer_of(name)
    method = peer.config_method if peer else name
    keys = {f.name for f in fields(get_method(method).Config)}
    values: dict[str, tuple[str, str]] = {}

    def put(key: str, value: Any) -> None:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        values[key.lstrip("+")] = (key, text)

    for key, value in (("experiment", PRESET), ("model", spec.model), ("pattern", spec.pattern),
                       ("method", method), ("seed", spec.seed), ("dtype", spec.dtype), ("device", spec.device),
                       ("trainer.seq_len", spec.seq_len), ("trainer.micro_batch_size", spec.batch_size),
                       ("trainer.max_steps", spec.warmup_steps + spec.measured_steps),
                       ("profile.warmup_steps", spec.warmup_steps)):
        put(key, value)
    if spec.sparsity is not None:
        put("sparsity", spec.sparsity)
    if "rank" in keys:
        put("method.rank", spec.rank)
    if "init" in keys:
        put("method.init", "lora")
    if spec.cuda_graph:
        put("++trainer.cuda_graph", True)
    if spec.nproc > 1:
        put("distributed", "fsdp")
    for item in (*spec.overrides, *(f"++method.{item}" for item in method_items)):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override '{item}' is not key=value")
        put(key.strip(), value.strip())
    return [f"{key}={value}" for key, value in values.values()]


def compose_cell(spec: CellSpec) -> RunConfig:
    """The cell's typed run configuration (Hydra + `build_run_config`); bad input is a ConfigError."""
    from lorsbench.config import build_run_config
    from lorsbench.pruning import build_pruner

    cfg = build_run_config(compose_config(cell_overrides(spec)))
    if build_pruner(cfg.pruning).needs_calibration:
        raise ConfigError(f"pruning={cfg.pruning.name} needs calibration data; the benchmark's random-weight "
                          "models have none: use pruning=magnitude (the preset's) or pruning=none")
    return cfg


def method_spec(label: str, rank: int = 16) -> MethodSpec:
    """The method of a cell with this label, as the bench composes it: conf/method defaults, then the protocol
    (r = `rank`, init=lora), then the label's overrides (`lors:kernel=torch`)."""
    return compose_cell(CellSpec(method=label, rank=rank)).method


def output_root(overrides: list[str] = ()) -> Path:
    """The configured output root (`paths.output_root`: LORSBENCH_OUTPUT or results/raw)."""
    return Path(os.path.expanduser(str(compose_config(["experiment=bench", *overrides])["paths"]["output_root"])))


def fixed_batches(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int) -> Iterator[dict]:
    """Endless identical batches of exactly `seq_len` random tokens (no padding positions: every token counts)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen).to(device)
    batch_dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    while True:
        yield batch_dict


def saved_activation_bytes(model: torch.nn.Module, batch: dict, loss_fn) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters and buffers
    excluded): the activation memory each method adds."""
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


def new_result(spec: CellSpec) -> CellResult:
    peer = spec.method.startswith("peer:")
    return CellResult(label=spec.method, method="peer" if peer else spec.method.partition(":")[0], peer=peer,
                      model=spec.model, pattern=spec.pattern, sparsity=spec.sparsity, seq_len=spec.seq_len,
                      batch_size=spec.batch_size, dtype=spec.dtype, cuda_graph=spec.cuda_graph,
                      gemm_tflops=spec.gemm_tflops, date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def run_cell(spec: CellSpec) -> CellResult:
    """Compose, load, prune, attach and train one cell; every failure becomes a result (status oom | failed)."""
    from lorsbench import distributed
    from lorsbench.bench.flops import floor_ms, model_shapes, step_flops
    from lorsbench.bench.peers import peer_of
    from lorsbench.registry import MethodContext, build_method
    from lorsbench.models import load_model
    from lorsbench.profiling import PhaseMeter, kernel_time_per_step
    from lorsbench.pruning import build_pruner
    from lorsbench.runtime import device_name, resolve_device, torch_dtype
    from lorsbench.training import causal_lm_loss, train

    t0 = time.perf_counter()
    row = new_result(spec)
    try:
        import triton

        row.triton_version = triton.__version__
    except ImportError:
        pass
    phase = "config"
    try:
        cfg = compose_cell(spec)
        row.sparsity = cfg.pruning.sparsity
        phase = "setup"
        ranks = distributed.start(cfg, resolve_device(cfg.device), scheduled=False)
        device = ranks.device
        row.world_size = ranks.world_size
        row.gpu = device_name(device)
        dtype = torch_dtype(cfg.dtype, device)
        peer = peer_of(spec.method)
        method = None if peer else build_method(cfg.method)
        row.method_config = method.describe() if method else {
            key: cfg.method.params[key] for key in ("rank", "alpha", "dropout") if key in cfg.method.params}
        phase = "load"
        torch.manual_seed(cfg.seed)
        model = load_model(cfg.model, dtype, device, cfg.paths.cache_dir).model
        model.config.use_cache = False
        shapes = model_shapes(model, cfg.pruning.targets)
        phase = "prune"
        masks = build_pruner(cfg.pruning).prune(model, None, keep_on_device=True)
        phase = "attach"
        generator = torch.Generator().manual_seed(cfg.seed)
        if peer is not None:
            params = peer.attach(model, dict(cfg.method.params), cfg.pruning.targets, generator)
        else:
            ctx = MethodContext(targets=cfg.pruning.targets, device=device, dtype=dtype, generator=generator,
                                loss_fn=causal_lm_loss)
            params = method.attach(model, masks, ctx)
        del masks  # the modules hold their own references
        row.trainable_params = sum(p.numel() for p in params)
        model, params = ranks.shard(model, params)
        phase = "train"
        trainer = cfg.trainer
        batches = fixed_batches(model.config.vocab_size, trainer.micro_batch_size, trainer.seq_len, device, cfg.seed)
        with PhaseMeter("train", device) as meter:
            result = train(model, params, batches, trainer, cfg.profile, device, ranks=ranks)
        stats = meter.stats
        row.peak_alloc_gib_max_over_ranks = distributed.train_peaks(ranks, stats).max_over_ranks_gib
        row.static_alloc_gib = stats.start_alloc_gib
        row.peak_alloc_gib = stats.peak_rss_gib if device.type == "cpu" else stats.peak_alloc_gib
        row.peak_reserved_gib = stats.peak_reserved_gib
        done = result.as_dict()  # .get: step_mode/cuda_graph_fallback exist once the loop captures graphs
        row.step_mode = done.get("step_mode", "eager")
        row.cuda_graph_fallback = done.get("cuda_graph_fallback")
        row.step_ms_median, row.step_ms_p90 = result.step_ms_median, result.step_ms_p90
        row.measured_steps, row.tokens_per_s, row.final_loss = result.measured_steps, result.tokens_per_s, result.final_loss
        row.step_gflop = step_flops(shapes, trainer.micro_batch_size, trainer.seq_len, spec.rank) / 1e9
        if spec.gemm_tflops and row.step_ms_median:
            row.floor_ms = floor_ms(row.step_gflop * 1e9, spec.gemm_tflops)
            row.x_floor = row.step_ms_median / row.floor_ms
        if spec.profiled_steps > 0 and device.type == "cuda":
            phase = "kernel_time"
            profiled = replace(trainer, max_steps=2 + spec.profiled_steps)
            kernels = kernel_time_per_step(
                lambda after_step: train(model, params, batches, profiled, replace(cfg.profile, warmup_steps=0),
                                         device, after_step=after_step, ranks=ranks),
                skip_steps=1, active_steps=spec.profiled_steps, device=device, top=TOP_KERNELS)
            row.gpu_kernel_ms = kernels.ms_per_step
            row.top_kernels = [[name, ms] for name, ms in kernels.top]
        if ranks.world_size == 1:  # sharded parameters are gathered per layer: their storages are not the model's
            phase = "saved_tensors"
            row.saved_activations_gib = saved_activation_bytes(model, next(batches), causal_lm_loss) / GIB
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        row.status = failure_status(exc)
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        row.phase = phase
        if row.status != "oom" and not isinstance(exc, ConfigError):
            traceback.print_exc(file=sys.stderr)
    row.wall_s = time.perf_counter() - t0
    return row


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=CellSpec.model, help="conf/model/<name>.yaml (source: random)")
    parser.add_argument("--pattern", default=CellSpec.pattern, help="conf/pattern/<name>.yaml")
    parser.add_argument("--sparsity", type=float, default=None, help="unstructured only (N:M fixes it)")
    parser.add_argument("--rank", type=int, default=CellSpec.rank)
    parser.add_argument("--batch-size", type=int, default=CellSpec.batch_size)
    parser.add_argument("--warmup", type=int, default=CellSpec.warmup_steps, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=CellSpec.measured_steps, help="measured steps")
    parser.add_argument("--profiled-steps", type=int, default=CellSpec.profiled_steps,
                        help="steps after the timed ones under torch.profiler for the kernel time (CUDA); 0: off")
    parser.add_argument("--seed", type=int, default=CellSpec.seed)
    parser.add_argument("--dtype", default=CellSpec.dtype)
    parser.add_argument("--device", default=CellSpec.device)
    parser.add_argument("--nproc", type=int, default=CellSpec.nproc,
                        help="GPUs per cell: > 1 runs each cell under torchrun with distributed=fsdp (FSDP2); "
                             "--batch-size is then per GPU")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for every cell's config (repeatable), e.g. targets=[q_proj,v_proj]")


def spec_from_args(args: argparse.Namespace, method: str, seq_len: int, **changes: Any) -> CellSpec:
    spec = CellSpec(model=args.model, pattern=args.pattern, sparsity=args.sparsity, method=method, seq_len=seq_len,
                    batch_size=args.batch_size, rank=args.rank, warmup_steps=args.warmup,
                    measured_steps=args.steps, profiled_steps=args.profiled_steps, seed=args.seed, dtype=args.dtype,
                    device=args.device, overrides=tuple(args.override), nproc=args.nproc)
    return replace(spec, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench.cell", description=__doc__.splitlines()[0])
    add_spec_arguments(parser)
    parser.add_argument("--method", default="lora", help="registry name[:key=value,...] or peer:<name>")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cuda-graph", action="store_true", help="trainer.cuda_graph=true")
    parser.add_argument("--gemm-tflops", type=float, default=None, help="the GPU's GEMM rate for the FLOP floor")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    # under torchrun the processes are the cell's GPUs (torchrun's parser would take a --nproc after the module)
    nproc = int(os.environ.get("WORLD_SIZE", args.nproc))
    row = run_cell(spec_from_args(args, args.method, args.seq_len, cuda_graph=args.cuda_graph,
                                  gemm_tflops=args.gemm_tflops, nproc=nproc))
    text = json.dumps(asdict(row))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the row is rank 0's to write
        return 0 if row.status == "ok" else 1
    if args.json_out is not None:
        write_text_atomic(args.json_out, text + "\n")
    print(text)
    return 0 if row.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
