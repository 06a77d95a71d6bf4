"""Pruning results as cached artifacts (docs/methods.md §Mask artifacts).

One cache entry per (model_key, pruner, resolved pruner options, pattern, sparsity, targets, weight dtype,
calibration config incl. its seed, and the per-layer rates when a prune schedule sets them) under `<cache_dir>/pruned/<pruner>-<pattern>-s<sparsity>-<hash16>/`:

- `masks.safetensors`   bool keep-mask per target linear (`MaskSet.save`, bit-exact);
- `weights.safetensors` the pruned target weights, only for pruners that change kept weights (SparseGPT).
  For magnitude and Wanda the pruned weights are exactly W * mask, so only the masks are stored and the weights
  are rebuilt from the loaded model (the stored weight checksum then also proves the base model is the same);
- `meta.json`           the key fields, the key, `mask_digest` (MaskSet.digest), `weights_sha256` (of the pruned
  target weights), `others_sha256` (of every other tensor of the model: embeddings, norms, head, which calibrated
  pruners' activations flow through), the original `prune_wall_s`, the sparsity report, versions.

`model_key` is content-based (the pipeline passes the model's weight digest, `LoadedModel.digest`), so a moved or
shared cache still hits.

Entries are written in a temporary folder and renamed into place, so a reader sees a whole entry or none. On a hit
everything is verified before the model is touched (key fields, mask digest, names, shapes, dtypes, weight
checksum, zeros where masked); any failure is logged, the entry is discarded and rebuilt, never used.
The dense reference (`none`) skips the cache: it has nothing to store. The run seed is not part of the key:
calibrated pruners depend on `calibration.seed` (in the key); the pipeline puts the seed into `model_key` for
random-weight models.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorsbench.config import PruningConfig
from lorsbench.errors import Batch, ConfigError
from lorsbench.modules import target_linears
from lorsbench.pruning import build_pruner
from lorsbench.pruning.base import Pruner
from lorsbench.pruning.masks import MaskSet, SparsityReport, check_nm_divides, measure_sparsity

log = logging.getLogger(__name__)

ARTIFACT_VERSION = 2  # 2: others_sha256 covers every tensor besides the targets
CACHE_SUBDIR = "pruned"
META_FILE = "meta.json"
MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"


class ArtifactError(Exception):
    """A cache entry that must not be used (missing file, mismatch, bad checksum)."""


@dataclass
class PruneOutcome:
    masks: MaskSet
    cache_hit: bool
    prune_wall_s: float  # this call: calibration + pruning on a miss, verify + load on a hit
    cached_prune_wall_s: float | None  # on a hit: the wall time the original prune took (saved by this hit)
    artifact_dir: Path | None
    key: str | None = None
    report: SparsityReport | None = None  # exact-zero sparsity, per layer type, N:M validity after pruning


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, shape, dtype, raw bytes) of named tensors, in name order."""
    return _checksum(tensors, tensors.__getitem__)


def _checksum(names: Iterable[str], get: Callable[[str], torch.Tensor]) -> str:
    """As `weights_checksum`, materializing one tensor at a time (`get(name)`)."""
    h = hashlib.sha256()
    for name in sorted(names):
        tensor = get(name).detach().cpu().contiguous()
        h.update(name.encode())
        h.update(f"{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def others_checksum(model: nn.Module, linears: dict[str, nn.Module]) -> str:
    """`weights_checksum` of every parameter and buffer of `model` except the target weights."""
    skip = {f"{name}.weight" for name in linears}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in skip}
    return _checksum(tensors, tensors.__getitem__)


def _weight_dtype(linears: dict[str, nn.Module]) -> str:
    dtypes = sorted({str(linear.weight.dtype).removeprefix("torch.") for linear in linears.values()})
    return dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)


def key_fields(config: PruningConfig, pruner: Pruner, model_key: str, weight_dtype: str) -> dict[str, Any]:
    """Everything a pruning result depends on (the calibration only for pruners that use it)."""
    pattern = config.pattern
    fields = {
        "artifact_version": ARTIFACT_VERSION,
        "model_key": model_key,
        "pruner": config.name,
        "options": pruner.options_dict(),
        "pattern": {"name": pattern.name, "n": pattern.n, "m": pattern.m},
        "sparsity": float(config.sparsity),
        "targets": sorted(config.targets),
        "weight_dtype": weight_dtype,
        "calibration": asdict(config.calibration) if pruner.needs_calibration and config.calibration else None,
    }
    if config.layer_sparsity:  # only then, so the keys of runs without a prune schedule stay as they were
        fields["layer_sparsity"] = dict(sorted(config.layer_sparsity.items()))
    return fields


def artifact_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def artifact_dir(cache_dir: Path, config: PruningConfig, key: str) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"{config.name}-{config.pattern.name}-s{config.sparsity:g}-{key[:16]}"


def prune_model(
    model: nn.Module,
    config: PruningConfig,
    calibration: Callable[[], list[Batch]] | None,
    cache_dir: Path,
    model_key: str,
    device: torch.device | str | None = None,
) -> PruneOutcome:
    """Prune `model` in place per `config`, through the artifact cache.

    `calibration` is called only on a cache miss of a calibrated pruner. `device`: where calibrated pruners run
    each decoder block (default: where the model's layers are)."""
    pruner = build_pruner(config)
    linears = target_linears(model, config.targets)
    if not linears:
        raise ConfigError(f"no target linears named {list(config.targets)} inside the decoder layers of this model")
    for name, linear in linears.items():
        check_nm_divides(name, linear.weight.shape[1], config.pattern)
    if pruner.needs_calibration and calibration is None:
        raise ConfigError(f"pruning={config.name} needs calibration data: set pruning.calibration (source, nsamples, seq_len)")

    if not pruner.cacheable:
        start = time.perf_counter()
        masks = pruner.prune(model, None, device=device)
        wall_s = time.perf_counter() - start
        report = measure_sparsity(model, config.targets, masks, config.pattern)
        return PruneOutcome(masks, False, wall_s, None, None, None, report)

    fields = key_fields(config, pruner, model_key, _weight_dtype(linears))
    key = artifact_key(fields)
    entry = artifact_dir(cache_dir, config, key)

    if entry.exists():
        start = time.perf_counter()
        try:
            masks, meta = _load_entry(entry, model, linears, fields, key)
        except ArtifactError as exc:
            log.warning("pruning cache entry %s is unusable (%s); discarding it and pruning again", entry, exc)
            _discard(entry)
        else:
            wall_s = time.perf_counter() - start
            report = measure_sparsity(model, config.targets, masks, config.pattern)
            log.info("pruning cache hit: %s (saved %.1f s)", entry, meta["prune_wall_s"])
            return PruneOutcome(masks, True, wall_s, float(meta["prune_wall_s"]), entry, key, report)

    start = time.perf_counter()
    batches = calibration() if pruner.needs_calibration else None
    masks = pruner.prune(model, batches, device=device)
    wall_s = time.perf_counter() - start
    del batches
    report = measure_sparsity(model, config.targets, masks, config.pattern)
    written = _write_entry(entry, model, linears, masks, fields, key, pruner.updates_weights, wall_s, report)
    return PruneOutcome(masks, False, wall_s, None, entry if written else None, key, report)


def _load_entry(entry: Path, model: nn.Module, linears: dict[str, nn.Module], fields: dict,
                key: str) -> tuple[MaskSet, dict]:
    """Verify an entry completely, then load it into the model. Raises ArtifactError before touching the model."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{META_FILE}: {exc}") from exc
    if meta.get("key") != key or meta.get("key_fields") != json.loads(json.dumps(fields)):
        raise ArtifactError("key fields differ from this run's pruning settings")
    if others_checksum(model, linears) != meta.get("others_sha256"):
        raise ArtifactError("the model's non-target tensors (embeddings, norms, head) differ from those pruned (different base model?)")
    try:
        masks = MaskSet.load(entry / MASKS_FILE)
    except Exception as exc:  # safetensors raises several types for missing or malformed files
        raise ArtifactError(f"{MASKS_FILE}: {type(exc).__name__}: {exc}") from exc
    if set(masks) != set(linears):
        raise ArtifactError(f"mask names differ from the model's targets ({len(masks)} vs {len(linears)})")
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(linears[name].weight.shape):
            raise ArtifactError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(linears[name].weight.shape)}")
    if masks.digest() != meta.get("mask_digest"):
        raise ArtifactError("mask digest mismatch")

    if meta.get("weights_stored"):
        try:
            weights = load_file(str(entry / WEIGHTS_FILE))
        except Exception as exc:
            raise ArtifactError(f"{WEIGHTS_FILE}: {type(exc).__name__}: {exc}") from exc
        if set(weights) != set(linears):
            raise ArtifactError("stored weight names differ from the model's targets")
        for name, weight in weights.items():
            target = linears[name].weight
            if weight.shape != target.shape or weight.dtype != target.dtype:
                raise ArtifactError(f"{name}: stored {tuple(weight.shape)} {weight.dtype} != model {tuple(target.shape)} {target.dtype}")
            if bool((weight[~masks[name]] != 0).any()):
                raise ArtifactError(f"{name}: stored weight is non-zero where its mask is False")
        if weights_checksum(weights) != meta.get("weights_sha256"):
            raise ArtifactError("stored weight checksum mismatch")
        with torch.no_grad():
            for name, weight in weights.items():
                linears[name].weight.copy_(weight)
    else:
        def masked(name: str) -> torch.Tensor:
            weight = linears[name].weight
            return weight * masks[name].to(device=weight.device, dtype=weight.dtype)

        if _checksum(linears, masked) != meta.get("weights_sha256"):
            raise ArtifactError("masked weights differ from the pruned weights recorded (different base model?)")
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.mul_(masks[name].to(device=linear.weight.device, dtype=linear.weight.dtype))
    return masks, meta


def _write_entry(
    entry: Path, model: nn.Module, linears: dict[str, nn.Module], masks: MaskSet, fields: dict, key: str, store_weights: bool,
    prune_wall_s: float, report: SparsityReport,
) -> bool:
    """Write the entry atomically (temporary folder, then rename). A failure to write is logged, not raised:
    the pruned model in memory is still correct; only the reuse is lost."""
    root = entry.parent
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        masks.save(tmp / MASKS_FILE)
        if store_weights:
            save_file({name: linear.weight.detach().cpu().contiguous() for name, linear in linears.items()},
                      str(tmp / WEIGHTS_FILE))
        meta = {
            "key": key,
            "key_fields": fields,
            "version": ARTIFACT_VERSION,
            "mask_digest": masks.digest(),
            "weights_stored": store_weights,
            "weights_sha256": _checksum(linears, lambda name: linears[name].weight),
            "others_sha256": others_checksum(model, linears),
            "prune_wall_s": prune_wall_s,
            "sparsity": report.sparsity,
            "sparsity_by_type": report.sparsity_by_type,
            "nm_valid": report.nm_valid,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if entry.exists():  # another process finished the same entry first; theirs is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
                return True
            raise
        return True
    except OSError as exc:
        log.warning("could not write the pruning cache entry %s (%s); the run continues without it", entry, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return False


def _discard(entry: Path) -> None:
    """Move a bad entry aside, then delete it (readers never see a half-deleted folder)."""
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)
