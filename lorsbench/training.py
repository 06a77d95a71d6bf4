"""THE training loop, shared by every method: AdamW, linear warm-up + cosine decay, gradient accumulation,
gradient clipping, fixed sequence length, seeded data order. A method only changes modules and parameters.

`trainer.cuda_graph=true` runs the same step body (`step_body`) captured once in a CUDA graph and replayed per
step (PyTorch's "CUDA Graphs" notes, whole-network capture; docs/measurement.md §CUDA graphs): static batch
buffers, eager warm-up steps on a side stream, AdamW with `capturable=True` and the lr in a device tensor that the
host writes before each replay. Where capture cannot run (no CUDA device, an op that syncs or is not capturable), the run
continues eagerly and records why (`TrainResult.cuda_graph_fallback`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lorsbench.config import ProfileConfig, TrainerConfig
from lorsbench.distributed import Single
from lorsbench.profiling import StepTimer, current_memory_gib, synchronize

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
StepFn = Callable[[list[Batch]], torch.Tensor]

STEP_MODES = ("eager", "cuda_graph")
# Eager steps before the capture (on a side stream, as PyTorch's graph docs ask): they initialise AdamW's state,
# cuBLAS workspaces and Triton's compiled kernels, so the capture records steady-state work. They are real steps.
GRAPH_WARMUP_STEPS = 3


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (HF's shifted loss)."""
    return model(**batch).loss


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_lr(step: int, config: TrainerConfig) -> float:
    """The lr of optimizer step `step`: `config.lr * lr_lambda(step)` (what `LambdaLR` would set)."""
    return config.lr * lr_lambda(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the step's lr into every group; a tensor lr (graph mode) is filled in place, so the captured
    optimizer step reads it on replay."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_optimizer(params: list[nn.Parameter], config: TrainerConfig, capturable: bool) -> torch.optim.AdamW:
    """AdamW over `params`; `capturable=True` keeps its step counters and lr on the parameters' device."""
    lr: float | torch.Tensor = config.lr
    if capturable:
        lr = torch.tensor(config.lr, dtype=torch.float32, device=params[0].device)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                             weight_decay=config.weight_decay, capturable=capturable)


def step_body(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, loss_fn: LossFn,
              max_grad_norm: float | None, micro_batches: list[Batch]) -> torch.Tensor:
    """One optimizer step from zeroed (None) gradients: forward + backward of each micro-batch (gradients
    accumulate, each loss scaled by 1/len), clipping, the optimizer step. Returns one device tensor (float32, or
    float64 for float64 losses) `[loss_0, ..., loss_{k-1}(, grad_norm)]`: no host sync here, the graph captures
    exactly this function."""
    losses = []
    for batch in micro_batches:
        loss = loss_fn(model, batch)
        (loss / len(micro_batches)).backward()
        losses.append(loss.detach())
    if max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # sharded (DTensor) parameters: a DTensor
        losses.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in losses) else torch.float32
    return torch.stack([v.to(dtype) for v in losses])


class CaptureFailed(RuntimeError):
    """The step could not be captured; the message is the recorded reason."""


class GraphStep:
    """`step_body` captured once in a CUDA graph after `warmup` eager steps on a side stream, then replayed.

    The first replayed step's batch is copied into static buffers before the capture; later batches are
    copied into the same buffers (shapes and dtypes must stay the same: the trainer's fixed seq_len). The
    gradients live in the graph's memory pool: the captured backward writes them from None, so replays never
    zero them.
    """

    def __init__(self, run: StepFn, optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup: int = GRAPH_WARMUP_STEPS):
        self.run, self.optimizer, self.device, self.warmup = run, optimizer, device, warmup
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batches: list[Batch] = []
        self.static_out: torch.Tensor | None = None

    def __call__(self, micro_batches: list[Batch]) -> torch.Tensor:
        self.steps += 1
        if self.graph is None and self.steps <= self.warmup:
            return self._eager_on_side_stream([_to_device(b, self.device) for b in micro_batches])
        if self.graph is None:
            self._capture(micro_batches)
        else:
            self._fill(micro_batches)
        self.graph.replay()
        return self.static_out

    def _eager_on_side_stream(self, batches: list[Batch]) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.run(batches)
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, micro_batches: list[Batch]) -> None:
        self.static_batches = [{k: v.to(self.device).clone() for k, v in b.items()} for b in micro_batches]
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph):
                self.static_out = self.run(self.static_batches)
        except Exception as exc:  # any capture failure: run this step and the rest eagerly
            torch.cuda.set_stream(stream)  # a failed capture_end can leave the capture stream current
            self.optimizer.zero_grad(set_to_none=True)
            cause = exc.__context__ if exc.__context__ is not None else exc
            raise CaptureFailed(f"capture failed: {_one_line(cause)}") from exc
        self.graph = graph

    def _fill(self, micro_batches: list[Batch]) -> None:
        if len(micro_batches) != len(self.static_batches):
            raise ValueError(f"cuda_graph: {len(micro_batches)} micro-batches, the graph captured "
                             f"{len(self.static_batches)}")
        for static, batch in zip(self.static_batches, micro_batches):
            if batch.keys() != static.keys():
                raise ValueError(f"cuda_graph: batch keys {sorted(batch)} differ from the captured "
                                 f"{sorted(static)}")
            for key, value in batch.items():
                if value.shape != static[key].shape or value.dtype != static[key].dtype:
                    raise ValueError(
                        f"cuda_graph: batch '{key}' is {tuple(value.shape)} {value.dtype}, the graph captured "
                        f"{tuple(static[key].shape)} {static[key].dtype} (every batch must have the same shape; "
                        "use trainer.cuda_graph=false for variable shapes)")
                static[key].copy_(value, non_blocking=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    step_ms_median: float | None
    step_ms_p90: float | None
    measured_steps: int
    tokens_per_step: int
    tokens_per_s: float | None
    step_mode: str = "eager"  # eager | cuda_graph: how the timed steps ran
    cuda_graph_fallback: str | None = None  # why cuda_graph=true ran eagerly; None when it did not

    def as_dict(self) -> dict:
        out = asdict(self)
        out["train_steps"] = out.pop("steps")
        return out


def graph_unavailable_reason(config: TrainerConfig, device: torch.device, model: nn.Module) -> str | None:
    """Why `cuda_graph=true` cannot be tried at all (known before any work), or None.

    A module whose forward makes host-side choices that a replay would freeze (no sync, so the capture itself
    would succeed) says so in a `cuda_graph_unsupported` attribute holding the reason."""
    if device.type != "cuda":
        return "no CUDA device"
    if config.max_steps <= GRAPH_WARMUP_STEPS:
        return f"max_steps {config.max_steps} leaves no step after the {GRAPH_WARMUP_STEPS} eager warm-up steps"
    for name, module in model.named_modules():
        reason = getattr(module, "cuda_graph_unsupported", None)
        if reason:
            return f"{name or type(module).__name__}: {reason}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[Batch],
    config: TrainerConfig,
    profile: ProfileConfig,
    device: torch.device,
    log_path: Path | None = None,
    loss_fn: LossFn = causal_lm_loss,
    after_step: Callable[[], None] | None = None,
    ranks: Single | None = None,
) -> TrainResult:
    """Run `config.max_steps` optimizer steps over `params`; log one JSON line per step to `log_path`.

    `after_step` runs after each step, outside the timed region (the benchmark's profiler advances on it).
    `ranks` (lorsbench.distributed): under FSDP each rank passes its slice of the global batch, the logged loss is
    the mean over ranks and tokens count the global batch; None: one process.

    `tokens_per_s` counts every position of the fixed-length batches (padding included), so methods compare on
    identical shapes. In graph mode the timer also skips the warm-up and capture steps, so the timed steps are
    replays.
    """
    ranks = ranks or Single(device)
    tokens_per_step = config.micro_batch_size * config.grad_accum * config.seq_len * ranks.world_size
    if not params or config.max_steps == 0:
        return TrainResult(0, None, None, None, 0, tokens_per_step, None)

    fallback = graph_unavailable_reason(config, device, model) if config.cuda_graph else None
    use_graph = config.cuda_graph and fallback is None
    optimizer = make_optimizer(params, config, capturable=use_graph)

    def run(micro_batches: list[Batch]) -> torch.Tensor:
        return step_body(model, params, optimizer, loss_fn, config.max_grad_norm, micro_batches)

    def eager(micro_batches: list[Batch]) -> torch.Tensor:
        out = run([_to_device(b, device) for b in micro_batches])
        optimizer.zero_grad(set_to_none=True)
        return out

    step_fn: StepFn = GraphStep(run, optimizer, device) if use_graph else eager
    timer_warmup = max(profile.warmup_steps, GRAPH_WARMUP_STEPS + 1) if use_graph else profile.warmup_steps
    timer = StepTimer(warmup_steps=timer_warmup, sync=lambda: synchronize(device))
    log_file = open(log_path, "w") if log_path is not None else None
    model.train()
    loss_value = None
    try:
        progress = tqdm(range(config.max_steps), desc="train", unit="step", dynamic_ncols=True)
        for step in progress:
            lr = scheduled_lr(step, config)
            set_lr(optimizer, lr)
            timer.start()
            micro_batches = [next(batches) for _ in range(config.grad_accum)]
            try:
                out = step_fn(micro_batches)
            except CaptureFailed as failed:
                fallback, step_fn = str(failed), eager
                out = step_fn(micro_batches)
            values = ranks.mean(out).tolist()  # the one host copy per step: losses (rank mean) and grad-norm
            step_ms = timer.stop()
            loss_value = sum(values[: config.grad_accum]) / config.grad_accum
            grad_norm = values[config.grad_accum] if config.max_grad_norm else None
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}")
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if log_file is not None:
                log_file.write(json.dumps({
                    "step": step, "loss": loss_value, "lr": lr, "step_ms": step_ms, "grad_norm": grad_norm,
                    "memory_gib": current_memory_gib(device), "tokens": tokens_per_step,
                }) + "\n")
                log_file.flush()
            if after_step is not None:
                after_step()
    finally:
        if log_file is not None:
            log_file.close()
        model.eval()
    summary = timer.summary()
    median = summary["step_ms_median"]
    return TrainResult(
        steps=config.max_steps,
        final_loss=loss_value,
        step_ms_median=median,
        step_ms_p90=summary["step_ms_p90"],
        measured_steps=summary["measured_steps"],
        tokens_per_step=tokens_per_step,
        tokens_per_s=None if not median else tokens_per_step / (median / 1000.0),
        step_mode="cuda_graph" if isinstance(step_fn, GraphStep) else "eager",
        cuda_graph_fallback=fallback,
    )
