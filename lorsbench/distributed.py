"""Several processes, one run: `distributed=fsdp` under torchrun (docs/distributed.md).

The model is sharded per decoder layer with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), then the
root module; every rank trains on its slice of each global batch through the one training loop
(`lorsbench.training.train`). What this module adds to a run, phase by phase:

- setup: the process group from torchrun's environment (nccl for CUDA tensors, gloo for CPU tensors);
- prune: rank 0 prunes first (the artifact cache + its file lock write the masks once), the others load them after
  a barrier, and every rank checks it holds the same masks;
- attach -> shard: the methods attach to the whole model as in one process, then `shard` wraps it (a method never
  knows it is sharded); frozen weights stay in the run's dtype (bf16 on CUDA), adapters keep fp32 masters;
- train: each rank reads rows `[rank*b, (rank+1)*b)` of every global batch of `world_size*b` rows, so the global
  batch is the one a single process with `micro_batch_size = world_size*b` would read; FSDP averages the
  gradients over ranks; the logged loss is averaged over ranks;
- gather: the full state dict is gathered on rank 0 into an unsharded copy of the model (its structure kept on the
  meta device since `shard`); merge, export, sparsity checks, evaluation and the record are rank 0's alone.

With `distributed=none` every helper is a no-op (`Single`), so the pipeline calls them unconditionally.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lorsbench.config import DISTRIBUTED_STRATEGIES, RunConfig
from lorsbench.errors import ConfigError
from lorsbench.records import RunRecord, write_json_atomic

SHARDING = "fsdp2_per_decoder_layer"  # the record's `sharding` value for strategy=fsdp
RUN_STAMP_ENV = "LORSBENCH_RUN_STAMP"  # conf/config.yaml: one run folder name for every rank
RANK_FAILURE = "rank{rank}.failed.json"  # what a failing rank > 0 leaves in the run folder for rank 0's record
# torchrun (and submitit's TorchDistributedEnvironment) export these; the process group reads them (env://)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

Batch = dict[str, torch.Tensor]


def _submitit_task() -> bool:
    """A task of a submitit SLURM job (hydra/launcher=slurm_*); SLURM's variables count only there (a plain sbatch
    allocation of several tasks may run one process)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def launch_rank() -> int:
    """This process's rank from the launcher's environment (torchrun's RANK, else a submitit task's SLURM id; 0
    without either): known before any process group."""
    default = os.environ.get("SLURM_PROCID", "0") if _submitit_task() else "0"
    return int(os.environ.get("RANK", default))


def launch_world_size() -> int:
    default = os.environ.get("SLURM_NTASKS", "1") if _submitit_task() else "1"
    return int(os.environ.get("WORLD_SIZE", default))


def _export_submitit_env() -> None:
    """In a submitit task of several (hydra/launcher=slurm_multigpu): torchrun's variables from its job environment."""
    if "RANK" not in os.environ and _submitit_task() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()


def check_launch(cfg: RunConfig, scheduled: bool) -> None:
    """The launcher, the strategy and the run agree: raise ConfigError naming what to change (before any work)."""
    strategy = cfg.distributed.strategy
    if strategy not in DISTRIBUTED_STRATEGIES:
        raise ConfigError(f"distributed.strategy must be one of {', '.join(DISTRIBUTED_STRATEGIES)}, "
                          f"got {strategy!r}")
    world = launch_world_size()
    if strategy == "none" and world > 1:
        raise ConfigError(f"launched as {world} processes (WORLD_SIZE={world}) with distributed=none: every rank "
                          "would run the whole pipeline into the same folder; add distributed=fsdp")
    if strategy == "fsdp":
        _export_submitit_env()
        missing = [k for k in LAUNCH_ENV if k not in os.environ]
        if missing:
            raise ConfigError(f"distributed=fsdp needs the launcher's environment ({', '.join(missing)} unset): "
                              "launch with `python -m torch.distributed.run --nproc_per_node N -m lorsbench ...` "
                              "(or hydra/launcher=slurm_multigpu)")
        if cfg.trainer.cuda_graph:
            raise ConfigError("trainer.cuda_graph=true with distributed=fsdp: FSDP's collectives run eagerly; "
                              "use trainer.cuda_graph=false")
        if scheduled:
            raise ConfigError(f"method {cfg.method.name} prunes in rounds (a prune schedule, lorsbench.schedule), "
                              "which distributed=fsdp does not run; use distributed=none")


def init_process_group() -> None:
    """Join torchrun's process group once (idempotent): gloo for CPU tensors and, with CUDA, nccl for CUDA
    tensors on this rank's LOCAL_RANK device. Destroyed at exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    _export_submitit_env()
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def share_run_stamp() -> None:
    """Give every rank rank 0's start time in RUN_STAMP_ENV, so Hydra names one run (or sweep) folder for all
    of them (conf/config.yaml `hydra.run.dir`); without a launcher nothing is set."""
    if launch_world_size() <= 1 and "RANK" not in os.environ:
        return
    import torch.distributed as dist
    from datetime import datetime

    init_process_group()
    stamp = [datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")]
    dist.broadcast_object_list(stamp, src=0, group=_cpu_group())
    os.environ[RUN_STAMP_ENV] = stamp[0]


_CPU_GROUP: list = []


def _cpu_group():
    """A gloo group over every rank for small host objects (the default group may be nccl-only on CUDA)."""
    import torch.distributed as dist

    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


class RankRecord(RunRecord):
    """The record of a rank > 0: never written as run.json (rank 0 writes the one record); a failure is written as
    RANK_FAILURE in the run folder, so rank 0's record can name the rank and phase that failed first."""

    def __init__(self, folder: str | Path, rank: int, **fields: Any):
        super().__init__(folder, **fields)
        self.rank = rank

    def save(self) -> Path:
        path = self.folder / RANK_FAILURE.format(rank=self.rank)
        if self["status"] in ("failed", "oom"):
            write_json_atomic(path, {k: self.get(k) for k in ("status", "error", "error_type", "phase_failed")}
                              | {"rank": self.rank})
        return path


def rank_file(name: str) -> str:
    """`name` on rank 0 (or alone), `<stem>.rank<R><suffix>` on rank R > 0: per-rank files in the shared folder."""
    rank = launch_rank()
    if rank == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.rank{rank}{dot}{suffix}"


def new_record(folder: str | Path, **fields: Any) -> RunRecord:
    """rank 0's (or the only) RunRecord, or a RankRecord on the other ranks."""
    rank = launch_rank()
    return RunRecord(folder, **fields) if rank == 0 else RankRecord(folder, rank, **fields)


# What rank 0 sees when another rank died: torchrun's SIGTERM, or a collective that lost its peer.
_PEER_LOST = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out")


def _lost_a_peer(record: RunRecord) -> bool:
    if record.get("status") == "interrupted" or str(record.get("error_type") or "").startswith("Dist"):
        return True
    return any(text in str(record.get("error") or "").lower() for text in _PEER_LOST)


def blame_failed_rank(record: RunRecord) -> None:
    """On rank 0, when its run ended by losing another rank (torchrun's SIGTERM, a broken collective) and that rank
    left a failure note: the record names that rank's error and phase, the cause. Rank 0's own error is kept."""
    if isinstance(record, RankRecord) or not _lost_a_peer(record):
        return
    notes = sorted(record.folder.glob(RANK_FAILURE.format(rank="*")))
    if not notes:
        return
    note = json.loads(notes[0].read_text())
    record.update(status=note["status"], error=f"rank {note['rank']}: {note['error']}",
                  error_type=note["error_type"], phase_failed=note["phase_failed"])


class Single:
    """One process: every helper is the identity."""

    strategy = "none"
    sharding = None
    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, device: torch.device):
        self.device = device  # where this rank trains

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "sharding": self.sharding}

    @contextlib.contextmanager
    def rank0_first(self) -> Iterator[None]:
        yield

    def check_same(self, what: str, value: str) -> None:
        """Every rank holds the same `value` (e.g. the mask digest)."""

    def batches(self, make: Callable[[int], Iterator[Batch]], micro_batch_size: int) -> Callable[[], Iterator[Batch]]:
        """A fresh iterator over this rank's micro-batches; `make(rows)` iterates over global batches."""
        return lambda: make(micro_batch_size)

    def shard(self, model: nn.Module, params: list[nn.Parameter]) -> tuple[nn.Module, list[nn.Parameter]]:
        """The model (and its trainable parameters) as the training loop sees them."""
        return model, params

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged over ranks."""
        return values

    def maximum(self, value: float) -> float:
        return value

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The whole trained model on rank 0 (None on the other ranks)."""
        return model


class FSDP(Single):
    """FSDP2 over every rank of torchrun's process group (the module docstring says what each phase does)."""

    strategy = "fsdp"
    sharding = SHARDING

    def __init__(self, device: torch.device, reshard_after_forward: bool = True):
        import torch.distributed as dist

        init_process_group()
        self.dist = dist
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        if device.type == "cuda":  # one GPU per rank: torchrun's LOCAL_RANK
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        super().__init__(device)
        self.reshard_after_forward = reshard_after_forward
        self.skeleton: nn.Module | None = None

    def barrier(self) -> None:
        self.dist.barrier(group=_cpu_group())

    @contextlib.contextmanager
    def rank0_first(self) -> Iterator[None]:
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def check_same(self, what: str, value: str) -> None:
        values: list = [None] * self.world_size
        self.dist.all_gather_object(values, value, group=_cpu_group())
        if len(set(values)) != 1:
            raise RuntimeError(f"the ranks hold different {what}: {values}")

    def batches(self, make, micro_batch_size):
        return rank_slices(make, micro_batch_size, self.rank, self.world_size)

    def shard(self, model, params):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from lorsbench.modules import decoder_layers

        if self.is_main:
            self.skeleton = meta_copy(model)
        check_no_gradient_hooks(model)
        names = {id(p): n for n, p in model.named_parameters()}
        # param_dtype=None: every parameter is gathered in the dtype it is stored in (frozen base: the run's dtype;
        # adapters: their fp32 masters, cast by the method itself as in one process); gradients reduce in fp32.
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        mesh = _mesh(self.device, self.world_size)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        sharded = dict(model.named_parameters())
        return model, [sharded[names[id(p)]] for p in params]

    def mean(self, values):
        total = values.detach().clone()
        self.dist.all_reduce(total, op=self.dist.ReduceOp.SUM)  # gloo has no AVG
        return total / self.world_size

    def maximum(self, value):
        values: list = [None] * self.world_size
        self.dist.all_gather_object(values, value, group=_cpu_group())
        return max(values)

    def full_model(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        full = self.skeleton
        full.load_state_dict(state, strict=True, assign=True)
        return full.to(self.device)


def check_no_gradient_hooks(model: nn.Module) -> None:
    """FSDP replaces every parameter by its shard: a hook on an original parameter's gradient would never run
    (the method's math would silently change), so such a model is refused."""
    hooked = [n for n, p in model.named_parameters() if p.requires_grad and getattr(p, "_backward_hooks", None)]
    if hooked:
        raise ConfigError(f"distributed=fsdp: this method hooks its parameters' gradients ({hooked[0]}, ...), which "
                          "FSDP's sharded parameters do not keep; use distributed=none")


def rank_slices(make: Callable[[int], Iterator[Batch]], rows: int, rank: int,
                world_size: int) -> Callable[[], Iterator[Batch]]:
    """A fresh iterator over rows `[rank*rows, (rank+1)*rows)` of every global batch `make(world_size*rows)`."""
    lo, hi = rank * rows, (rank + 1) * rows

    def mine() -> Iterator[Batch]:
        for batch in make(rows * world_size):
            yield {k: v[lo:hi] for k, v in batch.items()}

    return mine


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose parameters and persistent buffers are on the meta device (no memory);
    non-persistent buffers (a method's masks) are shared with `model`. `load_state_dict(..., assign=True)` fills it."""
    persistent = set()
    for module in model.modules():
        persistent.update(id(b) for n, b in module._buffers.items()
                          if b is not None and n not in module._non_persistent_buffers_set)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta") if id(b) in persistent else b
    return copy.deepcopy(model, memo)


def _mesh(device: torch.device, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


@dataclass(frozen=True)
class Peaks:
    """Peak memory of the training phase: rank 0's and the maximum over ranks (GiB; allocated on CUDA, RSS on CPU)."""

    rank0_gib: float | None
    max_over_ranks_gib: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {"peak_mem_gib_rank0": self.rank0_gib, "peak_mem_gib_max_over_ranks": self.max_over_ranks_gib}


def train_peaks(ranks: Single, stats) -> Peaks:
    """`stats` (this rank's PhaseStats of train) -> Peaks over every rank (a collective on FSDP)."""
    mine = stats.peak_alloc_gib if stats.peak_alloc_gib is not None else stats.peak_rss_gib
    highest = ranks.maximum(mine) if mine is not None else None
    return Peaks(rank0_gib=mine if ranks.is_main else None, max_over_ranks_gib=highest)


def start(cfg: RunConfig, device: torch.device, scheduled: bool) -> Single:
    """The helpers of the run's strategy, after `check_launch` (FSDP joins the process group)."""
    check_launch(cfg, scheduled)
    if cfg.distributed.strategy == "fsdp":
        return FSDP(device, cfg.distributed.reshard_after_forward)
    return Single(device)
