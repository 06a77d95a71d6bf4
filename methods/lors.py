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

from lorsbench.methods._lors import GRAD_SCALES, LoRSBase, LoRSConfig
from lorsbench.registry import register_method


@register_method("lors")
class LoRS(LoRSBase):
    exact = False
    report_order = 40

    @dataclass(frozen=True)
    class Config(LoRSConfig):
        grad_scale: str = "one"  # one (authors' code drops s from the adapter gradient) | s

        def __post_init__(self):
            super().__post_init__()
            if self.grad_scale not in GRAD_SCALES:
                raise ValueError(f"grad_scale must be one of {', '.join(GRAD_SCALES)}, got {self.grad_scale!r}")

    def _grad_scale(self, scaling: float) -> float:
        return scaling if self.config.grad_scale == "s" else 1.0
