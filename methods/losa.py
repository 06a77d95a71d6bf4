"""`losa`: dynamic low-rank sparse adaptation (Huang et al., ICLR 2025, arXiv 2502.14816).

LoSA (paper Sec. 3) starts from the dense model and reaches the target sparsity `s` in T rounds; round t merges the
adapter of round t-1 into the weights, prunes to `s_t = s (1 - (1 - t/T)^3)` with the run's pruner, attaches a
fresh adapter and trains its share of the budget (`lorsbench.schedule` drives the rounds; `step_weights` split
`trainer.max_steps`, by default 1:1:1:1:6 as the public code's 1k, 1k, 1k, 1k, 6k examples).

- Adapter: the sparsified LoRA output, SQFT's masked delta (`methods/sqft.py`, reused):
  `Y = X Wᵀ + b + D(X) ((s U V) ⊙ M)ᵀ`, so the merge `W + (s U V) ⊙ M` keeps the round's mask. `s` = `scale`.
- Layer-wise sparsity: redundancy ρ_l = Σ_{j≠l} CKA(F_l, F_j), linear CKA of the decoder layers'
  output features on the calibration data of the dense model (the public code's stand-in for the paper's
  representation mutual information). Rates `s_t + δ z_l` (z = ρ standardised: redundant layers are pruned
  more), projected onto {|r_l - s_t| <= δ, mean r = s_t} by an exact clip-and-shift. N:M patterns fix every
  layer's rate, so the allocator is inactive there (recorded per round as `layer_sparsity_active: false`).
- Rank allocation: after round t's prune, ranks ∝ each layer's reconstruction error against the dense
  features, integers in [rank_min, rank_max] whose mean is exactly `rank_start + t - 1`.

Differences from the public code: the similarities come from the dense model once (the code recomputes them on
the current sparse model every round); the rates spread by δ per standard deviation of ρ and are projected
(the code solves a linear program, whose solution puts every layer at a bound); the adapter scale is one
constant `s` for every rank. The dense layer outputs stay on the CPU for the whole run (calibration samples x
tokens x hidden x layers, in the model's dtype).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from lorsbench.methods._adapter import attach_adapters, merge_adapters
from lorsbench.methods.sqft import SQFTLinear
from torch import nn

from lorsbench.config import ConfigError, RunConfig
from lorsbench.method import Method, MethodContext, register_method
from lorsbench.modules import decoder_layers, target_linears
from lorsbench.pruning.base import Batch
from lorsbench.pruning.calibration import capture_block_inputs, run_block
from lorsbench.pruning.masks import MaskSet
from lorsbench.schedule import UNSTRUCTURED, Round, split_steps

log = logging.getLogger("lorsbench")


def cubic_schedule(sparsity: float, rounds: int) -> list[float]:
    """`s_t = s (1 - (1 - t/T)^3)` for t = 1..T (the cubic schedule); the last equals `s` exactly."""
    return [sparsity * (1.0 - (1.0 - t / rounds) ** 3) for t in range(1, rounds + 1)]


def solve_clipped(slope: np.ndarray, offset: np.ndarray, low: float, high: float, total: float) -> np.ndarray:
    """The values `clip(slope_i c + offset_i, low, high)` (slope_i >= 0) whose sum is `total`, for the one c
    that gives it: g(c) = Σ clip(...) is piecewise linear and non-decreasing, so c is found exactly on the
    segment between two breakpoints. Raises ValueError when `total` is out of reach."""
    slope, offset = np.asarray(slope, np.float64), np.asarray(offset, np.float64)

    def values(c: float) -> np.ndarray:
        return np.clip(slope * c + offset, low, high)

    moving = slope > 0
    points = np.unique(np.concatenate([(low - offset[moving]) / slope[moving], (high - offset[moving]) / slope[moving]]))
    if points.size == 0:
        found = values(0.0)
        if not math.isclose(found.sum(), total, rel_tol=0, abs_tol=1e-9):
            raise ValueError(f"no values within [{low}, {high}] sum to {total}")
        return found
    sums = np.array([values(c).sum() for c in points])
    if not sums[0] - 1e-9 <= total <= sums[-1] + 1e-9:
        raise ValueError(f"no values within [{low}, {high}] sum to {total} (reachable: {sums[0]}..{sums[-1]})")
    k = int(np.clip(np.searchsorted(sums, total, side="left"), 1, len(points) - 1)) if len(points) > 1 else 0
    if len(points) == 1 or sums[k] == sums[k - 1]:
        return values(points[k])
    c = points[k - 1] + (total - sums[k - 1]) * (points[k] - points[k - 1]) / (sums[k] - sums[k - 1])
    return values(c)


def linear_cka_matrix(grams: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of layers from their n x n Gram matrices `X Xᵀ` (Kornblith et al. 2019):
    `<H K H, H L H> / (|H K H| |H L H|)`, H the centering matrix; float64."""
    centered = []
    for gram in grams:
        gram = gram.double()
        gram = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
        centered.append(gram / torch.linalg.matrix_norm(gram))
    flat = torch.stack([g.reshape(-1) for g in centered])
    return flat @ flat.T


def layer_rates(redundancy: np.ndarray, target: float, delta: float) -> np.ndarray:
    """Per-layer sparsity: `target + delta z` (z: the redundancy standardised), projected onto
    [target - delta, target + delta] ∩ [0, 1) with mean exactly `target` (clip-and-shift, solved exactly)."""
    redundancy = np.asarray(redundancy, np.float64)
    spread = redundancy.std()
    z = (redundancy - redundancy.mean()) / spread if spread > 0 else np.zeros_like(redundancy)
    low, high = max(0.0, target - delta), min(math.nextafter(1.0, 0.0), target + delta)
    return solve_clipped(np.ones_like(z), target + delta * z, low, high, target * len(z))


def allocate_ranks(errors: np.ndarray, mean_rank: int, rank_min: int, rank_max: int) -> list[int]:
    """Integer ranks ∝ `errors` within [rank_min, rank_max] summing to `mean_rank * L` exactly: the continuous
    allocation `clip(c e_l, rank_min, rank_max)` (c solved exactly), then largest remainders."""
    errors = np.asarray(errors, np.float64)
    total = mean_rank * len(errors)
    if not np.all(np.isfinite(errors)) or errors.sum() <= 0:
        errors = np.ones_like(errors)
    ideal = solve_clipped(errors, np.zeros_like(errors), rank_min, rank_max, total)
    ranks = np.clip(np.floor(ideal + 1e-9), rank_min, rank_max).astype(int)
    fraction = ideal - ranks
    while ranks.sum() != total:  # at most L - 1 corrections
        if ranks.sum() < total:
            free = np.where(ranks < rank_max)[0]
            pick = free[np.lexsort((-errors[free], -fraction[free]))[0]]
            ranks[pick] += 1
        else:
            free = np.where(ranks > rank_min)[0]
            pick = free[np.lexsort((errors[free], fraction[free]))[0]]
            ranks[pick] -= 1
        fraction[pick] = 0.0
    return ranks.tolist()


@torch.no_grad()
def visit_layer_outputs(model: nn.Module, batches: list[Batch], device: torch.device,
                        visit: Callable[[int, torch.Tensor], None]) -> None:
    """`visit(l, F_l)` with F_l (samples x tokens x hidden) the output of decoder layer l on `batches`, every
    layer fed by the model's own earlier layers (`lorsbench.pruning.calibration`)."""
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, batches, device)
        for index, block in enumerate(decoder_layers(model)):
            run_block(block, inputs)
            visit(index, torch.cat(inputs.hidden, dim=0))
    finally:
        model.train(was_training)


def reconstruction_error(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """`Σ ((F_dense - F_sparse) / σ)² / d`, σ_j the L2 norm of dense feature j over every token (the public
    code's normalised layer-wise error)."""
    # the dense features are kept on the CPU, the pruned model's come from its device
    dense = dense.double().reshape(-1, dense.shape[-1])
    sparse = sparse.to(dense.device, torch.float64).reshape(-1, dense.shape[-1])
    norms = dense.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return float((((dense - sparse) / norms) ** 2).sum() / dense.shape[-1])


def layer_index(model: nn.Module, targets: tuple[str, ...]) -> dict[str, int]:
    """Target linear name -> index of the decoder layer holding it."""
    owner = {id(m): i for i, layer in enumerate(decoder_layers(model)) for m in layer.modules()}
    return {name: owner[id(module)] for name, module in target_linears(model, targets).items()}


@register_method("losa")
class LoSA(Method):
    preserves_sparsity = True

    @dataclass(frozen=True)
    class Config:
        rounds: int = 5  # T
        step_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 6.0)  # share of trainer.max_steps per round
        scale: float = 2.0  # s of the masked delta (the public code's alpha/r = 16/8)
        dropout: float = 0.1
        rank_start: int = 6  # mean rank of round 1; +1 per round
        rank_min: int = 1
        rank_max: int = 16
        delta: float = 0.01  # layer rates within s_t ± delta
        layer_sparsity: bool = True  # CKA layer-wise sparsity (off: every layer at s_t)
        rank_allocation: bool = True  # reconstruction-error ranks (off: every layer at the round's mean rank)
        targets: tuple[str, ...] | None = None  # None: the run's targets

        def __post_init__(self):
            if not (isinstance(self.rounds, int) and self.rounds >= 1):
                raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
            if len(self.step_weights) != self.rounds:
                raise ValueError(f"step_weights {list(self.step_weights)} must have one weight per round "
                                 f"(rounds={self.rounds})")
            split_steps(0, self.step_weights)  # non-negative with a positive sum
            if not (1 <= self.rank_min <= self.rank_start and self.rank_start + self.rounds - 1 <= self.rank_max):
                raise ValueError(f"need 1 <= rank_min <= rank_start and rank_start + rounds - 1 <= rank_max; got "
                                 f"rank_min={self.rank_min}, rank_start={self.rank_start}, rounds={self.rounds}, "
                                 f"rank_max={self.rank_max}")
            if not 0.0 <= self.delta < 1.0:
                raise ValueError(f"delta must be in [0, 1), got {self.delta}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._round = 0
        self._rates_active = False
        self._grams: list[torch.Tensor] | None = None
        self._dense: list[torch.Tensor] | None = None
        self._rates: list[float] | None = None
        self._ranks: list[int] | None = None
        self._errors: list[float] | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "schedule": "cubic s_t = s (1 - (1 - t/T)^3)", "scaling_value": self.config.scale}

    def schedule(self, cfg: RunConfig) -> list[Round]:
        c = self.config
        pattern = cfg.pruning.pattern
        self._rates_active = c.layer_sparsity and not pattern.is_nm and cfg.pruning.sparsity > 0
        if c.layer_sparsity and pattern.is_nm:
            log.warning("losa: pattern %s fixes every layer's rate at %g; the CKA layer-wise sparsity is off",
                        pattern.name, pattern.sparsity)
        if (self._rates_active or c.rank_allocation) and cfg.pruning.calibration is None:
            raise ConfigError(
                f"method=losa needs calibration data for its allocators, and pruning={cfg.pruning.name} has none: "
                "use pruning=wanda or pruning=sparsegpt, or set method.layer_sparsity=false "
                "method.rank_allocation=false")
        if self._rates_active and cfg.pruning.calibration.nsamples < 2:
            raise ConfigError(f"method=losa: CKA needs at least 2 calibration samples, "
                              f"pruning.calibration.nsamples={cfg.pruning.calibration.nsamples}")
        steps = split_steps(cfg.trainer.max_steps, c.step_weights)
        targets = cubic_schedule(cfg.pruning.sparsity, c.rounds)
        # N:M: the earlier rounds prune unstructured to s_t < s, the last one to the pattern
        early = UNSTRUCTURED if pattern.is_nm else None
        return [Round(s_t, n, None if t == c.rounds - 1 else early) for t, (s_t, n) in enumerate(zip(targets, steps))]

    def plan_round(self, model: nn.Module, index: int, rnd: Round, ctx: MethodContext) -> Round:
        c = self.config
        self._round = index
        self._rates = None
        if index == 0 and (self._rates_active or c.rank_allocation) and ctx.calibration is not None:
            self._capture_dense(model, ctx)
        if not self._rates_active or self._grams is None:
            return rnd
        cka = linear_cka_matrix(self._grams)
        redundancy = (cka.sum(1) - cka.diagonal()).numpy()
        self._rates = layer_rates(redundancy, rnd.target_sparsity, c.delta).tolist()
        layer_of = layer_index(model, c.targets or ctx.targets)
        return replace(rnd, layer_sparsity={name: self._rates[i] for name, i in layer_of.items()})

    def _capture_dense(self, model: nn.Module, ctx: MethodContext) -> None:
        """The dense layers' outputs (kept on the CPU in the model's dtype for the reconstruction errors) and
        their n x n Gram matrices (for CKA)."""
        grams, dense = [], []

        def keep(index: int, features: torch.Tensor) -> None:
            flat = features.reshape(features.shape[0], -1).double()
            grams.append((flat @ flat.T).cpu())
            dense.append(features.cpu())

        visit_layer_outputs(model, ctx.calibration(), ctx.device, keep)
        self._grams, self._dense = grams, dense if self.config.rank_allocation else None

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        targets = c.targets or ctx.targets
        mean_rank = c.rank_start + self._round
        layer_of = layer_index(model, targets)
        layers = len(decoder_layers(model))
        self._errors = None
        if c.rank_allocation and self._dense is not None and ctx.calibration is not None:
            errors = [0.0] * layers

            def compare(index: int, features: torch.Tensor) -> None:
                errors[index] = reconstruction_error(self._dense[index], features)

            visit_layer_outputs(model, ctx.calibration(), ctx.device, compare)
            self._errors = errors
            self._ranks = allocate_ranks(np.array(errors), mean_rank, c.rank_min, c.rank_max)
        else:
            self._ranks = [mean_rank] * layers

        def make(name: str, linear: nn.Linear, mask: torch.Tensor) -> SQFTLinear:
            rank = self._ranks[layer_of[name]]
            # quantize="none": the int4 group size is unused
            return SQFTLinear(linear, mask, rank, c.scale, c.dropout, "none", 1, rank, ctx.generator)

        return attach_adapters(model, masks, targets, make)

    def round_details(self) -> dict[str, Any]:
        return {"mean_rank": self.config.rank_start + self._round, "ranks": self._ranks,
                "recon_error": self._errors, "layer_sparsity_active": self._rates is not None,
                "layer_sparsity": self._rates}

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)
