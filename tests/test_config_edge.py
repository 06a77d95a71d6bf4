"""The config edge (issue 14 §5): every numeric option named with its valid range, targets checked against the
model, method x pattern before the load, presets that keep the user's choices, an unusable output root."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench.config import build_run_config
from lorsbench.config_checks import check_model_fits, check_run_config, linear_names
from lorsbench.errors import ConfigError
from lorsbench.registry import build_method
from tests.conftest import REPO


@pytest.mark.parametrize("override,message", [
    ("trainer.lr=0", r"trainer.lr must be a number > 0, got 0"),
    ("trainer.lr=-1e-4", r"trainer.lr must be a number > 0"),
    ("trainer.max_steps=-1", r"trainer.max_steps must be an integer >= 0, got -1"),
    ("trainer.max_steps=2.5", r"trainer.max_steps must be an integer"),
    ("trainer.warmup_steps=-2", r"trainer.warmup_steps must be an integer >= 0"),
    ("trainer.micro_batch_size=0", r"trainer.micro_batch_size must be an integer > 0"),
    ("trainer.seq_len=0", r"trainer.seq_len must be an integer > 0"),
    ("trainer.grad_accum=0", r"trainer.grad_accum must be an integer > 0"),
    ("trainer.min_lr_ratio=2", r"trainer.min_lr_ratio must be a number >= 0 and <= 1"),
    ("trainer.adam_betas=[0.9,1.5]", r"trainer.adam_betas\[1\] must be a number >= 0 and < 1"),
    ("eval.batch_size=0", r"eval.batch_size must be an integer > 0"),
    ("eval.perplexity.batch_size=-1", r"eval.perplexity.batch_size must be an integer > 0"),
    ("eval.perplexity.stride=1024", r"stride \(1024\) must be <= eval.perplexity.window"),
    ("eval.num_fewshot=-1", r"eval.num_fewshot must be an integer >= 0"),
    ("seed=-3", r"seed must be an integer >= 0"),
    ("trainer.lr=nan", r"trainer.lr must be a number > 0, got nan"),
])
def test_numeric_options_name_field_and_range(compose, override, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config(compose([override]))


@pytest.mark.parametrize("override,message", [
    ("method.rank=0", r"method 'lora': rank \(method.rank\) must be an integer > 0, got 0"),
    ("method.rank=-4", r"rank \(method.rank\) must be an integer > 0, got -4"),
    ("method.alpha=0", r"alpha \(method.alpha\) must be a number > 0"),
    ("method.dropout=1.0", r"dropout \(method.dropout\) must be a number >= 0 and < 1"),
])
def test_method_options_name_field_and_range(compose, override, message):
    cfg = build_run_config(compose(["method=lora", override]))
    with pytest.raises(ConfigError, match=message):
        check_run_config(cfg)
    with pytest.raises(ConfigError, match=message):  # the same check wherever a method is built
        build_method(cfg.method)


def test_every_method_default_passes_its_checks(compose):
    for method in ("lora", "lors", "lors_exact", "spp", "sqft", "full_sparse_ft", "none"):
        check_run_config(build_run_config(compose([f"method={method}"])))
    check_run_config(build_run_config(compose(["method=slope", "pattern=2of4"])))


def test_method_pattern_compatibility_before_load(compose):
    cfg = build_run_config(compose(["method=slope", "pattern=unstructured"]))
    with pytest.raises(ConfigError, match=r"method=slope needs a 2:4 base \(pattern=2of4 sparsity=0.5\); "
                                          r"got pattern=unstructured"):
        check_run_config(cfg)


@pytest.mark.parametrize("key,kind", [("method.name=nope", "method"), ("pruning.name=nope", "pruner")])
def test_unknown_registry_names_list_the_valid_ones(compose, key, kind):
    with pytest.raises(ConfigError, match=rf"unknown {kind} 'nope'. Valid: "):
        check_run_config(build_run_config(compose([key])))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=300, max_position_embeddings=128))


def test_unknown_target_lists_the_models_linears(compose, tiny_model):
    cfg = build_run_config(compose(["targets=[q_proj,foo_proj]", "trainer.seq_len=64",
                                    "eval.perplexity.window=64", "eval.perplexity.stride=64"]))
    with pytest.raises(ConfigError) as err:
        check_model_fits(cfg, tiny_model)
    message = str(err.value)
    assert "['foo_proj']" in message and "q_proj" in message
    assert linear_names(tiny_model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    with pytest.raises(ConfigError, match=r"method.targets: \['nope'\]"):
        check_model_fits(build_run_config(compose(["trainer.seq_len=64", "eval.perplexity.window=64",
                                                   "eval.perplexity.stride=64"])), tiny_model, ("nope",))


def test_seq_len_beyond_the_models_positions(compose, tiny_model):
    cfg = build_run_config(compose(["trainer.seq_len=4096"]))
    with pytest.raises(ConfigError, match=r"trainer.seq_len=4096 exceeds model .*max_position_embeddings=128"):
        check_model_fits(cfg, tiny_model)


def test_smoke_preset_keeps_the_suites_tasks(compose):
    smoke_zeroshot = build_run_config(compose(["experiment=smoke", "eval=zeroshot7"]))
    zeroshot = build_run_config(compose(["eval=zeroshot7"]))
    assert smoke_zeroshot.eval.tasks == zeroshot.eval.tasks and smoke_zeroshot.eval.limit is not None
    assert build_run_config(compose(["experiment=smoke"])).eval.tasks == build_run_config(compose([])).eval.tasks
    explicit = build_run_config(compose(["experiment=smoke", "trainer.max_steps=7", "eval.limit=3"]))
    assert explicit.trainer.max_steps == 7 and explicit.eval.limit == 3


def test_output_root_that_is_a_file(compose, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"paths.output_root=.* exists and is not a directory"):
        build_run_config(compose([f"paths.output_root={blocker / 'sub'}"]))
    done = subprocess.run([sys.executable, "-m", "lorsbench", f"paths.output_root={blocker}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "exists and is not a directory" in done.stderr and "Traceback" not in done.stderr


def _tiny_run(compose, tmp_path, *extra):
    from lorsbench.pipeline import run_pipeline

    cfg = build_run_config(compose(["model=tiny-llama", "eval=none", "device=cpu", "dtype=float32",
                                    f"paths.cache_dir={tmp_path / 'cache'}", *extra]))
    return run_pipeline(cfg, tmp_path / "run")


def test_pipeline_refuses_a_missing_target_at_load(compose, tmp_path):
    record = _tiny_run(compose, tmp_path, "targets=[q_proj,foo_proj]")
    assert record["status"] == "failed" and record["phase_failed"] == "load"
    assert "['foo_proj']" in record["error"] and "down_proj, gate_proj" in record["error"]


def test_pipeline_refuses_slope_unstructured_before_load(compose, tmp_path):
    record = _tiny_run(compose, tmp_path, "method=slope", "pattern=unstructured")
    assert record["status"] == "failed" and record["phase_failed"] == "setup" and "needs a 2:4 base" in record["error"]
    assert "model_path" not in record  # nothing was loaded
