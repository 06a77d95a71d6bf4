"""LoSA (methods/losa.py): the masked adapter against float64 formulas through the user path, the cubic schedule,
the CKA layer-wise rates (mean exactly s_t, within ±δ), the reconstruction-error ranks, and whole runs through
`python -m lorsbench` whose final merged model is exactly as sparse as the final stored mask."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from lorsbench.methods.losa import (
    allocate_ranks,
    cubic_schedule,
    layer_rates,
    linear_cka_matrix,
    reconstruction_error,
)
from lorsbench.methods.sqft import SQFTLinear
from safetensors.torch import load_file

from lorsbench.config import ConfigError, build_run_config
from lorsbench.method import build_method
from lorsbench.modules import target_linears
from lorsbench.pruning.masks import MaskSet, nm_valid
from lorsbench.records import read_record
from lorsbench.schedule import UNSTRUCTURED
from tests.conftest import REPO
from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    TARGETS,
    batches,
    context,
    logits,
    random_masks,
    single_thread,
    tiny_llama,
)

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def _losa(compose, *overrides):
    cfg = build_run_config(compose(["method=losa", "pruning=wanda", *overrides]))
    return cfg, build_method(cfg.method)


# --- schedule ---------------------------------------------------------------------------------------------------

def test_cubic_schedule_values():
    values = cubic_schedule(0.5, 5)
    expected = [Fraction(1, 2) * (1 - (1 - Fraction(t, 5)) ** 3) for t in range(1, 6)]  # 0.244, 0.392, ...
    assert values == pytest.approx([float(e) for e in expected], abs=1e-15)
    assert values[-1] == 0.5 and all(a < b for a, b in zip(values, values[1:]))


def test_schedule_from_the_yaml_defaults_splits_the_budget(compose):
    cfg, method = _losa(compose, "sparsity=0.6", "trainer.max_steps=23")
    rounds = method.schedule(cfg)
    assert [r.target_sparsity for r in rounds] == cubic_schedule(0.6, 5)
    assert [r.train_steps for r in rounds] == [3, 2, 2, 2, 14]  # 23 x (1,1,1,1,6)/10 = 2.3 x4, 13.8: two remainders, 0.8 then the first 0.3
    assert sum(r.train_steps for r in rounds) == cfg.trainer.max_steps
    assert all(r.pattern is None for r in rounds)  # the run's (unstructured) pattern


def test_nm_turns_the_layer_rates_off_and_prunes_the_pattern_last(compose, caplog):
    cfg, method = _losa(compose, "pattern=2of4")
    rounds = method.schedule(cfg)
    assert "fixes every layer's rate" in caplog.text
    assert [r.pattern for r in rounds[:-1]] == [UNSTRUCTURED] * 4 and rounds[-1].pattern is None
    assert rounds[-1].target_sparsity == 0.5


def test_allocators_without_calibration_fail_with_a_clear_error(compose):
    cfg, method = _losa(compose, "pruning=magnitude")
    with pytest.raises(ConfigError, match="needs calibration data.*pruning=wanda"):
        method.schedule(cfg)
    cfg, method = _losa(compose, "pruning=magnitude", "method.layer_sparsity=false", "method.rank_allocation=false")
    assert len(method.schedule(cfg)) == 5


@pytest.mark.parametrize("params, match", [
    (["method.step_weights=[1,1]"], "one weight per round"),
    (["method.rounds=0"], "rounds must be an integer >= 1"),
    (["method.rank_start=13"], "rank_start \\+ rounds - 1 <= rank_max"),
])
def test_bad_options_are_one_clear_error(compose, params, match):
    with pytest.raises(ConfigError, match=match):
        _losa(compose, *params)


# --- layer-wise sparsity ------------------------------------------------------------------------------------------

def _cka_feature_space(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in feature space (Kornblith et al. 2019, eq. 5), float64."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_the_feature_space_formula():
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((9, 30)) for _ in range(3)]
    feats.append(3.0 * feats[0] @ np.linalg.qr(rng.standard_normal((30, 30)))[0] + 1.0)  # rotated, scaled, shifted
    cka = linear_cka_matrix([torch.from_numpy(f @ f.T) for f in feats]).numpy()
    for i in range(4):
        for j in range(4):
            assert cka[i, j] == pytest.approx(_cka_feature_space(feats[i], feats[j]), abs=1e-12)
    assert cka[0, 3] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target, delta", [(0.5, 0.05), (0.244, 0.01), (0.02, 0.05), (0.7, 0.0)])
def test_layer_rates_average_exactly_to_the_target_within_the_bounds(seed, target, delta):
    rng = np.random.default_rng(seed)
    redundancy = rng.standard_normal(32) ** 3  # heavy tails: some layers clip at a bound
    rates = layer_rates(redundancy, target, delta)
    assert abs(rates.mean() - target) <= 1e-12
    assert rates.min() >= max(0.0, target - delta) and rates.max() <= target + delta
    order = np.argsort(redundancy)
    assert np.all(np.diff(rates[order]) >= -1e-15)  # the more redundant layer is pruned at least as much
    if delta:
        assert rates.max() - rates.min() > delta / 2  # the rates do spread


def test_layer_rates_without_spread_are_uniform():
    assert layer_rates(np.full(4, 2.5), 0.5, 0.05).tolist() == [0.5] * 4


# --- rank allocation ---------------------------------------------------------------------------------------------

def test_ranks_are_proportional_to_the_error_with_the_mean_exact():
    assert allocate_ranks(np.array([1.0, 2.0, 3.0, 4.0]), 5, 1, 16) == [2, 4, 6, 8]
    ranks = allocate_ranks(np.array([100.0, 1.0, 1.0, 1.0]), 6, 1, 16)  # one layer at the cap
    assert ranks[0] == 16 and sum(ranks) == 24 and min(ranks) >= 1


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mean_rank", [6, 8, 10])
def test_ranks_are_integers_in_bounds_with_the_mean_exact(seed, mean_rank):
    errors = np.random.default_rng(seed).exponential(size=30) ** 2
    ranks = allocate_ranks(errors, mean_rank, 1, 16)
    assert all(isinstance(r, int) and 1 <= r <= 16 for r in ranks)
    assert sum(ranks) == mean_rank * len(errors)
    order = np.argsort(errors)
    assert all(b >= a for a, b in zip(np.array(ranks)[order], np.array(ranks)[order][1:]))


def test_reconstruction_error_formula():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    sparse = dense + 0.1 * torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    d, s = dense.reshape(-1, 4), sparse.reshape(-1, 4)
    expected = sum(((d[t, j] - s[t, j]) / d[:, j].pow(2).sum().sqrt()) ** 2 for t in range(15) for j in range(4)) / 4
    assert reconstruction_error(dense, sparse) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reconstruction_error_takes_the_pruned_features_from_the_gpu():
    # the dense features are kept on the CPU; the pruned model's come from the GPU (an H200 run failed here)
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 5, 4, generator=g, dtype=torch.float32)
    sparse = dense + 0.1 * torch.randn(3, 5, 4, generator=g)
    expected = reconstruction_error(dense, sparse)
    assert reconstruction_error(dense, sparse.cuda()) == pytest.approx(expected, rel=1e-12)


# --- the masked adapter through the user path ---------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["unstructured", "2of4"])
def test_masked_adapter_forward_gradients_train_step_and_merge(compose, pattern):
    _, method = _losa(compose)
    model = tiny_llama()
    masks = random_masks(model, pattern)
    params = method.attach(model, masks, context())
    assert method.round_details()["ranks"] == [6, 6]  # no calibration: every layer at the round's mean rank
    g = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, SQFTLinear):
            with torch.no_grad():
                module.lora_U.normal_(std=0.05, generator=g)
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    W, b, M = module.weight.detach().clone(), module.bias, masks[name].double()
    U, V = module.lora_U.detach().double(), module.lora_V.detach().double()
    s = method.config.scale
    assert b is None and module.rank == 6 and s == 2.0

    # forward and gradients (eval mode: dropout off) against the float64 formulas
    model.eval()
    x = torch.randn(2, 5, module.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, module.out_features, generator=g, dtype=torch.float64)
    out = module(x)
    out.backward(dy)
    torch.testing.assert_close(out, x @ W.T + x @ ((s * U @ V) * M).T, rtol=1e-12, atol=1e-12)
    G = dy.reshape(-1, module.out_features).T @ x.detach().reshape(-1, module.in_features)
    torch.testing.assert_close(module.lora_U.grad, (s * (G * M) @ V.T).float())
    torch.testing.assert_close(module.lora_V.grad, (s * U.T @ (G * M)).float())
    torch.testing.assert_close(x.grad, dy @ (W + (s * U @ V) * M), rtol=1e-12, atol=1e-12)
    for p in params:
        p.grad = None

    # a training step moves the adapter only; the merge is W + (s U V) ⊙ M, zero wherever the mask is
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(**batches(1)[0]).loss.backward()
    optimizer.step()
    model.eval()
    U, V = module.lora_U.detach().double(), module.lora_V.detach().double()
    unmerged = logits(model, IDS)
    model = method.merge(model)
    merged = model.get_submodule(name).weight
    torch.testing.assert_close(merged, W + (s * U @ V) * M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits(model, IDS), unmerged, rtol=1e-10, atol=1e-10)
    for target, linear in target_linears(model, TARGETS).items():
        assert torch.equal(linear.weight == 0, ~masks[target]), target  # exactly as sparse as the mask
        if pattern == "2of4":
            assert nm_valid(linear.weight, 2, 4)


def test_ranks_follow_the_reconstruction_error_after_a_prune(compose):
    """plan_round on the dense model captures its layer outputs; after pruning, attach allocates ranks ∝ error."""
    cfg, method = _losa(compose)
    rounds = method.schedule(cfg)
    model = tiny_llama()
    calibration = batches(4, batch_size=1, seq_len=16)
    ctx = context()
    ctx.calibration = lambda: calibration
    planned = method.plan_round(model, 0, rounds[0], ctx)
    rates = method.round_details()["layer_sparsity"]
    assert len(rates) == 2 and sum(rates) / 2 == pytest.approx(rounds[0].target_sparsity, abs=1e-12)
    assert set(planned.layer_sparsity) == set(target_linears(model, TARGETS))
    masks = random_masks(model, "unstructured", sparsity=0.3)
    method.attach(model, masks, ctx)
    details = method.round_details()
    assert sum(details["ranks"]) == 2 * 6 and all(e > 0 for e in details["recon_error"])
    assert (details["ranks"][0] >= details["ranks"][1]) == (details["recon_error"][0] >= details["recon_error"][1])


# --- whole runs ------------------------------------------------------------------------------------------------

def _run_cli(tmp_path, *overrides):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                          "output": str(2 * i + 1)}) for i in range(40)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorsbench", "model=tiny-llama", "method=losa", "pruning=wanda", "eval=none",
           "device=cpu", "dtype=float32", "data=local", f"data.path={data}", "data.heldout_examples=4",
           "trainer.max_steps=10", "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.warmup_steps=1",
           "profile.warmup_steps=1", "pruning.calibration.nsamples=4", "pruning.calibration.seq_len=64", "save_merged=true",
           f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_root={tmp_path}", f"hydra.run.dir={out}",
           *overrides]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, read_record(out)


def _assert_merged_as_sparse_as_final_mask(out, record):
    final_mask = MaskSet.load(record["prune_artifact"] + "/masks.safetensors")
    assert final_mask.digest() == record["mask_digest"] == record["rounds"][-1]["mask_digest"]
    weights = {}
    for shard in (out / record["merged_dir"]).glob("*.safetensors"):
        if shard.name != "masks.safetensors":
            weights.update(load_file(str(shard)))
    for name, mask in final_mask.items():
        assert torch.equal(weights[name + ".weight"] != 0, mask), name  # bit-exact: zero exactly where pruned
    return weights, final_mask


def test_cli_run_prunes_in_five_rounds_and_ends_exactly_as_sparse_as_its_mask(tmp_path):
    out, record = _run_cli(tmp_path)
    assert record["status"] == "success", record.get("error")
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert [r["target_sparsity"] for r in rounds] == pytest.approx(cubic_schedule(0.5, 5), abs=1e-15)
    assert [r["train_steps"] for r in rounds] == [1, 1, 1, 1, 6] and record["train_steps"] == 10
    assert [r["mean_rank"] for r in rounds] == [6, 7, 8, 9, 10]
    for r in rounds:
        assert sum(r["ranks"]) == 2 * r["mean_rank"] and r["layer_sparsity_active"] is True
        assert sum(r["layer_sparsity"]) / 2 == pytest.approx(r["target_sparsity"], abs=1e-12)
        for stage in ("after_prune", "after_train", "after_merge") if r["round"] < 5 else ("after_prune", "after_train"):
            assert r[f"mask_preserved_{stage}"] is True, (r["round"], stage)
        assert r["sparsity_after_prune"] == pytest.approx(r["mask_sparsity"], abs=1e-12)
    sparsities = [r["sparsity_after_prune"] for r in rounds]
    assert all(a < b for a, b in zip(sparsities, sparsities[1:]))
    assert len({r["mask_digest"] for r in rounds}) == 5  # the mask changes every round
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["round"] for entry in log] == [1, 2, 3, 4] + [5] * 6
    assert record["mask_preserved_after_merge"] is True and record["merged_reload_verified"] is True
    _, final_mask = _assert_merged_as_sparse_as_final_mask(out, record)
    assert record["sparsity_after_merge"] == pytest.approx(final_mask.sparsity(), abs=1e-12)


def test_cli_run_with_2of4_ends_nm_valid(tmp_path):
    out, record = _run_cli(tmp_path, "pattern=2of4", "method.rounds=3", "method.step_weights=[1,1,2]")
    assert record["status"] == "success", record.get("error")
    rounds = record["rounds"]
    assert [r["pattern"] for r in rounds] == ["unstructured", "unstructured", "2of4"]
    assert not any(r["layer_sparsity_active"] for r in rounds)
    assert rounds[-1]["nm_valid_after_prune"] is True and record["nm_valid_after_merge"] is True
    weights, final_mask = _assert_merged_as_sparse_as_final_mask(out, record)
    for name in final_mask:
        assert nm_valid(weights[name + ".weight"], 2, 4), name
    assert record["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-12)
