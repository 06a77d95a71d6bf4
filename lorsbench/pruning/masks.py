"""Keep-masks (True = kept weight) and the sparsity checks every run records (docs/methods.md §Mask artifacts).

Comparison groups (docs/methods.md §Sparsity patterns): `matrix` (one threshold per weight matrix, magnitude),
`row` (per output row, Wanda); N:M groups are M consecutive input columns of one row.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorsbench.config import ConfigError, PatternConfig
from lorsbench.modules import target_linears


def check_nm_divides(name: str, d_in: int, pattern: PatternConfig) -> None:
    if pattern.is_nm and d_in % pattern.m:
        raise ConfigError(
            f"pattern {pattern.name} needs the input width of every target to be divisible by {pattern.m}; "
            f"{name} has d_in={d_in}"
        )


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: PatternConfig, group: str = "matrix") -> torch.Tensor:
    """Keep-mask that drops the lowest `scores`.

    Unstructured: exactly floor(sparsity * group size) entries dropped per comparison group
    (`matrix` or `row`). N:M: the (m - n) lowest of every m consecutive input columns per row are dropped.
    Ties are broken by a stable sort (lower index dropped first).
    """
    d_out, d_in = scores.shape
    scores = scores.float()
    if pattern.is_nm:
        check_nm_divides("weight", d_in, pattern)
        groups = scores.reshape(d_out, d_in // pattern.m, pattern.m)
        drop = pattern.m - pattern.n
        order = torch.argsort(groups, dim=-1, stable=True)[..., :drop]
        mask = torch.ones_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order, False)
        return mask.reshape(d_out, d_in)
    if group == "matrix":
        flat = scores.flatten()
        n_drop = int(math.floor(sparsity * flat.numel()))
        mask = torch.ones_like(flat, dtype=torch.bool)
        if n_drop:
            mask[torch.argsort(flat, stable=True)[:n_drop]] = False
        return mask.reshape(d_out, d_in)
    if group == "row":
        n_drop = int(math.floor(sparsity * d_in))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if n_drop:
            mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :n_drop], False)
        return mask
    raise ValueError(f"unknown comparison group {group!r} (matrix | row)")


def nm_valid(mask_or_weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input columns of every row has at most n non-zeros/kept."""
    nonzero = mask_or_weight != 0
    d_out, d_in = nonzero.shape
    if d_in % m:
        return False
    return bool((nonzero.reshape(d_out, d_in // m, m).sum(-1) <= n).all())


_PACKED_FORMAT = "packbits-v1"


class MaskSet(dict):
    """Target-module name -> bool keep-mask (d_out x d_in). Saved and loaded bit-exactly as safetensors.

    On disk each mask is bit-packed (numpy.packbits, 8 weights per byte: a 7B model's masks take 0.8 GB instead of
    6.5 GB) with its shape in the file's metadata; files holding plain bool tensors load too."""

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        packed, metadata = {}, {"lorsbench_mask_format": _PACKED_FORMAT}
        for name, mask in self.items():
            bits = mask.detach().cpu().contiguous().reshape(-1).numpy()
            packed[name] = torch.from_numpy(np.packbits(bits))
            metadata[f"shape:{name}"] = ",".join(str(d) for d in mask.shape)
        save_file(packed, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "MaskSet":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            loaded = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("lorsbench_mask_format") == _PACKED_FORMAT:
            masks = {}
            for name, packed in loaded.items():
                shape_text = metadata.get(f"shape:{name}")
                if shape_text is None or packed.dtype != torch.uint8:
                    raise ValueError(f"mask file {path}: entry {name} has no shape or is not packed uint8")
                shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else ()
                count = math.prod(shape)
                if packed.numel() != (count + 7) // 8:
                    raise ValueError(f"mask file {path}: entry {name} holds {packed.numel()} bytes, shape {shape} needs {(count + 7) // 8}")
                bits = np.unpackbits(packed.numpy(), count=count).astype(bool)
                masks[name] = torch.from_numpy(bits).reshape(shape)
            return cls(masks)
        for name, tensor in loaded.items():
            if tensor.dtype != torch.bool:
                raise ValueError(f"mask file {path}: entry {name} has dtype {tensor.dtype}, expected bool")
        return cls(loaded)

    def digest(self) -> str:
        """sha256 over names, shapes and mask bits: identifies a mask set independent of file layout."""
        h = hashlib.sha256()
        for name in sorted(self):
            mask = self[name].cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(mask.shape)).encode())
            h.update(mask.numpy().tobytes())
        return h.hexdigest()

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.values())
        return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in self.values()) / total


def apply_masks(model: nn.Module, masks: MaskSet) -> None:
    """Zero every weight where the mask is False (in place)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


@dataclass(frozen=True)
class SparsityReport:
    """Exact-zero sparsity over the target linears, checked against the stored masks."""

    sparsity: float  # fraction of exact zeros over all target weights
    sparsity_by_type: dict[str, float]  # q_proj, k_proj, ... -> fraction of zeros
    nm_valid: bool | None  # every M-group has <= N non-zeros (None for unstructured)
    mask_preserved: bool | None  # weight == 0 wherever the stored mask is False (None without masks)

    def as_dict(self, prefix: str) -> dict:
        return {
            f"sparsity_{prefix}": self.sparsity,
            f"sparsity_by_type_{prefix}": self.sparsity_by_type,
            f"nm_valid_{prefix}": self.nm_valid,
            f"mask_preserved_{prefix}": self.mask_preserved,
        }


def measure_sparsity(
    model: nn.Module, targets: tuple[str, ...], masks: MaskSet | None, pattern: PatternConfig
) -> SparsityReport:
    """Count exact zeros of each target's `.weight` (the frozen base while adapters are attached,
    the merged weight after merge) and compare against the stored keep-masks."""
    zeros_by_type: dict[str, list[int]] = {}
    nm_ok = True
    preserved = True
    for name, module in target_linears(model, targets).items():
        weight = module.weight.detach()
        kind = name.rsplit(".", 1)[-1]
        counts = zeros_by_type.setdefault(kind, [0, 0])
        counts[0] += int((weight == 0).sum())
        counts[1] += weight.numel()
        if pattern.is_nm:
            nm_ok = nm_ok and nm_valid(weight, pattern.n, pattern.m)
        if masks is not None and name in masks:
            pruned = ~masks[name].to(weight.device)
            preserved = preserved and bool((weight[pruned] == 0).all())
    zeros = sum(c[0] for c in zeros_by_type.values())
    total = sum(c[1] for c in zeros_by_type.values())
    return SparsityReport(
        sparsity=0.0 if total == 0 else zeros / total,
        sparsity_by_type={k: c[0] / c[1] for k, c in zeros_by_type.items()},
        nm_valid=nm_ok if pattern.is_nm else None,
        mask_preserved=preserved if masks else None,
    )
