"""`lors_exact`: LoRS forward and memory with the exact masked adapter gradient (docs/methods.md §LoRS exact gradient).

Same operator as `lors` (one GEMM with `W_eff = (W + s U V) ⊙ M`, only X saved, W_eff recomputed), but the
backward forms `G = dYᵀX` once and returns `dU = s (G ⊙ M) Vᵀ`, `dV = s Uᵀ (G ⊙ M)`: the gradient autograd
would give for the masked forward. Costs one extra 2·T·d_in·d_out GEMM per layer (docs/methods.md §Costs).
"""
from __future__ import annotations

from dataclasses import dataclass

from lorsbench.method import register_method
from lorsbench.methods._lors import LoRSBase, check_common
from lorsbench.methods._lors_triton import check_kernel


@register_method("lors_exact")
class LoRSExact(LoRSBase):
    exact = True

    @dataclass(frozen=True)
    class Config:
        rank: int = 16
        alpha: float = 16.0
        scaling: str = "alpha_over_sqrt_r"  # s = alpha / sqrt(r), as lors
        init: str = "grad_svd"  # grad_svd | lora
        init_samples: int = 16
        init_gamma: float = 1.0
        kernel: str = "auto"  # auto | torch | triton | fused: how W_eff is applied (methods/_lors_triton.py)
        mask_source: str = "weight"  # weight (M = W != 0, no buffer) | stored (the bool mask on the device)
                                     # (docs/methods.md §LoRS mask source)
        targets: tuple[str, ...] | None = None

        def __post_init__(self):
            check_common(self.rank, self.alpha, self.scaling, self.init, self.init_samples, self.init_gamma,
                         self.kernel, self.mask_source)
            check_kernel(self.kernel)
