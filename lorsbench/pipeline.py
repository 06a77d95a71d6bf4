"""The run, phase by phase: load -> prune -> attach -> train -> merge -> verify sparsity -> evaluate -> record.

Each phase is a small function; none of them names a method or a pruner. Any exception ends the run with a
record whose `status` is `failed` (or `oom`) and whose `error` says what went wrong in which phase; SIGINT and
SIGTERM end it with `interrupted` (then `Interrupted` is raised so the caller exits non-zero). The record's
heartbeat is refreshed at every phase boundary and every HEARTBEAT_S during training (README "What a run records").
"""
from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lorsbench import distributed
from lorsbench.config import PatternConfig, PruningConfig, RunConfig
from lorsbench.config_checks import check_model_fits, check_run_config, resolve_lr
from lorsbench.registry import Method, MethodContext, build_method
from lorsbench.profiling import PhaseMeter
from lorsbench.pruning.masks import MaskSet, measure_sparsity
from lorsbench.records import RunRecord, failure_status, now_utc, write_json_atomic, write_text_atomic
from lorsbench.runtime import provenance, resolve_device, seed_everything, torch_dtype
from lorsbench.schedule import check_rounds, default_schedule
from lorsbench.training import causal_lm_loss, train

log = logging.getLogger("lorsbench")
TRAIN_LOG = "train_log.jsonl"
ERROR_LOG = "error.log"
MERGED_DIR = "merged"
PPL_WINDOWS = "perplexity_windows.json"
HEARTBEAT_S = 30.0  # at most one run.json rewrite per this many seconds from the training loop


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a run (a KeyboardInterrupt, so Ctrl-C semantics are kept)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals(handler: Callable | int) -> Iterator[None]:
    """SIGINT/SIGTERM -> `handler` for the duration (main thread only: elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _factors(cfg: RunConfig) -> dict:
    return {
        "run_name": cfg.run_name, "smoke": cfg.smoke, "model": cfg.model.name, "model_source": cfg.model.source,
        "pruner": cfg.pruning.name, "pattern": cfg.pruning.pattern.name, "target_sparsity": cfg.pruning.sparsity,
        "method": cfg.method.name, "seed": cfg.seed, "dtype": cfg.dtype,
        "matmul_precision": cfg.matmul_precision, "data": cfg.data.name,
        "seq_len": cfg.trainer.seq_len, "micro_batch_size": cfg.trainer.micro_batch_size,
        "grad_accum": cfg.trainer.grad_accum, "lr": cfg.trainer.lr, "lr_source": cfg.lr_source,
        "max_steps": cfg.trainer.max_steps,
        "eval_suite": cfg.eval.suite, "eval_limit": cfg.eval.limit, "resolved_config": cfg.resolved,
    }


@dataclass
class Run:
    """State shared by the phases of one run and its record; each field is set by the phase named beside it."""

    cfg: RunConfig
    output_dir: Path
    record: RunRecord = field(init=False)
    phase: str = "setup"
    device: torch.device | None = None  # setup
    dist: distributed.Single | None = None  # setup: this rank's share of the run (lorsbench.distributed)
    dtype: torch.dtype | None = None  # setup
    generator: torch.Generator | None = None  # setup
    method: Method | None = None  # setup
    rounds: list = field(default_factory=list)  # setup: the method's prune schedule (lorsbench.schedule.Round)
    scheduled: bool = False  # setup: True when the method owns a schedule of several rounds
    prepared_eval: Any = None  # prepare_evaluation
    model: Any = None  # load (a transformers PreTrainedModel; merge replaces it)
    tokenizer: Any = None  # load
    weights: str | None = None  # load: pretrained | random
    model_digest: str | None = None  # load: content digest (the pruning cache key)
    train_data: Any = None  # prepare_data
    train_batches: Callable[[], Iterator[dict]] | None = None  # prepare_data: a fresh batch iterator
    heldout_data: Any = None  # prepare_data: tokenized held-out examples (None without any)
    calibration_loader: Any = None  # prune: the calibration batches, loaded once for every round
    masks: MaskSet | None = None  # prune
    params: list[torch.nn.Parameter] = field(default_factory=list)  # attach

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.record = distributed.new_record(self.output_dir, started_at=now_utc(),
                                             output_dir=str(self.output_dir), **_factors(self.cfg))

    def measured(self, phase: str) -> PhaseMeter:
        return PhaseMeter(phase, self.device)

    def sparsity(self, stage: str, model) -> None:
        pattern = self.cfg.pruning.pattern
        if self.cfg.pruning.sparsity == 0:  # the dense reference makes no N:M claim to check
            pattern = PatternConfig(name="unstructured")
        report = measure_sparsity(model, self.cfg.pruning.targets, self.masks, pattern)
        self.record.update(report.as_dict(stage))
        log.info("sparsity %s: %.4f (mask preserved: %s, N:M valid: %s)", stage, report.sparsity,
                 report.mask_preserved, report.nm_valid)


def setup(run: Run) -> None:
    check_run_config(run.cfg)  # registry names and options, method x pattern: before anything is loaded
    run.cfg = cfg = resolve_lr(run.cfg)
    run.record.update(lr=cfg.trainer.lr, lr_source=cfg.lr_source)
    run.device = resolve_device(cfg.device)
    run.dtype = torch_dtype(cfg.dtype, run.device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    run.generator = seed_everything(cfg.seed)
    run.method = build_method(cfg.method)
    run.rounds = run.method.schedule(cfg)  # one round unless the method owns a prune schedule (lorsbench.schedule)
    check_rounds(run.rounds, cfg.trainer.max_steps)
    run.scheduled = run.rounds != default_schedule(cfg)
    run.dist = distributed.start(cfg, run.device, run.scheduled)
    run.device = run.dist.device
    run.record.update(provenance(run.device))
    run.record.update(method_config=run.method.describe(), preserves_sparsity=run.method.preserves_sparsity,
                      device=str(run.device), dtype=str(run.dtype).removeprefix("torch."), **run.dist.describe())
    run.record.save()


def prepare_evaluation(run: Run) -> None:
    """Check the evaluation tasks are available before anything expensive (fail fast, one clear error)."""
    from lorsbench.data.instructions import check_disjoint
    from lorsbench.evaluation import prepare_eval

    cfg = run.cfg
    if cfg.data.source == "bigbench" and cfg.eval.suite == "bigbench":
        check_disjoint(cfg.data.tasks, cfg.eval.tasks)
    run.prepared_eval = prepare_eval(cfg.eval, cfg.paths.cache_dir)


def load(run: Run) -> None:
    from lorsbench.models import load_model

    with run.measured("load") as meter:
        loaded = load_model(run.cfg.model, run.dtype, run.device, run.cfg.paths.cache_dir)
    run.model, run.tokenizer = loaded.model, loaded.tokenizer
    run.weights, run.model_digest = loaded.weights, loaded.digest
    run.record.update(meter.stats.as_dict(), weights=loaded.weights, model_path=loaded.source,
                      model_sha256=loaded.digest, total_params=sum(p.numel() for p in run.model.parameters()))
    check_model_fits(run.cfg, run.model, tuple(getattr(run.method.config, "targets", None) or ()))


def prepare_data(run: Run) -> None:
    from lorsbench.data.instructions import batch_iterator, load_examples, split_heldout, tokenize_examples

    cfg = run.cfg
    examples = load_examples(cfg.data, cfg.paths.cache_dir, cfg.seed)
    examples, heldout = split_heldout(examples, cfg.data.heldout_examples)
    run.train_data = tokenize_examples(examples, run.tokenizer, cfg.trainer.seq_len, cfg.data.loss_on)
    run.heldout_data = (tokenize_examples(heldout, run.tokenizer, cfg.trainer.seq_len, cfg.data.loss_on)
                        if heldout else None)
    run.train_batches = run.dist.batches(lambda rows: batch_iterator(run.train_data, rows, cfg.seed),
                                         cfg.trainer.micro_batch_size)
    run.record.update(train_examples=len(examples), heldout_examples=len(heldout))


def model_key(run: Run) -> str:
    """What the pruning cache keys the loaded model by."""
    key = f"{run.weights}|{run.model_digest}"  # content, not the folder: a moved or shared cache still hits
    if run.weights == "random":
        key += f"|seed={run.cfg.seed}"  # random weights depend on the seed
    return key


def calibration(run: Run):
    """The calibration loader of the run's pruning settings (None without calibration); it loads on its first
    call (a pruning cache hit never does) and then returns the same batches to every round of a schedule."""
    from lorsbench.pruning.calibration import calibration_source

    calib = run.cfg.pruning.calibration
    if calib is None:
        return None
    if run.calibration_loader is None:
        run.calibration_loader = functools.cache(calibration_source(run.tokenizer, calib))
    return run.calibration_loader


def prune_with(run: Run, pruning: PruningConfig, key: str):
    """Prune `run.model` per `pruning` through the artifact cache; returns (PruneOutcome, PhaseStats)."""
    from lorsbench.pruning.artifacts import prune_model

    with run.measured("prune") as meter:
        outcome = prune_model(run.model, pruning, calibration(run), run.cfg.paths.cache_dir, key)
    run.masks = outcome.masks
    return outcome, meter.stats


def prune(run: Run) -> None:
    if run.scheduled:  # a method-owned prune schedule: every round prunes, attaches and trains there
        from lorsbench.schedule import run_rounds

        run_rounds(run, model_key(run), prune_with, method_context, run.output_dir / TRAIN_LOG)
        return
    with run.dist.rank0_first():  # the artifact cache writes the masks once; the other ranks load them
        outcome, stats = prune_with(run, run.cfg.pruning, model_key(run))
    run.dist.check_same("masks", outcome.masks.digest())
    run.record.update(stats.as_dict(), prune_cache_hit=outcome.cache_hit, prune_wall_s=outcome.prune_wall_s,
                      prune_wall_s_saved=outcome.cached_prune_wall_s if outcome.cache_hit else 0.0,
                      mask_digest=outcome.masks.digest(),
                      prune_artifact=str(outcome.artifact_dir) if outcome.artifact_dir else None)
    run.sparsity("after_prune", run.model)


def method_context(run: Run) -> MethodContext:
    cfg = run.cfg
    return MethodContext(
        targets=cfg.pruning.targets, device=run.device, dtype=run.dtype, generator=run.generator,
        train_batches=run.train_batches, loss_fn=causal_lm_loss, calibration=calibration(run),
    )


def attach(run: Run) -> None:
    if run.scheduled:
        return  # attached in every round of the schedule (prune)
    run.params = run.method.attach(run.model, run.masks, method_context(run))
    run.record.update(trainable_params=sum(p.numel() for p in run.params))
    run.model, run.params = run.dist.shard(run.model, run.params)


def fine_tune(run: Run) -> None:
    if run.scheduled:
        return  # trained in every round of the schedule (prune)
    cfg = run.cfg
    with run.measured("train") as meter:
        result = train(run.model, run.params, run.train_batches(), cfg.trainer, cfg.profile, run.device,
                       log_path=run.output_dir / TRAIN_LOG if run.dist.is_main else None,
                       after_step=run.record.heartbeat(HEARTBEAT_S), ranks=run.dist)
    peaks = distributed.train_peaks(run.dist, meter.stats)  # every rank's (a collective under FSDP)
    run.record.update(meter.stats.as_dict(), **result.as_dict(), **peaks.as_dict())


def gather(run: Run) -> None:
    """The trained model whole, on rank 0 (the other ranks are done after this phase)."""
    run.model = run.dist.full_model(run.model)
    if run.dist.is_main and not run.scheduled:
        run.sparsity("after_train", run.model)


def merge(run: Run) -> None:
    run.model = run.method.merge(run.model)
    run.sparsity("after_merge", run.model)
    if run.cfg.save_merged:
        from lorsbench.export import load_merged, save_merged

        folder = run.output_dir / MERGED_DIR
        save_merged(run.model, run.tokenizer, run.masks, folder, run.cfg.pruning.pattern)
        load_merged(folder, verify=True)  # raises ExportError if the reload is not as sparse as saved
        run.record.update(merged_dir=MERGED_DIR, merged_reload_verified=True)


def validate(run: Run) -> None:
    """Held-out instruction loss of the merged model: the lr sweep's signal (lorsbench.lr_choice)."""
    from lorsbench.evaluation.heldout import heldout_loss

    if run.heldout_data is not None:
        run.record.update(val_loss=heldout_loss(run.model, run.heldout_data, run.cfg.trainer.micro_batch_size,
                                                run.device))


def evaluate(run: Run) -> None:
    from lorsbench.evaluation import evaluate_tasks, perplexity

    cfg = run.cfg
    if run.weights == "random":
        run.record.update(accuracy_reported=False)
        log.info("random weights: accuracy and perplexity are not reported")
        return
    with run.measured("eval") as meter:
        if cfg.eval.perplexity:
            ppl = perplexity(run.model, run.tokenizer, cfg.eval.perplexity, run.device)
            write_json_atomic(run.output_dir / PPL_WINDOWS, ppl.windows_json())
            run.record.update(perplexity=ppl.perplexity, perplexity_tokens=ppl.tokens, perplexity_window=ppl.window,
                              perplexity_stride=ppl.stride, perplexity_source=ppl.source,
                              perplexity_text_sha256=ppl.text_sha256, perplexity_windows_file=PPL_WINDOWS)
            run.record.save()
        scores = evaluate_tasks(run.model, run.tokenizer, run.prepared_eval, cfg.eval, run.device, run.output_dir)
    run.record.update(meter.stats.as_dict(), accuracy_reported=bool(scores.tasks), tasks=scores.tasks,
                      mean_acc=scores.mean_acc, lm_eval_json=scores.raw_json, samples_file=scores.samples_file,
                      eval_data_source=run.prepared_eval.data_source if scores.tasks else None)


PHASES = (setup, prepare_evaluation, load, prepare_data, prune, attach, fine_tune, gather, merge, validate, evaluate)
RANK0_PHASES = (merge, validate, evaluate)  # on the gathered model: the other ranks of a sharded run skip them


def run_pipeline(cfg: RunConfig, output_dir: Path) -> RunRecord:
    """Run every phase; always leave a complete run.json (status success | failed | oom | interrupted).

    On SIGINT/SIGTERM the record says `interrupted` (with the phase) and `Interrupted` is raised after it is saved."""
    run = Run(cfg, output_dir)
    t0 = time.perf_counter()
    interrupted: Interrupted | None = None
    with _signals(_raise_interrupted):
        try:
            run.record.save()
            for phase in PHASES:
                if phase in RANK0_PHASES and not run.dist.is_main:
                    continue
                run.phase = phase.__name__
                log.info("phase: %s", run.phase)
                phase(run)
                run.record.save()  # status stays "running" until the end; what each phase measured is on disk
            run.record["status"] = "success"
        except KeyboardInterrupt as exc:
            interrupted = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            name = signal.Signals(interrupted.signum).name
            run.record.update(status="interrupted", error=f"interrupted by {name} in phase {run.phase}",
                              error_type=name, phase_failed=run.phase)
            log.error("run interrupted by %s in phase %s", name, run.phase)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record; the caller decides the exit code
            run.record.update(status=failure_status(exc), error=f"{type(exc).__name__}: {exc}",
                              error_type=type(exc).__name__, phase_failed=run.phase)
            write_text_atomic(run.output_dir / distributed.rank_file(ERROR_LOG), traceback.format_exc())
            log.error("run failed in phase %s: %s: %s", run.phase, type(exc).__name__, exc)
        finally:
            with _signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the final record short
                run.record.update(finished_at=now_utc(), wall_s=time.perf_counter() - t0)
                distributed.blame_failed_rank(run.record)
                run.record.save()
    if interrupted is not None:
        raise interrupted
    return run.record
