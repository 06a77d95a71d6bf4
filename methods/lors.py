"""`lors`: LoRS, repo-faithful (Hu et al. 2025, arXiv 2501.08582; docs/methods.md §LoRS).

Forward `Y = X ((W + s U V) ⊙ M)ᵀ (+ b)` in one GEMM through a custom autograd function that saves only X and
recomputes W_eff in backward (§LoRS forward). The adapter gradient is the authors' rearranged one,
`dU = g dYᵀ(X Vᵀ)`, `dV = g (dY U)ᵀ X` (§LoRS backward): no d_out×d_in gradient is formed; it equals (1/s) × the
gradient of *unmasked* LoRA when `grad_scale=one` (the repo), or that gradient itself with `grad_scale=s`.
`s = α/√r` (rsLoRA-style, r = α = 16 in the authors' scripts). Initialisation `grad_svd` (§LoRS gradient-SVD init):
V = top-r right singular vectors of the mean full-weight gradient on the first `init_samples` training examples,
U = 0. Merge `W' = (W + s U V) ⊙ M` keeps every pruned weight exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorsbench.method import register_method
from lorsbench.methods._lors import GRAD_SCALES, LoRSBase, check_common
from lorsbench.methods._lors_triton import check_kernel


@register_method("lors")
class LoRS(LoRSBase):
    exact = False

    @dataclass(frozen=True)
    class Config:
        rank: int = 16
        alpha: float = 16.0
        scaling: str = "alpha_over_sqrt_r"  # s = alpha / sqrt(r) = 4 at the defaults (authors' scripts)
        grad_scale: str = "one"  # one (authors' code drops s from the adapter gradient) | s
        init: str = "grad_svd"  # grad_svd | lora (V kaiming-uniform, U = 0)
        init_samples: int = 16  # training examples for the gradient estimate (paper: 128)
        init_gamma: float = 1.0  # V = Q_rᵀ / gamma (authors' stable_gamma)
        kernel: str = "auto"  # auto | torch | triton | fused: how W_eff is applied (methods/_lors_triton.py)
        mask_source: str = "weight"  # weight (M = W != 0, no buffer) | stored (the bool mask on the device)
                                     # (docs/methods.md §LoRS mask source)
        targets: tuple[str, ...] | None = None  # None: the run's targets

        def __post_init__(self):
            check_common(self.rank, self.alpha, self.scaling, self.init, self.init_samples, self.init_gamma,
                         self.kernel, self.mask_source)
            check_kernel(self.kernel)
            if self.grad_scale not in GRAD_SCALES:
                raise ValueError(f"grad_scale must be one of {', '.join(GRAD_SCALES)}, got {self.grad_scale!r}")

    def _grad_scale(self, scaling: float) -> float:
        return scaling if self.config.grad_scale == "s" else 1.0
