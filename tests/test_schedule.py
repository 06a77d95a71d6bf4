"""Prune schedules (lorsbench/schedule.py): the budget split, schedule checks, per-layer rates honoured by every
pruner and keyed in the pruning cache (keys of runs without them unchanged), the default one-round schedule of
every method, and a run that fails inside a round records its phase, round and error."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import lorsbench.training
from lorsbench.config import ConfigError, build_run_config
from lorsbench.registry import build_method, list_methods
from lorsbench.pipeline import run_pipeline
from lorsbench.pruning import build_pruner
from lorsbench.pruning.artifacts import key_fields, prune_model
from lorsbench.records import read_record
from lorsbench.schedule import Round, check_rounds, default_schedule, split_steps
from tests.test_pruning import PRUNERS, UNSTRUCTURED, pruning_config, random_batches, tiny_llama


@pytest.mark.parametrize("total, weights, expected", [
    (10, (1, 1, 1, 1, 6), [1, 1, 1, 1, 6]),
    (4, (1, 1, 1, 1, 6), [1, 1, 0, 0, 2]),  # 0.4 x4 and 2.4: the two largest remainders go to rounds 1 and 2
    (7, (1, 1, 1), [3, 2, 2]),
    (0, (1, 2), [0, 0]),
])
def test_split_steps_sums_to_the_budget(total, weights, expected):
    assert split_steps(total, weights) == expected and sum(expected) == total


@pytest.mark.parametrize("weights", [(), (0, 0), (1, -1)])
def test_split_steps_rejects_bad_weights(weights):
    with pytest.raises(ConfigError, match="step weights"):
        split_steps(10, weights)


def test_check_rounds_names_the_problem():
    with pytest.raises(ConfigError, match="train 9 steps in all, trainer.max_steps=10"):
        check_rounds([Round(0.2, 4), Round(0.5, 5)], 10)
    with pytest.raises(ConfigError, match="round 2: target_sparsity must be in"):
        check_rounds([Round(0.2, 5), Round(1.0, 5)], 10)
    with pytest.raises(ConfigError, match="at least one round"):
        check_rounds([], 10)


def test_every_other_method_keeps_the_one_round_default(compose):
    cfg = build_run_config(compose(["pruning=wanda"]))
    for name in list_methods():
        if name == "losa":
            continue
        method = build_method(replace(cfg.method, name=name, params={}))
        assert method.schedule(cfg) == default_schedule(cfg) == [Round(0.5, cfg.trainer.max_steps)], name


@pytest.mark.parametrize("name", PRUNERS)
def test_pruners_honour_per_layer_rates(name):
    model = tiny_llama()
    rates = {"model.layers.0.mlp.down_proj": 0.25, "model.layers.1.self_attn.q_proj": 0.75}
    config = replace(pruning_config(name, 0.5, UNSTRUCTURED), layer_sparsity=rates)
    masks = build_pruner(config).prune(model, random_batches())
    for target, mask in masks.items():
        rate = rates.get(target, 0.5)
        d_out, d_in = mask.shape
        # magnitude: floor(s numel) per matrix; wanda: per row; sparsegpt: per 128-column block (one block here)
        expected = math.floor(rate * d_in) * d_out if name == "wanda" else math.floor(rate * mask.numel())
        assert int((~mask).sum()) == expected, target


def test_per_layer_rates_are_keyed_and_plain_keys_are_unchanged(tmp_path):
    config = pruning_config("wanda", 0.5, UNSTRUCTURED)
    pruner = build_pruner(config)
    plain = key_fields(config, pruner, "tiny", "float32")
    assert "layer_sparsity" not in plain  # artifact keys of every run without a schedule stay as they were
    rated = replace(config, layer_sparsity={"model.layers.0.mlp.down_proj": 0.25})
    assert key_fields(rated, pruner, "tiny", "float32")["layer_sparsity"] == {"model.layers.0.mlp.down_proj": 0.25}
    first = prune_model(tiny_llama(), config, random_batches, tmp_path, "tiny")
    second = prune_model(tiny_llama(), rated, random_batches, tmp_path, "tiny")
    assert not second.cache_hit and first.artifact_dir != second.artifact_dir
    assert prune_model(tiny_llama(), rated, random_batches, tmp_path, "tiny").cache_hit


def _losa_config(compose, tmp_path, *extra, pruning="wanda"):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(f'{{"instruction": "Say {i}.", "input": "", "output": "{i}"}}' for i in range(20)))
    return build_run_config(compose([
        "model=tiny-llama", "method=losa", f"pruning={pruning}", "eval=none", "device=cpu", "dtype=float32",
        "data=local", f"data.path={data}", "data.heldout_examples=4", "trainer.max_steps=5",
        "trainer.micro_batch_size=2",
        "trainer.seq_len=32", "trainer.warmup_steps=1", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_root={tmp_path}",
        *(["pruning.calibration.nsamples=2", "pruning.calibration.seq_len=32"] if pruning == "wanda" else []),
        *extra]))


def test_a_failure_inside_a_round_records_phase_round_and_error(compose, tmp_path, monkeypatch):
    real_train, calls = lorsbench.training.train, []

    def train_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("training loss is nan at step 0")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(lorsbench.training, "train", train_then_fail)
    record = run_pipeline(_losa_config(compose, tmp_path), tmp_path / "run")
    assert record["status"] == "failed" and record["phase_failed"] == "fine_tune"
    assert record["schedule_round"] == 3 and "loss is nan" in record["error"]
    on_disk = read_record(tmp_path / "run")
    assert on_disk["status"] == "failed" and len(on_disk["rounds"]) == 3
    assert all(r["mask_preserved_after_merge"] for r in on_disk["rounds"][:2])
    assert (tmp_path / "run" / "error.log").exists()


def test_bad_losa_settings_fail_in_setup_before_the_model_loads(compose, tmp_path):
    record = run_pipeline(_losa_config(compose, tmp_path, pruning="magnitude"), tmp_path / "run")
    assert record["status"] == "failed" and record["phase_failed"] == "setup"
    assert "needs calibration data" in record["error"] and "total_params" not in record


def test_scheduled_run_totals(compose, tmp_path):
    record = run_pipeline(_losa_config(compose, tmp_path, "method.rounds=2", "method.step_weights=[2,3]"),
                          tmp_path / "run")
    assert record["status"] == "success", record.get("error")
    rounds = record["rounds"]
    assert [r["train_steps"] for r in rounds] == [2, 3] and record["train_steps"] == 5
    assert record["prune_wall_s"] == pytest.approx(sum(r["prune_wall_s"] for r in rounds))
    assert record["train_wall_s"] == pytest.approx(sum(r["train_wall_s"] for r in rounds))
    assert record["mask_digest"] == rounds[-1]["mask_digest"] and record["step_times_round"] == 2
    assert record["final_loss"] == rounds[-1]["final_loss"] and torch.isfinite(torch.tensor(record["final_loss"]))
    assert record["sparsity_after_prune"] == rounds[-1]["sparsity_after_prune"]
    assert record["mask_preserved_after_merge"] is True and "schedule_round" not in record
    assert record["val_loss"] > 0  # the phases after the schedule run as for every method
