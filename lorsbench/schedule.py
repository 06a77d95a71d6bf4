"""Prune schedules: a method may prune in rounds while it fine-tunes (docs/methods.md §LoSA schedule).

A method's `schedule(cfg)` returns its rounds; the default is one round at the run's sparsity with the whole
training budget, which is the ordinary prune -> attach -> train of the pipeline (records unchanged). With more
than one round, `run_rounds` drives them, through the pipeline's own pieces:

    for each round t: merge the adapter of round t-1 into the weights (t > 1) -> method.plan_round (may set
    per-layer rates) -> prune through the one pruning package (an artifact keyed with the round's sparsity,
    per-layer rates and the merged weights' digest) -> attach -> train `train_steps` optimizer steps with the
    one training loop (each round continues the same data iterator: the next slice of the data)

and verifies the sparsity against the round's stored mask after its prune, its training and its merge. The last
round leaves the adapter attached; the pipeline's merge phase merges it and verifies against the final mask.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lorsbench.config import ConfigError, PatternConfig, PruningConfig, RunConfig

if TYPE_CHECKING:
    from lorsbench.method import MethodContext
    from lorsbench.profiling import PhaseStats
    from lorsbench.pruning.artifacts import PruneOutcome

log = logging.getLogger("lorsbench")
UNSTRUCTURED = PatternConfig(name="unstructured")


@dataclass(frozen=True)
class Round:
    """One (prune, fine-tune) round: the target sparsity, the optimizer steps it trains, the pattern it prunes to
    (None: the run's) and optional per-target-linear rates (empty: every target at `target_sparsity`)."""

    target_sparsity: float
    train_steps: int
    pattern: PatternConfig | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)


def default_schedule(cfg: RunConfig) -> list[Round]:
    """One round at the run's sparsity and pattern with the whole budget: the pipeline's ordinary path."""
    return [Round(cfg.pruning.sparsity, cfg.trainer.max_steps)]


def split_steps(total: int, weights: Sequence[float]) -> list[int]:
    """`total` steps split in proportion to `weights` (largest remainder, earlier rounds first on ties); the parts
    sum to `total` exactly."""
    if not weights or any(not (isinstance(w, (int, float)) and w >= 0) for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"step weights must be non-negative numbers with a positive sum, got {list(weights)}")
    ideal = [total * w / sum(weights) for w in weights]
    steps = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - steps[i]), i))
    for i in by_remainder[: total - sum(steps)]:
        steps[i] += 1
    return steps


def check_rounds(rounds: Sequence[Round], max_steps: int) -> None:
    """One clear error for a schedule that cannot run: no rounds, bad sparsities, or steps not summing to
    `trainer.max_steps` (every method in a comparison trains the same total budget)."""
    if not rounds:
        raise ConfigError("a prune schedule needs at least one round")
    for i, rnd in enumerate(rounds, 1):
        if not 0.0 <= rnd.target_sparsity < 1.0:
            raise ConfigError(f"round {i}: target_sparsity must be in [0, 1), got {rnd.target_sparsity}")
        if rnd.train_steps < 0:
            raise ConfigError(f"round {i}: train_steps must be >= 0, got {rnd.train_steps}")
    total = sum(r.train_steps for r in rounds)
    if total != max_steps:
        raise ConfigError(f"the rounds train {total} steps in all, trainer.max_steps={max_steps}: "
                          "a schedule must split the run's budget, not change it")


def round_pruning(pruning: PruningConfig, rnd: Round) -> PruningConfig:
    """The run's pruning settings at this round's sparsity, pattern and per-layer rates."""
    return replace(pruning, sparsity=rnd.target_sparsity, pattern=rnd.pattern or pruning.pattern,
                   layer_sparsity=dict(rnd.layer_sparsity))


def merged_model_key(model_key: str, model, targets: tuple[str, ...]) -> str:
    """The pruning cache's model key for a round after the first: the base model's key plus the sha256 of the
    merged target weights it prunes (the other weights never change)."""
    from lorsbench.modules import target_linears
    from lorsbench.pruning.artifacts import weights_checksum

    weights = {name: linear.weight for name, linear in target_linears(model, targets).items()}
    return f"{model_key}|merged_sha256={weights_checksum(weights)}"


def combined_stats(stats: Sequence[PhaseStats]) -> dict[str, float]:
    """One phase's record fields over several rounds: wall times summed, peaks the maximum."""
    out: dict[str, float] = {}
    for item in stats:
        for key, value in item.as_dict().items():
            out[key] = out.get(key, 0.0) + value if key.endswith("_wall_s") else max(out.get(key, value), value)
    return out


def run_rounds(
    run: Any,
    model_key: str,
    prune_with: Callable[[Any, PruningConfig, str], tuple[PruneOutcome, PhaseStats]],
    method_context: Callable[[Any], MethodContext],
    log_path: Path,
) -> None:
    """Run every round of `run.rounds` (see the module docstring), recording `rounds` (one entry per round) and
    the run's usual fields: totals over the rounds (train_steps, wall times, peaks), the final round's mask,
    sparsity after its prune and training, loss and step times."""
    from lorsbench.pruning.masks import measure_sparsity
    from lorsbench.training import train

    cfg = run.cfg
    rounds: list[Round] = run.rounds
    batches = run.train_batches()  # one iterator for all rounds: round t trains on the slice after round t-1's
    rows: list[dict[str, Any]] = []
    patterns: list[PatternConfig] = []  # what each round's sparsity checks hold its weights to
    run.record["rounds"] = rows
    prune_stats, train_stats = [], []
    log_path.unlink(missing_ok=True)
    schedule_start = time.perf_counter()

    def verify(row: dict[str, Any], stage: str, pattern: PatternConfig) -> None:
        report = measure_sparsity(run.model, cfg.pruning.targets, run.masks, pattern)
        row.update(report.as_dict(stage))
        # a sparsity-preserving method that loses its mask mid-schedule would prune on from a wrong premise
        if run.method.preserves_sparsity and (report.mask_preserved is False or report.nm_valid is False):
            raise RuntimeError(f"round {row['round']}: sparsity check failed {stage} "
                               f"(mask preserved: {report.mask_preserved}, N:M valid: {report.nm_valid})")

    for index, planned in enumerate(rounds):
        last = index == len(rounds) - 1
        row: dict[str, Any] = {"round": index + 1}
        run.record["schedule_round"] = index + 1  # stays in the record of a run that fails
        key = model_key
        if index:
            run.phase = "merge"
            run.model = run.method.merge(run.model)
            verify(rows[-1], "after_merge", patterns[-1])
            key = merged_model_key(model_key, run.model, cfg.pruning.targets)
        rows.append(row)

        run.phase = "prune"
        ctx = method_context(run)
        start = time.perf_counter()
        rnd = run.method.plan_round(run.model, index, planned, ctx)
        row["plan_wall_s"] = time.perf_counter() - start
        pruning = round_pruning(cfg.pruning, rnd)
        pattern = pruning.pattern if rnd.target_sparsity > 0 else UNSTRUCTURED  # dense makes no N:M claim
        patterns.append(pattern)
        outcome, stats = prune_with(run, pruning, key)
        prune_stats.append(stats)
        row.update(target_sparsity=rnd.target_sparsity, pattern=pruning.pattern.name, train_steps=rnd.train_steps,
                   prune_cache_hit=outcome.cache_hit, prune_wall_s=outcome.prune_wall_s,
                   prune_wall_s_saved=outcome.cached_prune_wall_s if outcome.cache_hit else 0.0,
                   mask_digest=outcome.masks.digest(), mask_sparsity=outcome.masks.sparsity(),
                   prune_artifact=str(outcome.artifact_dir) if outcome.artifact_dir else None)
        verify(row, "after_prune", pattern)
        if last:
            run.sparsity("after_prune", run.model)

        run.phase = "attach"
        start = time.perf_counter()
        run.params = run.method.attach(run.model, run.masks, ctx)
        row["attach_wall_s"] = time.perf_counter() - start
        row.update(trainable_params=sum(p.numel() for p in run.params), **run.method.round_details())

        run.phase = "fine_tune"
        round_log = log_path.with_name(f".round{index + 1}-{log_path.name}")
        with run.measured("train") as meter:
            result = train(run.model, run.params, batches, replace(cfg.trainer, max_steps=rnd.train_steps),
                           cfg.profile, run.device, log_path=round_log)
        train_stats.append(meter.stats)
        _append_round_log(round_log, log_path, index + 1)
        row.update(result.as_dict(), train_wall_s=meter.stats.wall_s)
        verify(row, "after_train", pattern)
        log.info("round %d/%d: sparsity %.4f, %d steps, loss %s", index + 1, len(rounds),
                 row["sparsity_after_prune"], rnd.train_steps, result.final_loss)
        run.record.save()

    run.record.pop("schedule_round", None)
    final = rows[-1]
    run.record.update(combined_stats(prune_stats))
    run.record.update(combined_stats(train_stats))
    run.record.update(
        prune_cache_hit=all(r["prune_cache_hit"] for r in rows),
        prune_wall_s=sum(r["prune_wall_s"] for r in rows),
        prune_wall_s_saved=sum(r["prune_wall_s_saved"] for r in rows),
        mask_digest=final["mask_digest"], prune_artifact=final["prune_artifact"],
        trainable_params=final["trainable_params"],
        train_steps=sum(r["train_steps"] for r in rows), final_loss=final["final_loss"],
        # step times, measured steps and throughput of the final round (at the target sparsity)
        step_ms_median=final["step_ms_median"], step_ms_p90=final["step_ms_p90"],
        measured_steps=final["measured_steps"], tokens_per_step=final["tokens_per_step"],
        tokens_per_s=final["tokens_per_s"], step_times_round=len(rows),
        schedule_wall_s=time.perf_counter() - schedule_start,  # every round: merges, allocators, prunes, training
    )
    run.sparsity("after_train", run.model)


def _append_round_log(round_log: Path, log_path: Path, round_number: int) -> None:
    """Append one round's step log to the run's, each line tagged with its round (steps restart per round)."""
    if not round_log.exists():
        return
    with open(log_path, "a") as out:
        for line in round_log.read_text().splitlines():
            out.write(json.dumps({"round": round_number, **json.loads(line)}) + "\n")
    round_log.unlink()
