"""Saving and reloading a merged sparse model (docs/methods.md §Mask artifacts).

`save_merged` writes an ordinary Hugging Face folder (dense tensors holding exact zeros, loadable by
`from_pretrained` and stock lm-eval) plus `masks.safetensors` (the stored keep-masks) and `sparsity.json`
(per-module zero counts and whether each pruned position is still zero). `load_merged` reloads the folder and,
with `verify=True`, checks the reloaded weights against both files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorsbench.config import PatternConfig
from lorsbench.pruning.masks import MaskSet, nm_valid
from lorsbench.records import write_json_atomic

MASKS_FILE = "masks.safetensors"
SPARSITY_FILE = "sparsity.json"
SPARSITY_SCHEMA = 1


class ExportError(ValueError):
    """A merged folder whose weights do not match its recorded masks or sparsity."""


def _module_stats(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    weight = weight.detach()
    mask = mask.to(weight.device)
    return {
        "shape": list(weight.shape),
        "zeros": int((weight == 0).sum()),
        "numel": weight.numel(),
        "mask_kept": int(mask.sum()),
        "mask_preserved": bool((weight[~mask] == 0).all()),
    }


def sparsity_summary(model: nn.Module, masks: MaskSet, pattern: PatternConfig | None = None) -> dict[str, Any]:
    """What `sparsity.json` holds: per masked module its exact-zero count and mask preservation, and totals."""
    modules = dict(model.named_modules())
    missing = sorted(set(masks) - set(modules))
    if missing:
        raise ExportError(f"masks name modules the model does not have: {missing[:5]}")
    per_module = {name: _module_stats(modules[name].weight, mask) for name, mask in sorted(masks.items())}
    zeros = sum(m["zeros"] for m in per_module.values())
    total = sum(m["numel"] for m in per_module.values())
    summary: dict[str, Any] = {
        "schema": SPARSITY_SCHEMA,
        "sparsity": zeros / total if total else 0.0,
        "mask_sparsity": masks.sparsity(),
        "mask_digest": masks.digest(),
        "mask_preserved": all(m["mask_preserved"] for m in per_module.values()),
        "pattern": None if pattern is None else pattern.name,
        "nm_valid": None,
        "modules": per_module,
    }
    if pattern is not None and pattern.is_nm:
        summary["nm_valid"] = all(nm_valid(modules[n].weight.detach(), pattern.n, pattern.m) for n in masks)
    return summary


def save_merged(model: nn.Module, tokenizer: Any, masks: MaskSet, folder: str | Path,
                pattern: PatternConfig | None = None) -> dict[str, Any]:
    """Write `model` (a merged, plain HF model) with `save_pretrained`, the tokenizer if given, the masks and
    `sparsity.json`. Returns the sparsity summary. A dense merge (LoRA, SLoPe) is saved too; its summary says
    `mask_preserved: false`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = sparsity_summary(model, masks, pattern)
    model.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    masks.save(folder / MASKS_FILE)
    write_json_atomic(folder / SPARSITY_FILE, summary)
    return summary


def verify_merged(model: nn.Module, folder: str | Path) -> dict[str, Any]:
    """Check a reloaded model against `masks.safetensors` and `sparsity.json`: every module's exact-zero
    count as saved, and zero at every pruned position wherever that was true at save. Raises ExportError."""
    folder = Path(folder)
    for needed in (MASKS_FILE, SPARSITY_FILE):
        if not (folder / needed).exists():
            raise ExportError(f"{folder} has no {needed}: it was not written by lorsbench.export.save_merged")
    masks = MaskSet.load(folder / MASKS_FILE)
    recorded = json.loads((folder / SPARSITY_FILE).read_text())
    if recorded.get("mask_digest") != masks.digest():
        raise ExportError(f"{folder}: {MASKS_FILE} does not match the mask digest recorded in {SPARSITY_FILE}")
    current = sparsity_summary(model, masks)
    problems = []
    for name, saved in recorded["modules"].items():
        now = current["modules"].get(name)
        if now is None:
            problems.append(f"{name}: missing from the reloaded model")
        elif saved["mask_preserved"] and not now["mask_preserved"]:
            problems.append(f"{name}: non-zero weights where the stored mask prunes them")
        elif now["zeros"] != saved["zeros"]:
            problems.append(f"{name}: {now['zeros']} exact zeros, {saved['zeros']} when saved")
    if problems:
        raise ExportError(f"{folder}: the reloaded weights do not match the saved sparsity: "
                          + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return current


def load_merged(folder: str | Path, verify: bool = True, **from_pretrained: Any) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(folder)`; with `verify`, check the sparsity against the saved
    masks and counts (ExportError if they differ)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained)
    if verify:
        verify_merged(model, folder)
    return model
