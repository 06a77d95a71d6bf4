"""Instruction-tuning data: the offline BIG-bench mix (default), Alpaca / Alpaca-GPT4 from the HF hub, or a local
JSON/JSONL file; every source is formatted with the Stanford Alpaca prompt template.

    examples = load_examples(cfg.data, cfg.paths.cache_dir, cfg.seed)
    dataset = tokenize_examples(examples, tokenizer, seq_len=256, loss_on="full")
    batches = batch_iterator(dataset, micro_batch_size=4, seed=0)     # infinite, seeded

`loss_on="full"` puts labels on every non-pad token (what the LoRS training code does); `"response"` masks the
prompt with -100 (the Stanford Alpaca recipe).
"""
from __future__ import annotations

import hashlib

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from lorsbench.config import LOSS_ON, ConfigError, DataConfig

IGNORE_INDEX = -100

# The Stanford Alpaca prompt template, with and without an input field.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataLoadError(RuntimeError):
    """Training data could not be loaded; the message names the data set, the reason and how to get it."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the full formatted prompt, ending with "### Response:\n"
    response: str  # the answer text (eos is appended at tokenization)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_examples(config: DataConfig, cache_dir: Path, seed: int) -> list[Example]:
    """The examples of the configured source, capped at `max_examples_per_task` (per task for BIG-bench, in
    total otherwise) after a seeded shuffle."""
    loaders = {"bigbench": _bigbench_mix, "hf": _hf_examples, "local": _local_examples}
    if config.source not in loaders:
        raise ConfigError(f"unknown data source '{config.source}' (valid: {', '.join(loaders)})")
    if config.max_examples_per_task is not None and config.max_examples_per_task <= 0:
        raise ConfigError(f"data.max_examples_per_task must be > 0 or null, got {config.max_examples_per_task}")
    examples = loaders[config.source](config, Path(cache_dir), seed)
    if not examples:
        raise DataLoadError(f"data '{config.name}': no usable examples")
    return examples


def split_heldout(examples: list[Example], n_heldout: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the `n_heldout` examples with the smallest sha256 of their text are held out.

    The choice depends on the examples' content only (not the run seed or their order), so every run of a
    comparison holds out the same examples; they never train and give the lr sweep its validation loss."""
    if n_heldout < 0:
        raise ConfigError(f"data.heldout_examples must be >= 0, got {n_heldout}")
    if n_heldout == 0:
        return list(examples), []
    if n_heldout >= len(examples):
        raise ConfigError(f"data.heldout_examples={n_heldout} leaves no training example (the data has "
                          f"{len(examples)}); use fewer")
    digest = {id(e): hashlib.sha256(f"{e.prompt}\x00{e.response}".encode()).hexdigest() for e in examples}
    held = set(sorted(digest.values())[:n_heldout])
    return [e for e in examples if digest[id(e)] not in held], [e for e in examples if digest[id(e)] in held]


# ---------------------------------------------------------------------------------------------------------------
# BIG-bench mix


def check_disjoint(train_tasks: Iterable[str], eval_tasks: Iterable[str]) -> None:
    """Raise ConfigError if a training task is an evaluation task; a task and its subtasks
    (`unit_conversion` vs `unit_conversion/si_conversion`) count as overlapping."""
    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    train, evaluation = [t.strip("/") for t in train_tasks], [t.strip("/") for t in eval_tasks]
    overlap = [f"{t} (train) ~ {e} (eval)" if t != e else t for t in train for e in evaluation if related(t, e)]
    if overlap:
        raise ConfigError(
            f"training tasks overlap the evaluation tasks: {', '.join(overlap)}. "
            "Remove them from data.tasks or eval.tasks: a model must not be evaluated on what it was tuned on."
        )


def _bigbench_mix(config: DataConfig, cache_dir: Path, seed: int) -> list[Example]:
    from lorsbench.data.bigbench import ensure_tasks

    if not config.tasks:
        raise ConfigError(f"data '{config.name}' (source=bigbench) needs data.tasks=[...]")
    paths = ensure_tasks(list(config.tasks), cache_dir)  # one pass over the sdist for all missing tasks
    examples: list[Example] = []
    for task in config.tasks:
        with open(paths[task]) as handle:
            task_json = json.load(handle)
        rng = random.Random(f"bigbench-train:{task}:{seed}")
        task_examples = bigbench_examples(task_json, rng, config.max_examples_per_task)
        if not task_examples:
            raise DataLoadError(f"BIG-bench task '{task}' has no examples with a target (a programmatic task?)")
        examples += task_examples
    return examples


def bigbench_examples(task_json: dict[str, Any], rng: random.Random, cap: int | None) -> list[Example]:
    """Instruction examples from one BIG-bench task JSON: instruction = task_prefix, input = the example input
    (after the task's own `example_input_prefix`, when it sets one) plus, for multiple-choice examples, the
    choices in a seeded random order; response = the top-scoring choice (or the first generative target).

    The examples are visited in a seeded random order and the first `cap` usable ones are kept."""
    prefix = (task_json.get("task_prefix") or "").strip()
    input_prefix = (task_json.get("example_input_prefix") or "").strip()
    raw = list(task_json.get("examples") or [])
    rng.shuffle(raw)
    out: list[Example] = []
    for item in raw:
        if cap is not None and len(out) >= cap:
            break
        text = str(item.get("input") or "").strip()
        if not text:
            continue
        if input_prefix:
            text = f"{input_prefix} {text}"
        scores = item.get("target_scores")
        if scores:
            best = max(scores.values())
            if all(value == best for value in scores.values()):
                continue  # no single correct answer
            answer = next(choice for choice, value in scores.items() if value == best)
            choices = list(scores)
            rng.shuffle(choices)  # sources often list the gold first
            text += "\nOptions:\n" + "\n".join(f"- {choice}" for choice in choices)
        else:
            target = item.get("target")
            answer = target[0] if isinstance(target, list) and target else target
            if not isinstance(answer, str) or not answer.strip():
                continue
        instruction, input_text = (prefix, text) if prefix else (text, "")
        out.append(Example(alpaca_prompt(instruction, input_text), str(answer).strip()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# records of {instruction, input?, output}: HF hub data sets and local files


def _records_to_examples(records: Iterable[dict[str, Any]], where: str) -> list[Example]:
    examples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataLoadError(f"{where}: record {index} needs 'instruction' and 'output' (has {keys})")
        examples.append(Example(alpaca_prompt(str(record["instruction"]), str(record.get("input") or "")),
                                str(record["output"]).strip()))
    return examples


def _cap(examples: list[Example], cap: int | None, seed: int, name: str) -> list[Example]:
    if cap is None or len(examples) <= cap:
        return examples
    order = list(range(len(examples)))
    random.Random(f"{name}:{seed}").shuffle(order)
    return [examples[i] for i in order[:cap]]


def _local_examples(config: DataConfig, cache_dir: Path, seed: int) -> list[Example]:
    if not config.path:
        raise ConfigError(f"data '{config.name}' (source=local) needs data.path=<file.json or file.jsonl>")
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise DataLoadError(f"data '{config.name}': file {path} does not exist (data.path)")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataLoadError(f"data '{config.name}': {path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {err}") from err
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise DataLoadError(f"data '{config.name}': {path} must hold a list of records (or one record per line)")
    return _cap(_records_to_examples(records, str(path)), config.max_examples_per_task, seed, config.name)


def _hf_examples(config: DataConfig, cache_dir: Path, seed: int) -> list[Example]:
    dataset = load_hf_dataset(config.hf_id, config.name)
    return _cap(_records_to_examples(dataset, config.hf_id), config.max_examples_per_task, seed, config.name)


def load_hf_dataset(hf_id: str | None, name: str, split: str = "train"):
    """`datasets.load_dataset(hf_id, split=...)`: from the local HF cache first (no network), then from the hub if
    it answers; otherwise one DataLoadError that says how to get the data (no retry loops)."""
    import datasets

    from lorsbench.models import hub_offline, hub_reachable

    if not hf_id:
        raise ConfigError(f"data '{name}' (source=hf) needs data.hf_id")
    try:
        with hub_offline():
            return datasets.load_dataset(hf_id, split=split)
    except Exception as err:  # datasets raises several types for a cache miss (ConnectionError, FileNotFoundError, ...)
        cache_miss = err
    if not hub_reachable():
        raise DataLoadError(
            f"data '{name}': the Hugging Face data set '{hf_id}' is not in the local cache "
            f"({datasets.config.HF_DATASETS_CACHE}) and the hub is unreachable (offline). Run "
            f"`python -c \"import datasets; datasets.load_dataset('{hf_id}')\"` once on a machine with internet "
            "(and copy the cache, or point HF_HOME at it), or use data=bigbench_mix (offline) or "
            f"data=local data.path=<file.jsonl>. ({type(cache_miss).__name__})"
        )
    print(f"[lorsbench] downloading data set {hf_id} from the Hugging Face hub ...", file=sys.stderr, flush=True)
    try:
        return datasets.load_dataset(hf_id, split=split)
    except Exception as err:
        raise DataLoadError(f"data '{name}': could not load '{hf_id}' from the Hugging Face hub: {err}") from err


# ---------------------------------------------------------------------------------------------------------------
# tokenization and batches


@dataclass
class TokenizedDataset:
    """Fixed-length rows (right padding): pad positions have attention_mask 0 and label -100."""

    input_ids: torch.Tensor  # (N, seq_len) long
    attention_mask: torch.Tensor  # (N, seq_len) long
    labels: torch.Tensor  # (N, seq_len) long, IGNORE_INDEX where no loss
    num_truncated: int = 0  # examples cut at seq_len
    num_dropped: int = 0  # examples left with no label token after truncation (loss_on=response)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def tokenize_examples(examples: list[Example], tokenizer, seq_len: int, loss_on: str) -> TokenizedDataset:
    """prompt (with the tokenizer's own special tokens, e.g. BOS) + response + eos, truncated/padded to exactly
    `seq_len`. loss_on: `full` = labels on every real token; `response` = prompt tokens masked with -100."""
    if loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be > 0, got {seq_len}")
    if not examples:
        raise DataLoadError("no examples to tokenize")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise DataLoadError(f"tokenizer {type(tokenizer).__name__} has no eos token")
    if pad_id is None:
        pad_id = eos_id
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]

    rows_ids, rows_labels, truncated, dropped = [], [], 0, 0
    for prompt_ids, response_ids in zip(prompts, responses):
        ids = list(prompt_ids) + list(response_ids) + [eos_id]
        labels = ([IGNORE_INDEX] * len(prompt_ids) if loss_on == "response" else list(prompt_ids)) \
            + list(response_ids) + [eos_id]
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        rows_ids.append(ids)
        rows_labels.append(labels)
    if not rows_ids:
        raise DataLoadError(
            f"every example's prompt is longer than seq_len={seq_len}, so no response token is left to learn; "
            "raise trainer.seq_len or use loss_on=full"
        )
    if dropped:
        print(f"[lorsbench] dropped {dropped} of {len(examples)} examples whose prompt fills seq_len={seq_len}",
              file=sys.stderr, flush=True)

    n = len(rows_ids)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    label_tensor = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(zip(rows_ids, rows_labels)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        label_tensor[row, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return TokenizedDataset(input_ids, attention_mask, label_tensor, num_truncated=truncated, num_dropped=dropped)


def batch_iterator(dataset: TokenizedDataset, micro_batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of exactly `micro_batch_size` rows: the rows in a seeded random order, reshuffled
    every epoch; a batch may span an epoch boundary, so every batch has the same shape."""
    if micro_batch_size <= 0:
        raise ConfigError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    n = len(dataset)
    if n == 0:
        raise DataLoadError("the training data set is empty")
    generator = torch.Generator().manual_seed(seed)
    queue = torch.empty(0, dtype=torch.long)
    while True:
        while len(queue) < micro_batch_size:
            queue = torch.cat([queue, torch.randperm(n, generator=generator)])
        index, queue = queue[:micro_batch_size], queue[micro_batch_size:]
        yield {
            "input_ids": dataset.input_ids[index],
            "attention_mask": dataset.attention_mask[index],
            "labels": dataset.labels[index],
        }
