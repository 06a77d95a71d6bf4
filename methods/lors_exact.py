"""`lors_exact`: LoRS forward and memory with the exact masked adapter gradient (docs/methods.md §LoRS exact gradient).

Same operator as `lors` (one GEMM with `W_eff = (W + s U V) ⊙ M`, only X saved, W_eff recomputed), but the
backward forms `G = dYᵀX` once and returns `dU = s (G ⊙ M) Vᵀ`, `dV = s Uᵀ (G ⊙ M)`: the gradient autograd
would give for the masked forward. Costs one extra 2·T·d_in·d_out GEMM per layer (docs/methods.md §Costs).
"""
from __future__ import annotations

from lorsbench.methods._lors import LoRSBase, LoRSConfig
from lorsbench.registry import register_method


@register_method("lors_exact")
class LoRSExact(LoRSBase):
    exact = True
    report_order = 50

    Config = LoRSConfig  # as lors, without grad_scale (the exact gradient has no such choice)
