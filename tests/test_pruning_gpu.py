"""Block-by-block pruning on an accelerator for a model that stays in CPU memory (the 7B-on-one-GPU layout):
same result as on the CPU, nothing left on the GPU, peak GPU memory about one block."""
from __future__ import annotations

import pytest
import torch

from lorsbench.config import PatternConfig
from lorsbench.pruning.artifacts import prune_model
from tests.test_pruning import pruning_config, random_batches, tiny_llama

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [PatternConfig("unstructured"), PatternConfig("2of4", 2, 4)], ids=lambda p: p.name)
def test_cpu_model_pruned_block_by_block_on_cuda_matches_cpu(tmp_path, name, pattern):
    config = pruning_config(name, 0.5, pattern)
    cpu_model, gpu_model = tiny_llama(), tiny_llama()
    on_cpu = prune_model(cpu_model, config, random_batches, tmp_path / "cpu", "tiny")
    on_gpu = prune_model(gpu_model, config, random_batches, tmp_path / "gpu", "tiny", device="cuda")
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())
    assert all(b.device.type == "cpu" for b in gpu_model.buffers())
    agree = sum(int((on_cpu.masks[k] == on_gpu.masks[k]).sum()) for k in on_cpu.masks)
    total = sum(m.numel() for m in on_cpu.masks.values())
    assert agree / total > 0.995  # fp32 sums in another order may flip near-ties
    assert on_gpu.report.sparsity == pytest.approx(0.5)


def test_peak_gpu_memory_is_about_one_block(tmp_path):
    model = tiny_llama(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8,
                       num_key_value_heads=8)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    layers_bytes = block_bytes * len(model.model.layers)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prune_model(model, pruning_config("sparsegpt", 0.5, PatternConfig("unstructured")),
                lambda: random_batches(n=4, seq_len=64), tmp_path, "mid", device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.5 * layers_bytes, (peak, block_bytes, layers_bytes)
    assert torch.cuda.memory_allocated() - base < block_bytes / 4  # the block went back
