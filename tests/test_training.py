"""The shared training loop: schedule, accumulation, clipping, logging; only the given parameters change."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from lorsbench.config import ConfigError, ProfileConfig, TrainerConfig, build_run_config
from lorsbench.training import (
    GRAPH_WARMUP_STEPS, graph_unavailable_reason, lr_lambda, scheduled_lr, set_lr, train,
)


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


# --- trainer.cuda_graph: the CPU-testable plumbing (tests/test_cuda_graph.py replays on a GPU) ---------------


def _run(config, tmp_path, name, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Toy().double()
    result = train(model, list(model.head.parameters()), _batches_f64(), config, ProfileConfig(warmup_steps=0),
                   torch.device("cpu"), log_path=tmp_path / f"{name}.jsonl", loss_fn=_loss, **kwargs)
    lines = [json.loads(l) for l in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    return model, result, lines


def _batches_f64(batch_size=8):
    for batch in _batches():
        yield {k: v.double()[:batch_size] for k, v in batch.items()}


def test_cuda_graph_on_cpu_falls_back_to_eager_with_the_reason_and_trains_the_same(tmp_path):
    config = TrainerConfig(max_steps=6, micro_batch_size=8, seq_len=1, lr=1e-2, warmup_steps=2)
    eager_model, eager, eager_log = _run(config, tmp_path, "eager")
    graph_model, graph, graph_log = _run(replace(config, cuda_graph=True), tmp_path, "graph")
    assert (eager.step_mode, eager.cuda_graph_fallback) == ("eager", None)
    assert (graph.step_mode, graph.cuda_graph_fallback) == ("eager", "no CUDA device")
    record = graph.as_dict()
    assert record["step_mode"] == "eager" and record["cuda_graph_fallback"] == "no CUDA device"
    assert [l["loss"] for l in graph_log] == [l["loss"] for l in eager_log]
    assert torch.equal(graph_model.head.weight, eager_model.head.weight)


def test_lr_written_each_step_is_the_schedule_and_matches_torch_lambdalr():
    config = TrainerConfig(max_steps=12, lr=3e-3, warmup_steps=4, min_lr_ratio=0.1)
    param = nn.Parameter(torch.zeros(2))
    # a tensor lr, as graph mode keeps it (foreach=False: CPU has no capturable AdamW)
    lr_tensor = torch.tensor(config.lr, dtype=torch.float64)
    optimizer = torch.optim.AdamW([param], lr=lr_tensor, foreach=False)
    reference = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        reference, lambda s: lr_lambda(s, config.warmup_steps, config.max_steps, config.min_lr_ratio))
    storage = lr_tensor.data_ptr()
    for step in range(config.max_steps):
        set_lr(optimizer, scheduled_lr(step, config))
        group_lr = optimizer.param_groups[0]["lr"]
        assert group_lr.data_ptr() == storage  # written in place: a captured step reads this memory
        assert float(group_lr) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12)
        reference.step()
        scheduler.step()


def test_logged_lr_follows_the_schedule(tmp_path):
    config = TrainerConfig(max_steps=8, micro_batch_size=8, seq_len=1, lr=1e-2, warmup_steps=3, min_lr_ratio=0.2)
    _, _, log = _run(config, tmp_path, "lr")
    assert [l["lr"] for l in log] == [config.lr * lr_lambda(s, 3, 8, 0.2) for s in range(8)]


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of 4 accumulate to the gradient of their batch of 8 (mean losses, equal sizes)."""
    base = TrainerConfig(max_steps=5, seq_len=1, lr=1e-2, warmup_steps=0, max_grad_norm=0.5)
    torch.manual_seed(0)
    split_model = Toy().double()
    halves = (  # each batch of 8 as two micro-batches of 4, in order
        {k: v[i:i + 4] for k, v in batch.items()} for batch in _batches_f64() for i in (0, 4))
    split = train(split_model, list(split_model.head.parameters()), halves,
                  replace(base, micro_batch_size=4, grad_accum=2), ProfileConfig(warmup_steps=0),
                  torch.device("cpu"), log_path=tmp_path / "split.jsonl", loss_fn=_loss)
    whole_model, whole, whole_log = _run(replace(base, micro_batch_size=8), tmp_path, "whole")
    split_log = [json.loads(l) for l in (tmp_path / "split.jsonl").read_text().splitlines()]
    assert split.tokens_per_step == whole.tokens_per_step == 8
    for a, b in zip(split_log, whole_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-12)
    torch.testing.assert_close(split_model.head.weight, whole_model.head.weight, rtol=1e-12, atol=1e-14)


def test_logged_grad_norm_is_the_pre_clip_norm_of_the_step(tmp_path):
    """The first step's logged grad-norm equals an independent float64 computation of ‖∇ head‖ on batch 0."""
    config = TrainerConfig(max_steps=1, micro_batch_size=8, seq_len=1, lr=1e-2, warmup_steps=0, max_grad_norm=1e-3)
    _, _, log = _run(config, tmp_path, "norm")
    torch.manual_seed(0)
    model = Toy().double()
    batch = next(_batches_f64())
    h = model.frozen(batch["x"])
    residual = model.head(h) - batch["y"]
    grad_w = 2 * residual.t() @ h / residual.numel()
    grad_b = 2 * residual.sum(0) / residual.numel()
    expected = torch.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum()).item()
    assert log[0]["grad_norm"] == pytest.approx(expected, rel=1e-10)
    assert log[0]["loss"] == pytest.approx((residual ** 2).mean().item(), rel=1e-12)


def test_cuda_graph_reasons_known_before_any_work():
    cuda, config = torch.device("cuda"), TrainerConfig(max_steps=50, cuda_graph=True)
    assert graph_unavailable_reason(config, torch.device("cpu"), Toy()) == "no CUDA device"
    assert graph_unavailable_reason(replace(config, max_steps=GRAPH_WARMUP_STEPS), cuda, Toy()) == (
        f"max_steps {GRAPH_WARMUP_STEPS} leaves no step after the {GRAPH_WARMUP_STEPS} eager warm-up steps")
    model = Toy()
    model.frozen.cuda_graph_unsupported = "draws on the host"  # a module whose choices a replay would freeze
    assert graph_unavailable_reason(config, cuda, model) == "frozen: draws on the host"


def test_sqft_nls_declares_its_host_side_rank_draws():
    """SQFT's NLS picks each layer's rank in Python every forward: a graph would replay one draw."""
    from lorsbench.config import MethodSpec
    from lorsbench.registry import build_method
    from tests.methods_helpers import context, random_masks, tiny_llama

    model = tiny_llama()
    build_method(MethodSpec(name="sqft", params={"nls": True, "rank": 8, "nls_space": (8, 4)})).attach(
        model, random_masks(model, "unstructured"), context())
    reason = graph_unavailable_reason(TrainerConfig(max_steps=50, cuda_graph=True), torch.device("cuda"), model)
    assert reason == "model.layers.0: NLS draws each layer's rank on the host every forward"


def test_cuda_graph_key_is_validated(compose):
    assert build_run_config(compose([])).trainer.cuda_graph is False
    assert build_run_config(compose(["trainer.cuda_graph=true"])).trainer.cuda_graph is True
    with pytest.raises(ConfigError, match=r"trainer.cuda_graph must be true or false, got 'yes'"):
        build_run_config(compose(["trainer.cuda_graph=yes"]))
