"""Instruction data: the BIG-bench mix (format, seeded choice shuffling, disjointness from the evaluation suite),
local/HF sources, tokenization to a fixed length with `full` vs `response` loss, and the seeded batch stream."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
import yaml

from lorsbench.config import ConfigError, DataConfig
from lorsbench.data.bigbench import ensure_tasks
from lorsbench.data.instructions import (
    IGNORE_INDEX, DataLoadError, Example, alpaca_prompt, batch_iterator, bigbench_examples, check_disjoint,
    load_examples, tokenize_examples,
)
from lorsbench.data.tokenizers import byte_tokenizer
from tests.conftest import CONF_DIR

CACHE_DIR = Path(os.path.expanduser(os.environ.get("LORSBENCH_CACHE", "~/.cache/lorsbench")))
# Tasks measured as candidate evaluation tasks (docs/environment.md §BIG-bench tasks): training must never use them.
EVAL_CANDIDATES = ("unit_conversion", "general_knowledge", "date_understanding", "penguins_in_a_table", "physics",
                   "ruin_names", "reasoning_about_colored_objects", "hindu_knowledge", "riddle_sense",
                   "phrase_relatedness")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- BIG-bench -------------------------------------------------------------------------------------------------

TASK = {
    "task_prefix": "Answer the question.\n",
    "examples": [
        {"input": f"Question {i}?", "target_scores": {"gold": 1, "wrong a": 0, "wrong b": 0, "wrong c": 0}}
        for i in range(40)
    ] + [
        {"input": "All tied?", "target_scores": {"x": 0, "y": 0}},  # no single answer: skipped
        {"input": "Generative?", "target": ["first target", "second"]},
        {"input": "", "target": "no input: skipped"},
    ],
}


def test_bigbench_examples_format_answer_and_shuffled_choices():
    examples = bigbench_examples(TASK, random.Random(0), cap=None)
    assert len(examples) == 41  # 40 multiple choice + 1 generative
    mc = [e for e in examples if e.response == "gold"]
    assert len(mc) == 40
    for example in mc:
        assert example.prompt.startswith(alpaca_prompt("Answer the question.", "x")[:60])
        assert "### Instruction:\nAnswer the question.\n\n### Input:\nQuestion" in example.prompt
        assert example.prompt.endswith("### Response:\n")
        listed = example.prompt.split("Options:\n")[1].split("\n\n###")[0].split("\n")
        assert sorted(listed) == ["- gold", "- wrong a", "- wrong b", "- wrong c"]
    first_positions = [e.prompt.split("Options:\n")[1].startswith("- gold") for e in mc]
    assert 0 < sum(first_positions) < 40  # the gold is listed first in the source, not after shuffling
    assert any(e.response == "first target" for e in examples)
    again = bigbench_examples(TASK, random.Random(0), cap=None)
    assert again == examples  # seeded
    assert bigbench_examples(TASK, random.Random(1), cap=None) != examples
    assert len(bigbench_examples(TASK, random.Random(0), cap=5)) == 5


def test_bigbench_mix_builds_from_the_cached_sdist():
    config = DataConfig(name="mix", source="bigbench", tasks=("navigate", "social_iqa"), max_examples_per_task=6)
    examples = load_examples(config, CACHE_DIR, seed=0)
    assert len(examples) == 12
    assert all(isinstance(e, Example) and e.prompt.endswith("### Response:\n") and e.response for e in examples)
    assert {e.response for e in examples[:6]} <= {"True", "False"}  # navigate: a yes/no task
    assert all("Options:\n- " in e.prompt for e in examples)
    assert examples == load_examples(config, CACHE_DIR, seed=0)
    assert examples != load_examples(config, CACHE_DIR, seed=1)


def test_default_mix_tasks_exist_and_are_disjoint_from_evaluation():
    mix = _yaml(CONF_DIR / "data" / "bigbench_mix.yaml")["tasks"]
    eval_tasks = _yaml(CONF_DIR / "eval" / "bigbench.yaml")["tasks"]
    paths = ensure_tasks(mix, CACHE_DIR)  # raises if a name is not in the sdist
    assert all(path.is_file() for path in paths.values())
    check_disjoint(mix, eval_tasks)
    check_disjoint(mix, EVAL_CANDIDATES)


def test_check_disjoint_names_the_overlap():
    with pytest.raises(ConfigError, match="general_knowledge"):
        check_disjoint(["navigate", "general_knowledge"], ["general_knowledge", "physics"])
    with pytest.raises(ConfigError, match="unit_conversion \\(train\\) ~ unit_conversion/si_conversion \\(eval\\)"):
        check_disjoint(["unit_conversion"], ["unit_conversion/si_conversion"])
    check_disjoint(["logical_deduction/three_objects"], ["logical_deduction_extra", "physics"])


# --- local and HF sources ---------------------------------------------------------------------------------------


def test_local_jsonl_and_json_with_alpaca_template(tmp_path):
    records = [{"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(records))
    for path in (jsonl, as_json):
        examples = load_examples(DataConfig(name="local", source="local", path=str(path)), tmp_path, seed=0)
        assert examples[0] == Example(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n", "hi")
        assert examples[1].prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
        assert "paired with an input" in examples[1].prompt
    capped = load_examples(DataConfig(name="local", source="local", path=str(jsonl), max_examples_per_task=1),
                           tmp_path, seed=0)
    assert len(capped) == 1


def test_local_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(DataLoadError, match="does not exist"):
        load_examples(DataConfig(name="local", source="local", path=str(tmp_path / "none.jsonl")), tmp_path, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}))
    with pytest.raises(DataLoadError, match="record 0 needs 'instruction' and 'output'"):
        load_examples(DataConfig(name="local", source="local", path=str(bad)), tmp_path, 0)


def test_hf_dataset_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr("lorsbench.models.hub_reachable", lambda timeout_s=3.0: False)
    config = DataConfig(name="alpaca", source="hf", hf_id="lorsbench-tests/not-a-cached-dataset")
    import datasets  # noqa: F401  (its import alone takes seconds; time only the lookup)

    start = time.perf_counter()
    with pytest.raises(DataLoadError) as info:
        load_examples(config, tmp_path, 0)
    assert time.perf_counter() - start < 10
    assert "lorsbench-tests/not-a-cached-dataset" in str(info.value) and "unreachable" in str(info.value)
    assert os.environ.get("HF_DATASETS_OFFLINE") is None


# --- tokenization and batches -----------------------------------------------------------------------------------

EXAMPLES = [Example(alpaca_prompt("Say hi."), "hi"), Example(alpaca_prompt("Add.", "2 and 3"), "five")]


@pytest.mark.parametrize("loss_on", ["full", "response"])
def test_tokenize_exact_length_and_label_masks(loss_on):
    tokenizer = byte_tokenizer()
    seq_len = 256
    data = tokenize_examples(EXAMPLES, tokenizer, seq_len, loss_on)
    assert data.input_ids.shape == data.attention_mask.shape == data.labels.shape == (2, seq_len)
    for row, example in enumerate(EXAMPLES):
        prompt = [tokenizer.bos_token_id] + list(example.prompt.encode())
        answer = list(example.response.encode()) + [tokenizer.eos_token_id]
        n = len(prompt) + len(answer)
        assert data.input_ids[row, :n].tolist() == prompt + answer
        assert data.attention_mask[row].tolist() == [1] * n + [0] * (seq_len - n)
        assert (data.input_ids[row, n:] == tokenizer.pad_token_id).all()
        expected = (prompt if loss_on == "full" else [IGNORE_INDEX] * len(prompt)) + answer
        assert data.labels[row].tolist() == expected + [IGNORE_INDEX] * (seq_len - n)
    assert data.num_truncated == 0 and data.num_dropped == 0


def test_tokenize_truncates_and_drops_rows_without_labels():
    tokenizer = byte_tokenizer()
    prompt_len = len(EXAMPLES[0].prompt.encode()) + 1
    seq_len = prompt_len + 1  # room for one response token
    full = tokenize_examples(EXAMPLES, tokenizer, seq_len, "full")
    assert full.input_ids.shape == (2, seq_len) and full.num_truncated == 2
    response = tokenize_examples(EXAMPLES, tokenizer, seq_len, "response")
    assert len(response) == 1 and response.num_dropped == 1  # the longer prompt leaves no response token
    assert response.labels[0].tolist() == [IGNORE_INDEX] * prompt_len + [ord("h")]
    with pytest.raises(DataLoadError, match="seq_len"):
        tokenize_examples(EXAMPLES, tokenizer, 16, "response")
    with pytest.raises(ConfigError, match="loss_on"):
        tokenize_examples(EXAMPLES, tokenizer, 16, "prompt")


def test_batch_iterator_is_seeded_endless_and_fixed_shape():
    tokenizer = byte_tokenizer()
    examples = [Example(alpaca_prompt(f"Task {i}."), str(i)) for i in range(10)]
    data = tokenize_examples(examples, tokenizer, 160, "full")

    def take(seed: int, count: int) -> list[torch.Tensor]:
        stream = batch_iterator(data, micro_batch_size=4, seed=seed)
        return [next(stream)["input_ids"] for _ in range(count)]

    first, again, other = take(0, 10), take(0, 10), take(1, 10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert all(batch.shape == (4, 160) for batch in first)  # 10 rows, batches of 4: spans epoch boundaries
    rows = [tuple(r.tolist()) for batch in first for r in batch]
    epochs = [rows[i: i + 10] for i in range(0, 40, 10)]
    assert all(len(set(epoch)) == 10 for epoch in epochs)  # each epoch visits every row once
    assert epochs[0] != epochs[1]  # reshuffled
    batch = next(batch_iterator(data, 3, 0))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
