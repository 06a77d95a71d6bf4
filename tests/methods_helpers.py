"""Tiny models, stored masks and contexts for the method tests (float64 unless a test says otherwise)."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench.composition import default_targets
from lorsbench.config import PatternConfig
from lorsbench.registry import MethodContext
from lorsbench.modules import target_linears
from lorsbench.pruning.masks import MaskSet, apply_masks, mask_from_scores

TARGETS = default_targets()
VOCAB = 64
PATTERNS = {
    "unstructured": PatternConfig(name="unstructured"),
    "2of4": PatternConfig(name="2of4", n=2, m=4),
}


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 64, MLP 128, 4 heads / 2 KV heads: every d_out divisible by 16 (SPP) and 4 (2:4)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def random_masks(model: nn.Module, pattern: str, sparsity: float = 0.5, seed: int = 1) -> MaskSet:
    """Stored keep-masks from random scores (magnitude would tie masks to weights; random is stricter),
    applied to the model's weights like the pruning phase does."""
    generator = torch.Generator().manual_seed(seed)
    masks = MaskSet()
    for name, linear in target_linears(model, TARGETS).items():
        scores = torch.rand(linear.weight.shape, generator=generator)
        masks[name] = mask_from_scores(scores, sparsity, PATTERNS[pattern])
    apply_masks(model, masks)
    return masks


def batches(n: int = 100, batch_size: int = 2, seq_len: int = 8, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def context(data: list[dict[str, torch.Tensor]] | None = None, seed: int = 0) -> MethodContext:
    data = batches() if data is None else data

    def train_batches() -> Iterator[dict[str, torch.Tensor]]:
        return iter(data)

    return MethodContext(targets=TARGETS, device=torch.device("cpu"), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed), train_batches=train_batches,
                         loss_fn=loss_fn)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_large_tensors(module: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward of `module(x)` that are at least d_out×d_in in size and
    are not the module's own parameters or buffers (references cost no memory)."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    threshold = module.in_features * module.out_features
    found: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor):
        if t.numel() >= threshold and t.untyped_storage().data_ptr() not in own:
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.sum().backward()
    return found


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread (on a shared 2-core machine, more threads only spin and wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
