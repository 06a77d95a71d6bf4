"""BIG-bench multiple-choice tasks converted to local lm-eval tasks (generated YAML + JSONL, `include_path`).

Prompts follow BIG-bench's default JSON-task formatting (`bigbench/api/json_task.py`, `default_format_fn`):
`task_prefix` + `example_input_prefix` ("\\nQ: ") + input, then each answer choice after `choice_prefix`
("\\n  choice: ") when `append_choices_to_input` (default true), then `example_output_prefix` ("\\nA: "). The
gold answer is the choice with the highest `target_scores` value (the first one on ties, as BIG-bench does).

Two deliberate departures, both seeded and deterministic:
- documents are shuffled before the `max_examples` cap, so the cap takes a fixed random subset rather than the
  head of an often-ordered file;
- each example's answer choices are shuffled, and the gold index follows its answer. The JSONs often list the
  correct answer first, and with choices in the prompt that inflates accuracy through position/copy bias
  (docs/environment.md §BIG-bench tasks).

The converted suite lives under `<cache>/eval_tasks/bigbench/<key>/`, where `<key>` hashes the conversion
settings and task list, so changing either regenerates it. `data_files` paths are absolute: lm-eval resolves
relative ones against the current directory, not the YAML's folder (docs/environment.md §Cache layout).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from lorsbench.cache import digest_problem, file_digest
from lorsbench.data.bigbench import ensure_tasks

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the prompt format or JSONL schema changes: the cache key changes with it
SHUFFLE_SEED = 1234  # fixed for every run, so every run scores the same documents in the same choice order
MANIFEST = "manifest.json"

_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "


class ConversionError(ValueError):
    """A BIG-bench task that cannot be turned into a multiple-choice lm-eval task."""


@dataclass(frozen=True)
class ConvertedTask:
    """One converted task: its lm-eval name, files, and the baselines its documents imply."""

    bigbench_name: str
    lm_eval_name: str
    yaml_path: str
    data_path: str
    n_examples: int  # documents written (after the cap)
    n_source_examples: int  # multiple-choice examples in task.json
    n_skipped: int  # examples without target_scores or without a single best score
    chance_acc: float  # mean of 1/num_choices over the written documents
    majority_acc: float  # share of the most common gold answer text among the written documents
    target_delimiter: str


@dataclass(frozen=True)
class ConvertedSuite:
    include_path: Path
    key: str
    seed: int
    max_examples_per_task: int | None
    tasks: tuple[ConvertedTask, ...]

    def by_bigbench_name(self) -> dict[str, ConvertedTask]:
        return {t.bigbench_name: t for t in self.tasks}


def lm_eval_task_name(bigbench_name: str) -> str:
    """`unit_conversion/si_conversion` -> `bb_unit_conversion__si_conversion` (a valid lm-eval task name)."""
    return "bb_" + bigbench_name.replace("/", "__")


def suite_key(tasks: list[str] | tuple[str, ...], max_examples_per_task: int | None, seed: int) -> str:
    """Hash of everything that determines the converted files."""
    payload = json.dumps(
        {"format": FORMAT_VERSION, "seed": seed, "max_examples_per_task": max_examples_per_task, "tasks": list(tasks)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def format_prompt(task_data: dict, example_input: str, choices: list[str]) -> tuple[str, str]:
    """(prompt, target_delimiter) in BIG-bench's default format, with `choices` listed in the given order.

    A trailing space of the output prefix moves into lm-eval's target delimiter, so the answer is scored as
    " <choice>" (the usual word-initial token) after a prompt ending in "A:".
    """
    input_prefix = task_data.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    output_prefix = task_data.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = task_data.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    body = example_input
    if task_data.get("append_choices_to_input", True):
        body += choice_prefix + choice_prefix.join(choices)
    prompt = str(task_data.get("task_prefix", "")) + input_prefix + body + output_prefix
    if output_prefix.endswith(" "):
        return prompt.rstrip(" "), " "
    return prompt, ""


def convert_examples(task_name: str, task_data: dict, max_examples: int | None, seed: int) -> tuple[list[dict], int]:
    """JSONL documents {prompt, choices, gold, source_index} for one task, and the count of skipped examples.

    Documents are shuffled with `Random(f"{seed}:{task}:documents")`, then capped; each example's choices are
    shuffled with `Random(f"{seed}:{task}:{source_index}")`, so one example's order never depends on the others.
    """
    examples = task_data.get("examples")
    if not isinstance(examples, list) or not examples:
        subtasks = task_data.get("subtasks")
        hint = f" It has subtasks; name one of them (e.g. '{task_name}/<subtask>')." if subtasks else ""
        raise ConversionError(f"BIG-bench task '{task_name}' has no JSON examples.{hint}")
    usable: list[tuple[int, dict]] = []
    skipped = 0
    for index, example in enumerate(examples):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            skipped += 1
            continue
        values = list(scores.values())
        if max(values) <= min(values):  # no single correct answer (BIG-bench rejects these too)
            skipped += 1
            continue
        usable.append((index, example))
    if not usable:
        raise ConversionError(f"BIG-bench task '{task_name}' has no multiple-choice examples (target_scores)")

    random.Random(f"{seed}:{task_name}:documents").shuffle(usable)
    if max_examples is not None:
        usable = usable[:max_examples]

    documents = []
    for index, example in usable:
        scores = example["target_scores"]
        source_choices = [str(c) for c in scores]
        best = max(scores.values())
        gold_text = next(str(c) for c, v in scores.items() if v == best)  # first best, as BIG-bench
        choices = list(source_choices)
        random.Random(f"{seed}:{task_name}:{index}").shuffle(choices)
        prompt, _ = format_prompt(task_data, str(example["input"]), choices)
        documents.append({"prompt": prompt, "choices": choices, "gold": choices.index(gold_text),
                          "source_index": index})
    return documents, skipped


def _task_yaml(name: str, data_path: Path, delimiter: str, bigbench_name: str) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": delimiter,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": FORMAT_VERSION, "bigbench_task": bigbench_name},
    }


def convert_suite(tasks: list[str] | tuple[str, ...], cache_dir: Path, max_examples_per_task: int | None,
                  seed: int = SHUFFLE_SEED) -> ConvertedSuite:
    """Convert (or reuse) the lm-eval task folder for `tasks`; BIG-bench JSONs are fetched into the cache if needed."""
    tasks = list(tasks)
    if not tasks:
        raise ConversionError("no BIG-bench tasks to convert (eval.tasks is empty)")
    duplicates = sorted(t for t, n in Counter(tasks).items() if n > 1)
    if duplicates:
        raise ConversionError(f"eval.tasks lists {duplicates} more than once")
    key = suite_key(tasks, max_examples_per_task, seed)
    root = Path(cache_dir).expanduser().resolve() / "eval_tasks" / "bigbench" / key
    manifest = root / MANIFEST
    if manifest.exists():
        problem = _suite_problem(manifest, root)
        if problem is None:
            return _read_manifest(manifest, root)
        log.warning("converted eval suite %s is unusable (%s); converting it again", root, problem)
        aside = root.with_name(f".{root.name}.damaged-{os.getpid()}")
        os.replace(root, aside)
        shutil.rmtree(aside, ignore_errors=True)

    sources = ensure_tasks(tasks, Path(cache_dir))
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root.parent))
    try:
        converted = []
        for bb_name in tasks:
            with open(sources[bb_name]) as handle:
                task_data = json.load(handle)
            documents, skipped = convert_examples(bb_name, task_data, max_examples_per_task, seed)
            name = lm_eval_task_name(bb_name)
            # files are written in staging but must name their final absolute location
            data_path, yaml_path = root / "data" / f"{name}.jsonl", root / f"{name}.yaml"
            (staging / "data").mkdir(exist_ok=True)
            with open(staging / "data" / data_path.name, "w") as handle:
                for doc in documents:
                    handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
            _, delimiter = format_prompt(task_data, "", [])
            with open(staging / yaml_path.name, "w") as handle:
                yaml.safe_dump(_task_yaml(name, data_path, delimiter, bb_name), handle, sort_keys=False,
                               allow_unicode=True)
            golds = Counter(doc["choices"][doc["gold"]] for doc in documents)
            converted.append(ConvertedTask(
                bigbench_name=bb_name, lm_eval_name=name, yaml_path=str(yaml_path), data_path=str(data_path),
                n_examples=len(documents), n_source_examples=len(task_data["examples"]), n_skipped=skipped,
                chance_acc=sum(1.0 / len(doc["choices"]) for doc in documents) / len(documents),
                majority_acc=golds.most_common(1)[0][1] / len(documents), target_delimiter=delimiter,
            ))
        suite = ConvertedSuite(include_path=root, key=key, seed=seed, max_examples_per_task=max_examples_per_task,
                               tasks=tuple(converted))
        files = {str(p.relative_to(staging)): file_digest(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        with open(staging / MANIFEST, "w") as handle:
            json.dump({"format": FORMAT_VERSION, "key": key, "seed": seed,
                       "max_examples_per_task": max_examples_per_task,
                       "tasks": [asdict(t) for t in converted], "files": files}, handle, indent=2)
        try:
            os.replace(staging, root)
        except OSError:  # another process finished the same conversion first; its files are identical
            if not manifest.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _read_manifest(manifest, root)


def _suite_problem(manifest: Path, root: Path) -> str | None:
    """None when the manifest reads and every converted file is as written (sizes and sha256s); else why not."""
    try:
        files = json.loads(manifest.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{manifest}: {exc}"
    return digest_problem(root, files or {})


def _read_manifest(manifest: Path, root: Path) -> ConvertedSuite:
    with open(manifest) as handle:
        payload = json.load(handle)
    return ConvertedSuite(
        include_path=root, key=payload["key"], seed=payload["seed"],
        max_examples_per_task=payload["max_examples_per_task"],
        tasks=tuple(ConvertedTask(**t) for t in payload["tasks"]),
    )
