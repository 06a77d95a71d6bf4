"""The run, phase by phase: load -> prune -> attach -> train -> merge -> verify sparsity -> evaluate -> record.

Each phase is a small function; none of them names a method or a pruner. Any exception ends the run with a
record whose `status` is `failed` (or `oom`) and whose `error` says what went wrong in which phase.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from lorsbench.config import PatternConfig, RunConfig
from lorsbench.method import Method, MethodContext, build_method
from lorsbench.profiling import PhaseMeter
from lorsbench.pruning.masks import measure_sparsity
from lorsbench.records import RunRecord, write_json_atomic
from lorsbench.runtime import provenance, resolve_device, seed_everything, torch_dtype
from lorsbench.training import causal_lm_loss, train

log = logging.getLogger("lorsbench")
TRAIN_LOG = "train_log.jsonl"
ERROR_LOG = "error.log"
MERGED_DIR = "merged"
PPL_WINDOWS = "perplexity_windows.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _factors(cfg: RunConfig) -> dict:
    return {
        "run_name": cfg.run_name, "smoke": cfg.smoke, "model": cfg.model.name, "model_source": cfg.model.source,
        "pruner": cfg.pruning.name, "pattern": cfg.pruning.pattern.name, "target_sparsity": cfg.pruning.sparsity,
        "method": cfg.method.name, "seed": cfg.seed, "dtype": cfg.dtype, "data": cfg.data.name,
        "seq_len": cfg.trainer.seq_len, "micro_batch_size": cfg.trainer.micro_batch_size,
        "grad_accum": cfg.trainer.grad_accum, "lr": cfg.trainer.lr, "lr_source": cfg.lr_source,
        "max_steps": cfg.trainer.max_steps,
        "eval_suite": cfg.eval.suite, "eval_limit": cfg.eval.limit, "resolved_config": cfg.resolved,
    }


class Run:
    """State shared by the phases of one run (model, tokenizer, masks, ...) and its record."""

    def __init__(self, cfg: RunConfig, output_dir: Path):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.record = RunRecord(self.output_dir, started_at=_now(), output_dir=str(self.output_dir), **_factors(cfg))
        self.phase = "setup"

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
    cfg = run.cfg
    run.device = resolve_device(cfg.device)
    run.dtype = torch_dtype(cfg.dtype, run.device)
    run.generator = seed_everything(cfg.seed)
    run.method = build_method(cfg.method)
    run.record.update(provenance(run.device))
    run.record.update(method_config=run.method.describe(), preserves_sparsity=run.method.preserves_sparsity,
                      device=str(run.device), dtype=str(run.dtype).removeprefix("torch."))
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
    run.weights = loaded.weights
    run.record.update(meter.stats.as_dict(), weights=loaded.weights, model_path=loaded.source,
                      total_params=sum(p.numel() for p in run.model.parameters()))


def prepare_data(run: Run) -> None:
    from lorsbench.data.instructions import batch_iterator, load_examples, split_heldout, tokenize_examples

    cfg = run.cfg
    examples = load_examples(cfg.data, cfg.paths.cache_dir, cfg.seed)
    examples, heldout = split_heldout(examples, cfg.data.heldout_examples)
    run.train_data = tokenize_examples(examples, run.tokenizer, cfg.trainer.seq_len, cfg.data.loss_on)
    run.heldout_data = (tokenize_examples(heldout, run.tokenizer, cfg.trainer.seq_len, cfg.data.loss_on)
                        if heldout else None)
    run.train_batches = lambda: batch_iterator(run.train_data, cfg.trainer.micro_batch_size, cfg.seed)
    run.record.update(train_examples=len(examples), heldout_examples=len(heldout))


def prune(run: Run) -> None:
    from lorsbench.pruning.artifacts import prune_model
    from lorsbench.pruning.calibration import calibration_source

    cfg = run.cfg
    calib = cfg.pruning.calibration
    calibration = calibration_source(run.tokenizer, calib) if calib is not None else None
    model_key = f"{cfg.model.name}|{run.record.get('model_path')}|{run.weights}"
    if run.weights == "random":
        model_key += f"|seed={cfg.seed}"  # random weights depend on the seed
    with run.measured("prune") as meter:
        outcome = prune_model(run.model, cfg.pruning, calibration, cfg.paths.cache_dir, model_key)
    run.masks = outcome.masks
    run.record.update(meter.stats.as_dict(), prune_cache_hit=outcome.cache_hit, prune_wall_s=outcome.prune_wall_s,
                      prune_wall_s_saved=outcome.cached_prune_wall_s if outcome.cache_hit else 0.0,
                      mask_digest=outcome.masks.digest(),
                      prune_artifact=str(outcome.artifact_dir) if outcome.artifact_dir else None)
    run.sparsity("after_prune", run.model)


def attach(run: Run) -> None:
    cfg = run.cfg
    ctx = MethodContext(
        targets=cfg.pruning.targets, device=run.device, dtype=run.dtype, generator=run.generator,
        train_batches=run.train_batches, loss_fn=causal_lm_loss,
    )
    run.params = run.method.attach(run.model, run.masks, ctx)
    run.record.update(trainable_params=sum(p.numel() for p in run.params))


def fine_tune(run: Run) -> None:
    cfg = run.cfg
    with run.measured("train") as meter:
        result = train(run.model, run.params, run.train_batches(), cfg.trainer, cfg.profile, run.device,
                       log_path=run.output_dir / TRAIN_LOG)
    run.record.update(meter.stats.as_dict(), **result.as_dict())
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


PHASES = (setup, prepare_evaluation, load, prepare_data, prune, attach, fine_tune, merge, validate, evaluate)


def run_pipeline(cfg: RunConfig, output_dir: Path) -> RunRecord:
    """Run every phase; always leave a complete run.json (status success | failed | oom)."""
    run = Run(cfg, output_dir)
    t0 = time.perf_counter()
    run.record.save()
    try:
        for phase in PHASES:
            run.phase = phase.__name__
            log.info("phase: %s", run.phase)
            phase(run)
            run.record.save()  # status stays "running" until the end; what each phase measured is on disk
        run.record["status"] = "success"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record; the caller decides the exit code
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        run.record.update(status="oom" if oom else "failed", error=f"{type(exc).__name__}: {exc}",
                          error_type=type(exc).__name__, phase_failed=run.phase)
        (run.output_dir / ERROR_LOG).write_text(traceback.format_exc())
        log.error("run failed in phase %s: %s: %s", run.phase, type(exc).__name__, exc)
    finally:
        run.record.update(finished_at=_now(), wall_s=time.perf_counter() - t0)
        run.record.save()
    return run.record
