"""The shared training loop: schedule, accumulation, clipping, logging; only the given parameters change."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lorsbench.config import ProfileConfig, TrainerConfig
from lorsbench.training import lr_lambda, train


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min():
    values = [lr_lambda(s, warmup_steps=4, max_steps=14, min_lr_ratio=0.1) for s in range(14)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert lr_lambda(14, 4, 14, 0.1) == pytest.approx(0.1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 1)


def _loss(model, batch):
    return ((model.head(model.frozen(batch["x"])) - batch["y"]) ** 2).mean()


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield {"x": x, "y": x.sum(-1, keepdim=True)}


def test_loop_trains_only_given_params_logs_every_step(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    frozen_before = model.frozen.weight.clone()
    config = TrainerConfig(max_steps=60, micro_batch_size=8, grad_accum=2, seq_len=1, lr=1e-1, warmup_steps=2)
    result = train(model, list(model.head.parameters()), _batches(), config, ProfileConfig(warmup_steps=2),
                   torch.device("cpu"), log_path=tmp_path / "log.jsonl", loss_fn=_loss)
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and result.steps == 60 and result.measured_steps == 58
    first, last = [sum(l["loss"] for l in part) / 5 for part in (lines[:5], lines[-5:])]
    assert last < first / 4
    assert {"step", "loss", "lr", "step_ms", "grad_norm", "memory_gib", "tokens"} <= set(lines[0])
    assert torch.equal(model.frozen.weight, frozen_before)
    assert result.tokens_per_step == 16 and result.tokens_per_s > 0
    assert not model.training


def test_after_step_runs_once_per_optimizer_step():
    model = Toy()
    calls = []
    config = TrainerConfig(max_steps=3, micro_batch_size=4, grad_accum=2, seq_len=1, lr=1e-2, warmup_steps=0)
    train(model, list(model.head.parameters()), _batches(), config, ProfileConfig(warmup_steps=0),
          torch.device("cpu"), loss_fn=_loss, after_step=lambda: calls.append(model.training))
    assert calls == [True, True, True]  # inside the loop, after the step, before the model is put back in eval


def test_no_trainable_params_means_no_steps():
    result = train(Toy(), [], _batches(), TrainerConfig(max_steps=5), ProfileConfig(), torch.device("cpu"))
    assert result.steps == 0 and result.step_ms_median is None


def test_non_finite_loss_stops_the_run():
    model = Toy()
    with pytest.raises(FloatingPointError):
        train(model, list(model.head.parameters()), _batches(), TrainerConfig(max_steps=2), ProfileConfig(),
              torch.device("cpu"), loss_fn=lambda m, b: _loss(m, b) * float("nan"))
