"""Saving a merged model as a plain HF folder with its masks, and reloading it with sparsity verification."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorsbench.config import MethodSpec, PatternConfig
from lorsbench.export import ExportError, load_merged, save_merged
from lorsbench.registry import build_method

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    batches, context, logits, random_masks, single_thread, tiny_llama,
)


def _merged(name: str):
    model = tiny_llama(torch.float32)
    masks = random_masks(model, "2of4")
    method = build_method(MethodSpec(name=name, params={"init": "lora"} if name == "lors" else {}))
    params = method.attach(model, masks, context())
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    return method.merge(model), masks


def test_round_trip_keeps_exact_zeros_and_outputs(tmp_path):
    model, masks = _merged("lors")
    summary = save_merged(model, None, masks, tmp_path, PatternConfig(name="2of4", n=2, m=4))
    assert summary["mask_preserved"] and summary["nm_valid"] and summary["sparsity"] >= 0.5
    written = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "masks.safetensors", "sparsity.json"} <= written
    reloaded = load_merged(tmp_path, dtype=torch.float32)
    ids = batches(1)[0]["input_ids"]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    for name, mask in masks.items():
        assert torch.all(reloaded.get_submodule(name).weight[~mask] == 0)


def test_reload_detects_weights_that_lost_their_zeros(tmp_path):
    model, masks = _merged("spp")
    save_merged(model, None, masks, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="down_proj: non-zero weights where the stored mask prunes them"):
        load_merged(tmp_path)
    load_merged(tmp_path, verify=False)  # the folder itself still loads


def test_dense_merge_is_saved_honestly(tmp_path):
    model, masks = _merged("lora")
    summary = save_merged(model, None, masks, tmp_path)
    assert summary["mask_preserved"] is False
    assert json.loads((tmp_path / "sparsity.json").read_text())["mask_preserved"] is False
    load_merged(tmp_path)  # consistent with what was recorded


def test_folder_without_masks_is_refused(tmp_path):
    model, masks = _merged("lors")
    model.save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="has no masks.safetensors"):
        load_merged(tmp_path)
