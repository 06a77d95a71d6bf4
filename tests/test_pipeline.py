"""The pipeline end to end on a tiny LLaMA with tiny local data and a tiny local lm-eval task: every field of
run.json, and a two-job multirun where one job fails on purpose."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench.config import build_run_config
from lorsbench.data.tokenizers import byte_tokenizer
from lorsbench.pipeline import run_pipeline
from lorsbench.records import read_record, unknown_fields, validate_record
from tests.conftest import REPO

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 0}}
"""


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model_dir = root / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                          "output": str(2 * i + 1)}) for i in range(24)))
    tasks = root / "tasks"
    tasks.mkdir()
    docs = [{"prompt": f"Q: Is {i} even?\nA:", "choices": ["yes", "no"], "gold": i % 2} for i in range(12)]
    (tasks / "tiny_mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny_mc.jsonl"))
    return {"model": model_dir, "data": data, "tasks": tasks}


def _overrides(assets, tmp_path, *extra):
    return [
        "model=hf", f"model.path={assets['model']}", "dtype=float32", "device=cpu",
        "data=local", f"data.path={assets['data']}", "data.heldout_examples=4",
        "eval=local", f"eval.include_path={assets['tasks']}", "eval.tasks=[tiny_mc]", "eval.batch_size=4",
        "eval.perplexity.max_tokens=600", "eval.perplexity.window=128", "eval.perplexity.stride=128",
        "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.warmup_steps=1",
        "profile.warmup_steps=1", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_root={tmp_path / 'out'}",
        *extra,
    ]


def test_run_json_has_every_field(compose, tiny_assets, tmp_path):
    cfg = build_run_config(compose(_overrides(tiny_assets, tmp_path, "method=lora", "sparsity=0.5")))
    out = tmp_path / "run"
    record = run_pipeline(cfg, out)
    assert record["status"] == "success", record.get("error")
    on_disk = read_record(out)
    assert on_disk == json.loads(json.dumps(on_disk))  # plain JSON
    assert validate_record(on_disk) == [] and unknown_fields(on_disk) == []  # records.RecordFields is the schema
    # identity and factors
    for key in ("schema_version", "run_name", "started_at", "finished_at", "wall_s", "model", "pruner", "pattern",
                "target_sparsity", "method", "method_config", "preserves_sparsity", "seed", "dtype", "device",
                "resolved_config", "weights"):
        assert on_disk[key] is not None, key
    assert on_disk["smoke"] is False and on_disk["error"] is None
    # provenance
    assert on_disk["versions"]["torch"] and on_disk["versions"]["lm_eval"] and on_disk["device_name"]
    assert "git_sha" in on_disk and "git_dirty" in on_disk
    # training and measurements
    assert on_disk["train_steps"] == 4 and on_disk["measured_steps"] == 3
    assert on_disk["step_ms_median"] > 0 and on_disk["step_ms_p90"] >= on_disk["step_ms_median"]
    assert on_disk["tokens_per_s"] > 0 and on_disk["trainable_params"] > 0
    for phase in ("load", "prune", "train", "eval"):
        assert on_disk[f"peak_rss_gib_{phase}"] > 0, phase
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4 and {"loss", "lr", "step_ms"} <= set(json.loads(log[0]))
    # sparsity: exact 50 % after prune and train; LoRA's dense merge loses it and the record says so
    assert on_disk["sparsity_after_prune"] == pytest.approx(0.5, abs=1e-6)
    assert on_disk["sparsity_after_train"] == pytest.approx(0.5, abs=1e-6)
    assert on_disk["mask_preserved_after_train"] is True
    assert on_disk["mask_preserved_after_merge"] is False and on_disk["sparsity_after_merge"] < 0.01
    assert on_disk["nm_valid_after_merge"] is None  # unstructured
    assert set(on_disk["sparsity_by_type_after_prune"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}
    # quality
    task = on_disk["tasks"]["tiny_mc"]
    assert 0 <= task["acc"] <= 1 and task["acc_stderr"] > 0 and "acc_norm" in task
    assert on_disk["mean_acc"] == pytest.approx(task["acc"])
    assert (out / on_disk["lm_eval_json"]).exists()
    assert on_disk["perplexity"] > 1 and on_disk["perplexity_tokens"] > 0
    assert len(on_disk["perplexity_text_sha256"]) == 64


def test_none_method_keeps_the_mask_and_trains_nothing(compose, tiny_assets, tmp_path):
    cfg = build_run_config(compose(_overrides(tiny_assets, tmp_path, "method=none", "pattern=2of4",
                                              "save_merged=true")))
    record = run_pipeline(cfg, tmp_path / "run")
    assert record["status"] == "success", record.get("error")
    assert record["train_steps"] == 0 and record["trainable_params"] == 0
    assert record["mask_preserved_after_merge"] is True and record["nm_valid_after_merge"] is True
    assert record["sparsity_after_merge"] == pytest.approx(0.5, abs=1e-6)
    assert record["merged_reload_verified"] is True
    assert (tmp_path / "run" / record["merged_dir"] / "masks.safetensors").exists()


def test_dense_reference_makes_no_nm_claim(compose, tiny_assets, tmp_path):
    """pruning=none with an N:M pattern (a sweep's dense row) is dense: N:M validity is not applicable."""
    cfg = build_run_config(compose(_overrides(tiny_assets, tmp_path, "pruning=none", "method=none", "pattern=2of4")))
    record = run_pipeline(cfg, tmp_path / "run")
    assert record["status"] == "success", record.get("error")
    assert record["nm_valid_after_merge"] is None and record["sparsity_after_merge"] < 0.01


def test_failure_is_recorded_with_phase_and_error(compose, tiny_assets, tmp_path):
    overrides = _overrides(tiny_assets, tmp_path, "method=lora")
    overrides[overrides.index(f"data.path={tiny_assets['data']}")] = f"data.path={tmp_path / 'missing.jsonl'}"
    record = run_pipeline(build_run_config(compose(overrides)), tmp_path / "run")
    assert record["status"] == "failed" and record["phase_failed"] == "prepare_data"
    assert "missing.jsonl" in record["error"]
    assert read_record(tmp_path / "run")["status"] == "failed"
    assert (tmp_path / "run" / "error.log").exists()


@pytest.mark.slow
def test_multirun_goes_on_past_a_failed_job(tiny_assets, tmp_path):
    overrides = _overrides(tiny_assets, tmp_path, "method=lora")
    good, bad = tiny_assets["data"], tmp_path / "missing.jsonl"
    overrides = [o for o in overrides if not o.startswith("data.path=")]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lorsbench", "-m", f"data.path={bad},{good}", *overrides,
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    records = sorted((read_record(p) for p in sweep.glob("*/run.json")), key=lambda r: r["status"])
    assert [r["status"] for r in records] == ["failed", "success"], done.stderr[-3000:]
    assert "missing.jsonl" in records[0]["error"]
    assert done.returncode != 0  # the sweep reports that a job failed, after running all of them
