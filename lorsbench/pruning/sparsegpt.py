"""SparseGPT (Frantar & Alistarh 2023; docs/methods.md §SparseGPT): OBS pruning with the damped inverse Hessian of the
layer's inputs, column by column in blocks, with the remaining weights updated to compensate.

All arithmetic in fp32 (TF32 off, as the reference); the result is written back in the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorsbench.config import ConfigError, PatternConfig
from lorsbench.modules import target_linears
from lorsbench.pruning.base import Batch, Pruner
from lorsbench.pruning.calibration import prune_layerwise
from lorsbench.pruning.masks import MaskSet, check_nm_divides, mask_from_scores


class InputHessian:
    """H = (2/n) * sum over sequences of X_s^T X_s (d_in x d_in, fp32), n = number of sequences."""

    def __init__(self, d_in: int, device: torch.device):
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        self.nsamples += x.shape[0] if x.dim() > 2 else 1
        x2d = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x2d.t(), x2d)

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.nsamples, 1))


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = 128  # columns per lazy-update block, also the unstructured mask-selection block
    percdamp: float = 0.01  # dampening = percdamp * mean(diag(H))

    def __post_init__(self):
        if not (isinstance(self.blocksize, int) and self.blocksize > 0):
            raise ConfigError(f"pruning.blocksize must be a positive integer, got {self.blocksize!r}")
        if not (isinstance(self.percdamp, (int, float)) and self.percdamp > 0):
            raise ConfigError(f"pruning.percdamp must be > 0, got {self.percdamp!r}")


def _no_tf32():
    """Context: TF32 matmuls off on CUDA (the reference disables them; CPU is unaffected)."""
    class _Guard:
        def __enter__(self):
            self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved

    return _Guard()


def upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (H_jj = 0) get H_jj = 1; H += percdamp * mean(diag H) * I; returns (upper Cholesky factor of
    H^-1, bool vector of dead inputs). As docs/methods.md §SparseGPT."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise RuntimeError(
            "SparseGPT: the damped Hessian is not positive definite; raise pruning.percdamp (now "
            f"{percdamp}) or use more calibration samples"
        )
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: PatternConfig,
    blocksize: int = 128, percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight matrix (d_out x d_in) given its input Hessian; returns (new weight in the input dtype,
    keep-mask).

    Unstructured: per block of `blocksize` columns, on the weights as updated by earlier blocks, exactly
    floor(sparsity * d_out * block_width) entries with the lowest w^2 / Hinv_jj^2 are pruned (the whole block
    is one comparison group; the reference drops one more per block because it prunes `score <= threshold` at
    sorted index floor(s*numel) - we drop exactly floor(s*numel), stable ties). N:M: at each column that starts a
    group, the (m - n) lowest-scored of the group's m columns, on the weights updated so far.
    """
    d_out, d_in = weight.shape
    check_nm_divides("weight", d_in, pattern)
    if pattern.is_nm and blocksize % pattern.m:
        raise ConfigError(f"pruning.blocksize={blocksize} must be a multiple of m={pattern.m} for pattern {pattern.name}")
    if not pattern.is_nm and sparsity == 0:
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool)
    with _no_tf32():
        W = weight.detach().float().clone()
        Hinv, dead = upper_cholesky_of_inverse(hessian.to(W.device), percdamp)
        W[:, dead] = 0
        pruned = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            hdiag = torch.diag(Hinv1)
            if pattern.is_nm:
                prune1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                scores = W1.pow(2) / hdiag.reshape(1, -1).pow(2)
                prune1 = ~mask_from_scores(scores, sparsity, pattern, "matrix")
            for i in range(count):
                if pattern.is_nm and i % pattern.m == 0:
                    group = W1[:, i : i + pattern.m].pow(2) / hdiag[i : i + pattern.m].reshape(1, -1).pow(2)
                    prune1[:, i : i + pattern.m] = ~mask_from_scores(group, sparsity, pattern, "matrix")
                w = W1[:, i]
                q = w.masked_fill(prune1[:, i], 0.0)
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q  # exact zeros where pruned (the update leaves q up to rounding)
                Err1[:, i] = err
            W[:, i1:i2] = W1
            pruned[:, i1:i2] = prune1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype), ~pruned


class SparseGPTPruner(Pruner):
    name = "sparsegpt"
    needs_calibration = True
    updates_weights = True
    Options = SparseGPTOptions

    def __init__(self, config):
        super().__init__(config)
        if config.pattern.is_nm and self.options.blocksize % config.pattern.m:
            raise ConfigError(
                f"pruning.blocksize={self.options.blocksize} must be a multiple of m={config.pattern.m} "
                f"for pattern {config.pattern.name}"
            )

    def prune(self, model: nn.Module, calibration: list[Batch] | None, device=None) -> MaskSet:
        config, options = self.config, self.options
        for name, linear in target_linears(model, config.targets).items():
            check_nm_divides(name, linear.weight.shape[1], config.pattern)

        def new_stats(linear: nn.Module) -> InputHessian:
            return InputHessian(linear.weight.shape[1], linear.weight.device)

        def prune_linear(name: str, linear: nn.Module, stats: InputHessian) -> torch.Tensor:
            new_weight, mask = sparsegpt_prune(
                linear.weight, stats.hessian, config.sparsity_of(name), config.pattern, options.blocksize, options.percdamp
            )
            linear.weight.copy_(new_weight)
            return mask

        return MaskSet(prune_layerwise(model, calibration or [], config.targets, new_stats, prune_linear, device))
