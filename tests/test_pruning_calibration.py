"""Layer-wise sequential calibration (docs/methods.md §Calibration) on a tiny random LLaMA: the block-by-block
statistics equal those of a direct full-model hook capture, and the whole sequential procedure equals its naive
full-model form."""
from __future__ import annotations

import pytest
import torch

from lorsbench.config import CalibrationConfig, ConfigError, PatternConfig
from lorsbench.modules import decoder_layers, target_linears
from lorsbench.pruning.calibration import (
    c4_calibration_batches, calibration_source, capture_block_inputs, collect_statistics, prune_layerwise, run_block,
)
from lorsbench.pruning.sparsegpt import InputHessian
from lorsbench.pruning.wanda import InputNorms, wanda_mask
from tests.test_pruning import TARGETS, random_batches, tiny_llama

UNSTRUCTURED = PatternConfig("unstructured")


def _block_linears(model, index: int) -> dict:
    prefix = f"model.layers.{index}."
    return {n: m for n, m in target_linears(model, TARGETS).items() if n.startswith(prefix)}


def _full_model_stats(model, batches, index: int, stats_cls) -> dict:
    """Reference: hooks on block `index`'s linears during ordinary full-model forwards."""
    linears = _block_linears(model, index)
    stats = {n: stats_cls(m.weight.shape[1], torch.device("cpu")) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: stats[n].add(args[0])) for n, m in linears.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("stats_cls,attr", [(InputNorms, "scaler_row"), (InputHessian, "hessian")])
def test_layerwise_statistics_equal_full_model_hook_capture(stats_cls, attr):
    model = tiny_llama()
    batches = random_batches(n=3, seq_len=20)
    inputs = capture_block_inputs(model, batches, "cpu")
    assert len(inputs.hidden) == 3 and inputs.hidden[0].shape == (1, 20, 64)
    assert "position_embeddings" in inputs.kwargs[0]  # the rotary cos/sin the block needs in transformers 5
    layers = decoder_layers(model)
    for index in range(2):
        new = lambda linear: stats_cls(linear.weight.shape[1], torch.device("cpu"))  # noqa: E731
        got = collect_statistics(layers[index], _block_linears(model, index), inputs, new)
        want = _full_model_stats(model, batches, index, stats_cls)
        assert set(got) == set(want)
        for name in want:
            assert got[name].nsamples == want[name].nsamples == 3
            torch.testing.assert_close(getattr(got[name], attr), getattr(want[name], attr), rtol=1e-5, atol=1e-5)
        run_block(layers[index], inputs)  # dense block: its outputs are the next block's inputs


def test_linears_reading_the_same_input_share_statistics():
    model = tiny_llama()
    inputs = capture_block_inputs(model, random_batches(n=2), "cpu")
    new = lambda linear: InputNorms(linear.weight.shape[1], torch.device("cpu"))  # noqa: E731
    stats = collect_statistics(decoder_layers(model)[0], _block_linears(model, 0), inputs, new)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[mlp + "gate_proj"] is stats[mlp + "up_proj"]
    assert stats[attn + "o_proj"] is not stats[attn + "q_proj"] and stats[mlp + "down_proj"] is not stats[mlp + "up_proj"]


def test_layerwise_wanda_equals_naive_full_model_sequential_pruning():
    """Sequential = block l is pruned with statistics of a model whose blocks < l are already pruned."""
    batches = random_batches(n=3, seq_len=16)
    model = tiny_llama(dtype=torch.float64)
    reference = tiny_llama(dtype=torch.float64)

    def new_stats(linear):
        return InputNorms(linear.weight.shape[1], linear.weight.device)

    def prune_linear(name, linear, stats):
        mask = wanda_mask(linear.weight, stats.scaler_row, 0.5, UNSTRUCTURED)
        linear.weight.mul_(mask.to(linear.weight.dtype))
        return mask

    masks = prune_layerwise(model, batches, TARGETS, new_stats, prune_linear)
    for index in range(2):
        stats = _full_model_stats(reference, batches, index, InputNorms)
        with torch.no_grad():
            for name, linear in _block_linears(reference, index).items():
                want = prune_linear(name, linear, stats[name])
                assert torch.equal(masks[name], want), name
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_layerwise_pruning_restores_train_mode_and_device():
    model = tiny_llama().train()
    prune_layerwise(model, random_batches(n=1), TARGETS, lambda l: InputNorms(l.weight.shape[1], l.weight.device),
                    lambda n, l, s: torch.ones_like(l.weight, dtype=torch.bool), device="cpu")
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())


def test_no_calibration_samples_is_a_clear_error():
    with pytest.raises(ConfigError, match="at least one calibration sample"):
        prune_layerwise(tiny_llama(), [], TARGETS, None, None)


def test_calibration_source_pydoc_and_unknown():
    class Tok:  # one token per character: enough to exercise the split and the windows
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % 500 for c in text[:20000]]}

    batches = calibration_source(Tok(), CalibrationConfig(source="pydoc", nsamples=3, seq_len=16, seed=0))()
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (1, 16)
    with pytest.raises(ConfigError, match="unknown calibration source 'wikitext'"):
        calibration_source(Tok(), CalibrationConfig(source="wikitext"))


def test_c4_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="source=c4 needs the HuggingFace hub.*source=pydoc"):
        c4_calibration_batches(None, 2, 16, 0)
