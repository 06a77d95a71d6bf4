"""The pruning cache (docs/methods.md §Mask artifacts): a hit on the second run reproduces the first run's model
exactly without calibrating; any tampered, partial or mismatched entry is detected, logged and rebuilt."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorsbench.config import ConfigError, PatternConfig
from lorsbench.pruning.artifacts import META_FILE, MASKS_FILE, WEIGHTS_FILE, prune_model
from lorsbench.pruning.masks import MaskSet
from tests.test_pruning import NM, UNSTRUCTURED, pruning_config, random_batches, tiny_llama


class CountingCalibration:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return random_batches()


def _run(tmp_path, name="sparsegpt", pattern=UNSTRUCTURED, sparsity=0.5, model=None, model_key="tiny", calib=None):
    model = model or tiny_llama()
    calib = calib or CountingCalibration()
    outcome = prune_model(model, pruning_config(name, sparsity, pattern), calib, tmp_path, model_key)
    return model, outcome, calib


def _same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_second_run_is_a_cache_hit_with_identical_weights(tmp_path, name):
    first_model, first, calib1 = _run(tmp_path, name)
    second_model, second, calib2 = _run(tmp_path, name)
    assert not first.cache_hit and second.cache_hit
    assert first.artifact_dir == second.artifact_dir and first.artifact_dir.is_dir()
    assert second.cached_prune_wall_s == pytest.approx(first.prune_wall_s)
    assert second.masks.digest() == first.masks.digest()
    assert _same_model(first_model, second_model)
    assert calib2.calls == 0 and calib1.calls == (name != "magnitude")
    assert second.report.sparsity == pytest.approx(0.5) and second.report.sparsity_by_type["down_proj"] == pytest.approx(0.5)
    meta = json.loads((first.artifact_dir / META_FILE).read_text())
    assert meta["weights_stored"] == (name == "sparsegpt")  # magnitude / Wanda: weights are W * mask
    assert (first.artifact_dir / WEIGHTS_FILE).exists() == (name == "sparsegpt")


def test_different_settings_miss(tmp_path):
    _, first, _ = _run(tmp_path, "wanda")
    for kwargs in ({"sparsity": 0.4}, {"pattern": NM[0]}, {"model_key": "other"}, {"name": "sparsegpt"}):
        _, outcome, _ = _run(tmp_path, **{"name": "wanda", **kwargs})
        assert not outcome.cache_hit and outcome.artifact_dir != first.artifact_dir


def test_none_skips_the_cache(tmp_path):
    model, outcome, _ = _run(tmp_path, "none", sparsity=0.0)
    assert not outcome.cache_hit and outcome.artifact_dir is None and all(m.all() for m in outcome.masks.values())
    assert not (tmp_path / "pruned").exists()


def _tamper_mask_bit(entry):
    masks = MaskSet.load(entry / MASKS_FILE)
    name = sorted(masks)[0]
    masks[name][0, 0] = ~masks[name][0, 0]
    masks.save(entry / MASKS_FILE)


def _tamper_weight(entry):
    weights = load_file(str(entry / WEIGHTS_FILE))
    masks = MaskSet.load(entry / MASKS_FILE)
    name = sorted(weights)[0]
    kept = masks[name].nonzero()[0]
    weights[name][kept[0], kept[1]] += 1.0
    save_file(weights, str(entry / WEIGHTS_FILE))


def _truncate_weights(entry):
    data = (entry / WEIGHTS_FILE).read_bytes()
    (entry / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _drop_masks(entry):
    (entry / MASKS_FILE).unlink()


def _garble_meta(entry):
    (entry / META_FILE).write_text("{not json")


def _edit_meta_sparsity(entry):
    meta = json.loads((entry / META_FILE).read_text())
    meta["key_fields"]["sparsity"] = 0.6
    (entry / META_FILE).write_text(json.dumps(meta))


def _reshape_mask(entry):
    masks = MaskSet.load(entry / MASKS_FILE)
    name = sorted(masks)[0]
    masks[name] = masks[name][:, :-4].contiguous()
    masks.save(entry / MASKS_FILE)
    meta = json.loads((entry / META_FILE).read_text())
    meta["mask_digest"] = masks.digest()  # a consistent but wrongly shaped entry
    (entry / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("tamper", [_tamper_mask_bit, _tamper_weight, _truncate_weights, _drop_masks, _garble_meta,
                                    _edit_meta_sparsity, _reshape_mask])
def test_tampered_entry_is_detected_and_rebuilt(tmp_path, caplog, tamper):
    reference_model, first, _ = _run(tmp_path)
    tamper(first.artifact_dir)
    with caplog.at_level(logging.WARNING, logger="lorsbench.pruning.artifacts"):
        model, rebuilt, calib = _run(tmp_path)
    assert not rebuilt.cache_hit and calib.calls == 1
    assert "unusable" in caplog.text
    assert _same_model(model, reference_model) and rebuilt.masks.digest() == first.masks.digest()
    _, again, _ = _run(tmp_path)  # the rebuilt entry is whole again
    assert again.cache_hit


def test_masks_only_entry_rejects_a_different_base_model(tmp_path, caplog):
    _run(tmp_path, "wanda")
    other = tiny_llama(seed=123)  # same model_key, different weights: the weight checksum must catch it
    with caplog.at_level(logging.WARNING, logger="lorsbench.pruning.artifacts"):
        _, outcome, calib = _run(tmp_path, "wanda", model=other)
    assert not outcome.cache_hit and calib.calls == 1 and "different base model" in caplog.text


def test_no_leftover_temporary_folders(tmp_path):
    _run(tmp_path, "wanda")
    _run(tmp_path, "magnitude", pattern=NM[1])
    names = [p.name for p in (tmp_path / "pruned").iterdir()]
    assert len(names) == 2 and not any(n.startswith(".") for n in names)


def test_calibrated_pruner_without_calibration_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="pruning=wanda needs calibration data"):
        prune_model(tiny_llama(), pruning_config("wanda", 0.5, UNSTRUCTURED), None, tmp_path, "tiny")


def test_targets_missing_from_the_model_is_a_clear_error(tmp_path):
    config = pruning_config("magnitude", 0.5, PatternConfig("unstructured"))
    from dataclasses import replace

    with pytest.raises(ConfigError, match="no target linears named"):
        prune_model(tiny_llama(), replace(config, targets=("c_attn",)), None, tmp_path, "tiny")
