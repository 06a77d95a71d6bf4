"""THE training loop, shared by every method: AdamW, linear warm-up + cosine decay, gradient accumulation,
gradient clipping, fixed sequence length, seeded data order. A method only changes modules and parameters."""
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
from lorsbench.profiling import StepTimer, current_memory_gib, synchronize

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


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


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    step_ms_median: float | None
    step_ms_p90: float | None
    measured_steps: int
    tokens_per_step: int
    tokens_per_s: float | None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["train_steps"] = out.pop("steps")
        return out


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
) -> TrainResult:
    """Run `config.max_steps` optimizer steps over `params`; log one JSON line per step to `log_path`.

    `after_step` runs after each step, outside the timed region (the benchmark's profiler advances on it).

    `tokens_per_s` counts every position of the fixed-length batches (padding included), so methods compare on
    identical shapes.
    """
    tokens_per_step = config.micro_batch_size * config.grad_accum * config.seq_len
    if not params or config.max_steps == 0:
        return TrainResult(0, None, None, None, 0, tokens_per_step, None)

    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    )
    timer = StepTimer(warmup_steps=profile.warmup_steps, sync=lambda: synchronize(device))
    log_file = open(log_path, "w") if log_path is not None else None
    model.train()
    loss_value = None
    try:
        progress = tqdm(range(config.max_steps), desc="train", unit="step", dynamic_ncols=True)
        for step in progress:
            lr = scheduler.get_last_lr()[0]
            timer.start()
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                loss = loss_fn(model, batch)
                (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach())
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_ms = timer.stop()
            loss_value = loss_sum / config.grad_accum
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
    )
