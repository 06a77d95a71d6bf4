"""trainer.cuda_graph on a GPU: the captured step replays the eager training trajectory for every registered
method (user path: conf/method YAML defaults -> build_method -> attach -> THE loop), and a step that cannot be
captured falls back to eager with the reason recorded. Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lorsbench.config import ProfileConfig, TrainerConfig
from lorsbench.registry import MethodContext, build_method, list_methods
from lorsbench.training import train
from tests.methods_helpers import TARGETS, batches, random_masks, tiny_llama

pytestmark = pytest.mark.gpu
STEPS = 24
CUDA = torch.device("cuda")


def _batches(n: int, batch_size: int = 2, seq_len: int = 32) -> list[dict[str, torch.Tensor]]:
    return batches(n, batch_size, seq_len)


def _loss(model, batch):
    return model(**batch).loss


def _train(method_name: str, config: TrainerConfig, tmp_path, tag: str, loss_fn=_loss):
    from lorsbench.bench.cell import method_spec  # conf/method/<name>.yaml defaults, r 16, init=lora

    torch.manual_seed(0)
    model = tiny_llama(torch.float32).to(CUDA, torch.bfloat16)
    masks = random_masks(model, "2of4")
    method = build_method(method_spec(method_name, 16))
    data = _batches(4 * STEPS)
    ctx = MethodContext(targets=TARGETS, device=CUDA, dtype=torch.bfloat16,
                        generator=torch.Generator().manual_seed(0), train_batches=lambda: iter(data), loss_fn=_loss)
    params = method.attach(model, masks, ctx)
    if not params:
        pytest.skip(f"{method_name} trains no parameters")
    torch.manual_seed(1)  # dropout draws
    log = tmp_path / f"{method_name}-{tag}.jsonl"
    result = train(model, params, iter(data), config, ProfileConfig(warmup_steps=0), CUDA, log_path=log,
                   loss_fn=loss_fn)
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    return result, losses, [p.detach().float().cpu() for p in params]


CONFIG = TrainerConfig(max_steps=STEPS, micro_batch_size=2, grad_accum=1, seq_len=32, lr=1e-3, warmup_steps=4,
                       max_grad_norm=1.0)


@pytest.mark.parametrize("method_name", list_methods())
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_graph_replay_trains_like_eager(method_name, grad_accum, tmp_path):
    config = replace(CONFIG, grad_accum=grad_accum)
    eager, eager_losses, eager_params = _train(method_name, config, tmp_path, "eager")
    graph, graph_losses, graph_params = _train(method_name, replace(config, cuda_graph=True), tmp_path, "graph")
    assert eager.step_mode == "eager"
    assert (graph.step_mode, graph.cuda_graph_fallback) == ("cuda_graph", None), graph.cuda_graph_fallback
    assert len(graph_losses) == len(eager_losses) == STEPS
    assert eager_losses[-1] < eager_losses[0]  # it trains at all
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-2, atol=1e-2)
    for g, e in zip(graph_params, eager_params):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)


def test_a_step_that_syncs_the_host_falls_back_to_eager_with_the_reason(tmp_path):
    def syncing_loss(model, batch):
        loss = _loss(model, batch)
        if loss.item() < 0:  # a host read: illegal while a stream is being captured
            raise AssertionError("negative loss")
        return loss

    _, eager_losses, _ = _train("lora", CONFIG, tmp_path, "eager")
    graph, graph_losses, _ = _train("lora", replace(CONFIG, cuda_graph=True), tmp_path, "graph", syncing_loss)
    assert graph.step_mode == "eager"
    assert graph.cuda_graph_fallback.startswith("capture failed: "), graph.cuda_graph_fallback
    assert graph.as_dict()["cuda_graph_fallback"] == graph.cuda_graph_fallback
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-2, atol=1e-2)


def test_a_batch_of_another_shape_is_a_clear_error_under_replay(tmp_path):
    from lorsbench.bench.cell import method_spec

    torch.manual_seed(0)
    model = tiny_llama(torch.float32).to(CUDA, torch.bfloat16)
    params = build_method(method_spec("lora", 16)).attach(
        model, random_masks(model, "2of4"),
        MethodContext(targets=TARGETS, device=CUDA, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0)))
    data = _batches(8) + _batches(1, seq_len=16)
    with pytest.raises(ValueError, match=r"batch 'input_ids' is \(2, 16\).*captured \(2, 32\)"):
        train(model, params, iter(data), replace(CONFIG, max_steps=9, cuda_graph=True), ProfileConfig(), CUDA,
              loss_fn=_loss)
