"""Shared machinery of `lors` and `lors_exact` (docs/methods.md §LoRS): the LoRS linear operator, its module,
gradient-SVD initialisation and the attach/merge logic.

`lors_linear` is the one entry point for the GEMMs, so a fused GPU kernel can replace it without touching
the module or the method.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorsbench.method import Method, MethodContext
from lorsbench.methods import _lors_triton
from lorsbench.methods._adapter import (
    AdapterLinear, attach_adapters, kaiming_uniform, merge_adapters, merge_dtype, scaling_factor,
)
from lorsbench.modules import target_linears
from lorsbench.pruning.masks import MaskSet

log = logging.getLogger(__name__)

INITS = ("grad_svd", "lora")
GRAD_SCALES = ("one", "s")
# Where the training-time keep-mask comes from: the stored artifact (a bool d_out×d_in buffer on the device), or
# the frozen base itself as `W != 0` (no buffer; a kept weight that is exactly 0 stays 0, docs/methods.md §Invariants,
# item 7).
MASK_SOURCES = ("stored", "weight")


def _mask_or_nonzero(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The keep-mask M: the stored one, or `W != 0` of the frozen base when `mask` is None."""
    return weight != 0 if mask is None else mask


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, without the dispatcher round trip of a no-op `.to` (eager steps are host-bound)."""
    return t if t.dtype == dtype else t.to(dtype)


def _effective_weight(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
    """`W_eff = (W + s U V) ⊙ M` in the weight's dtype, with one d_out×d_in buffer (docs/methods.md §LoRS forward); U
    and V already in that dtype cost no cast."""
    dtype = weight.dtype
    return torch.addmm(weight, _as(U, dtype), _as(V, dtype), alpha=scaling).mul_(_mask_or_nonzero(weight, mask))


class _LoRSFunction(torch.autograd.Function):
    """Forward `X W_effᵀ (+ b)` saving only X (plus references to W, U, V, M); backward recomputes
    W_eff for dX (docs/methods.md §LoRS forward). Adapter gradients: rearranged or exact masked
    (docs/methods.md §LoRS backward)."""

    @staticmethod
    def forward(ctx, x, weight, U, V, mask, bias, scaling: float, exact: bool, grad_scale: float,
                kernel: str = "torch"):
        if kernel != "torch":  # one-pass or in-GEMM W_eff (methods/_lors_triton.py): it reads fp32 U, V itself
            out = _lors_triton.forward(kernel, x, weight, U, V, mask, scaling, bias)
            u, v = U, V
        else:
            # U, V cast once to the weight's dtype and saved: backward's W_eff rebuild reuses them (no re-cast)
            u, v = U.to(weight.dtype), V.to(weight.dtype)
            w_eff = _as(_effective_weight(weight, u, v, mask, scaling), x.dtype)
            out = F.linear(x, w_eff, None if bias is None else _as(bias, x.dtype))
            del w_eff
        ctx.save_for_backward(x, weight, u, v, mask)
        ctx.scaling, ctx.exact, ctx.grad_scale, ctx.kernel = scaling, exact, grad_scale, kernel
        ctx.has_bias = bias is not None
        ctx.factor_dtypes = U.dtype, V.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, U, V, mask = ctx.saved_tensors  # U, V: the factors, cast to W's dtype on the torch path
        need_x, _, need_u, need_v, _, need_b = ctx.needs_input_grad[:6]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dy = _as(grad_out.reshape(-1, grad_out.shape[-1]), dtype)
        dx = du = dv = db = None
        if need_x and ctx.kernel != "torch":
            dx = _lors_triton.grad_input(ctx.kernel, dy, weight, U, V, mask, ctx.scaling).reshape(x.shape)
        elif need_x:
            w_eff = _as(_effective_weight(weight, U, V, mask, ctx.scaling), dtype)
            dx = (dy @ w_eff).reshape(x.shape)
            del w_eff
        u, v = _as(U, dtype), _as(V, dtype)  # no cast where the torch path saved them in x's dtype
        if need_u or need_v:
            if ctx.exact:
                # dU = s (G⊙M) Vᵀ, dV = s Uᵀ (G⊙M): G = dYᵀX is formed once (docs/methods.md §LoRS exact gradient).
                g = (dy.t() @ x2).mul_(_mask_or_nonzero(weight, mask))
                du = ctx.scaling * (g @ v.t()) if need_u else None
                dv = ctx.scaling * (u.t() @ g) if need_v else None
                del g
            else:
                # Rearranged (repo): dU = dYᵀ(X Vᵀ), dV = (dY U)ᵀ X; no d_out×d_in tensor
                # (docs/methods.md §LoRS backward).
                du = dy.t() @ (x2 @ v.t()) if need_u else None
                dv = (dy @ u).t() @ x2 if need_v else None
                if ctx.grad_scale != 1.0:  # the repo's default g = 1 costs no extra kernel (steps are launch-bound)
                    du = None if du is None else du.mul_(ctx.grad_scale)
                    dv = None if dv is None else dv.mul_(ctx.grad_scale)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        u_dtype, v_dtype = ctx.factor_dtypes
        du = None if du is None else _as(du, u_dtype)
        dv = None if dv is None else _as(dv, v_dtype)
        return dx, None, du, dv, None, db, None, None, None, None


def lors_linear(x: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor | None,
                scaling: float, bias: torch.Tensor | None = None, exact: bool = False,
                grad_scale: float = 1.0, kernel: str = "torch") -> torch.Tensor:
    """`Y = X ((W + s U V) ⊙ M)ᵀ + b` (docs/methods.md §LoRS forward).

    `exact=False`: the repo-faithful adapter gradient `dU = g dYᵀ(XVᵀ)`, `dV = g (dY U)ᵀX` with `g = grad_scale`
    (1 in the repo; `g = s` gives exactly the gradient of unmasked LoRA). `exact=True`: the masked gradient.
    `dX = dY W_eff` is exact in both. W, M, bias get no gradient (frozen).
    `kernel`: `torch` (W_eff built by addmm + mask), `triton` (one Triton pass + cuBLAS), `fused` (W_eff inside
    the GEMM's tile loads) or `auto` (methods/_lors_triton.py). `mask=None`: M = `W != 0` (not with `fused`).
    """
    if weight.requires_grad:
        raise ValueError("lors_linear keeps the base weight frozen; it cannot produce a gradient for W")
    return _LoRSFunction.apply(x, weight, U, V, mask, bias, float(scaling), bool(exact), float(grad_scale),
                               _lors_triton.resolve_kernel(kernel, x))


class LoRSLinear(AdapterLinear):
    """A target linear trained with LoRS: frozen W, mask M (stored, or `W != 0` with mask_source=weight),
    adapter U (d_out×r, zero), V (r×d_in)."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor, rank: int, scaling: float, exact: bool,
                 grad_scale: float, V_init: torch.Tensor, kernel: str = "torch", mask_source: str = "stored"):
        super().__init__(base, mask, keep_mask=mask_source == "stored")
        _lors_triton.check_kernel(kernel)
        self.kernel = kernel
        self.scaling = float(scaling)
        self.exact = bool(exact)
        self.grad_scale = float(grad_scale)
        self._resolved: dict[tuple[torch.device, torch.dtype], str] = {}
        self.lora_U = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))
        self.lora_V = nn.Parameter(V_init.to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `lors_linear` minus its per-call work: the kernel is resolved once per input device and dtype and the
        # scalars were typed at construction (batch-1 eager steps are bound by host work per layer).
        if self.weight.requires_grad:
            raise ValueError("LoRSLinear keeps the base weight frozen; it cannot produce a gradient for W")
        key = (x.device, x.dtype)
        kernel = self._resolved.get(key)
        if kernel is None:
            kernel = self._resolved[key] = _lors_triton.resolve_kernel(self.kernel, x)
        return _LoRSFunction.apply(x, self.weight, self.lora_U, self.lora_V, self.mask, self.bias, self.scaling,
                                   self.exact, self.grad_scale, kernel)

    def merged_weight(self) -> torch.Tensor:
        """`W' = (W + s U V) ⊙ M` (docs/methods.md §LoRS forward); exact zeros where the stored mask is False."""
        dtype = merge_dtype(self.weight)
        return _effective_weight(self.weight.to(dtype), self.lora_U.to(dtype), self.lora_V.to(dtype),
                                 self.mask, self.scaling)


def _examples_in(batch: dict[str, torch.Tensor]) -> int:
    first = batch.get("input_ids")
    if first is None:
        first = next(iter(batch.values()))
    return int(first.shape[0])


def estimate_gradients(model: nn.Module, names: list[str], ctx: MethodContext, samples: int) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss w.r.t. each named linear's full weight (pruned positions included), over
    the first `samples` training examples, on the unwrapped model (docs/methods.md §LoRS gradient-SVD init).

    Only these weights require grad during the estimate; every parameter's requires_grad and .grad are
    restored afterwards and no weight is modified.
    """
    if ctx.train_batches is None or ctx.loss_fn is None:
        raise ValueError("init=grad_svd needs training batches and a loss function in the MethodContext "
                         "(or use init=lora)")
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    saved = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    sums = {name: torch.zeros(w.shape, dtype=merge_dtype(w), device=w.device) for name, w in weights.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        seen = batches = 0
        batch_iter: Iterator = ctx.train_batches()
        while seen < samples:
            try:
                batch = next(batch_iter)
            except StopIteration:
                break
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            loss = ctx.loss_fn(model, batch)
            loss.backward()
            for name, w in weights.items():
                if w.grad is not None:
                    sums[name] += w.grad.to(sums[name].dtype)
                    w.grad = None
            seen += _examples_in(batch)
            batches += 1
        if batches == 0:
            raise ValueError("init=grad_svd: the training data yielded no batch")
    finally:
        for p, (requires_grad, grad) in saved.items():
            p.requires_grad_(requires_grad)
            p.grad = grad
    return {name: total / batches for name, total in sums.items()}


def grad_svd_factor(grad: torch.Tensor, rank: int, gamma: float, niter: int = 4) -> torch.Tensor:
    """V (r×d_in) = top-r right singular vectors of the estimated gradient, as rows, divided by γ
    (docs/methods.md §LoRS gradient-SVD init; `torch.svd_lowrank` with q = min(4r, min(d_out, d_in)))."""
    d_out, d_in = grad.shape
    q = min(4 * rank, d_out, d_in)
    if rank > min(d_out, d_in):
        raise ValueError(f"init=grad_svd: rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)}")
    _, _, Q = torch.svd_lowrank(grad.float(), q=q, niter=niter)
    return Q[:, :rank].t().contiguous() / gamma


class LoRSBase(Method):
    """attach/merge shared by `lors` and `lors_exact`; subclasses set `exact` and their Config."""

    preserves_sparsity = True
    exact: bool = False

    @staticmethod
    def kernel_tuner(*args, **kwargs):
        """The LoRS kernel tuner (`methods/_lors_tuning.py`, imported on use: it imports this module)."""
        from lorsbench.methods._lors_tuning import tune

        return tune(*args, **kwargs)

    def _grad_scale(self, scaling: float) -> float:
        return 1.0

    def scaling_value(self) -> float:
        c = self.config
        return scaling_factor(c.scaling, c.alpha, c.rank)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["scaling_value"] = self.scaling_value()
        described["adapter_gradient"] = "exact_masked" if self.exact else "rearranged_unmasked"
        return described

    def attach(self, model: nn.Module, masks: MaskSet, ctx: MethodContext) -> list[nn.Parameter]:
        c = self.config
        s = self.scaling_value()
        targets = c.targets or ctx.targets
        names = list(target_linears(model, targets))
        if c.init == "grad_svd":
            grads = estimate_gradients(model, names, ctx, c.init_samples)
            # svd_lowrank draws from the global RNG: seed it from the run's generator, leave global state as it was.
            seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                V_inits = {}
                for name in names:
                    grad = grads.pop(name)
                    if not bool(torch.isfinite(grad).all()):
                        raise ValueError(f"init=grad_svd: non-finite gradient estimate for {name}")
                    if float(grad.abs().max()) == 0.0:
                        log.warning("init=grad_svd: zero gradient for %s; using LoRA init there", name)
                        V_inits[name] = kaiming_uniform((c.rank, grad.shape[1]), ctx.generator)
                    else:
                        V_inits[name] = grad_svd_factor(grad, c.rank, c.init_gamma).cpu()
                    del grad
        else:
            V_inits = {}

        def make(name: str, linear: nn.Linear, mask: torch.Tensor) -> LoRSLinear:
            V = V_inits.pop(name, None)
            if V is None:
                V = kaiming_uniform((c.rank, linear.in_features), ctx.generator)
            return LoRSLinear(linear, mask, c.rank, s, self.exact, self._grad_scale(s), V,
                              kernel=getattr(c, "kernel", "torch"), mask_source=c.mask_source)

        trainable = attach_adapters(model, masks, targets, make)
        if c.mask_source == "weight":
            modules = dict(model.named_modules())
            kept_zeros = sum(int((masks[n].to(modules[n].weight.device) & (modules[n].weight == 0)).sum())
                             for n in names)
            if kept_zeros:
                log.warning("mask_source=weight: %d kept weight(s) are exactly 0 and stay 0 (treated as pruned)",
                            kept_zeros)
        return trainable

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)


def check_common(rank: int, alpha: float, scaling: str, init: str, init_samples: int, init_gamma: float,
                 kernel: str = "torch", mask_source: str = "stored") -> None:
    """Validation shared by the two LoRS configs."""
    scaling_factor(scaling, alpha, rank)
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {', '.join(MASK_SOURCES)}, got {mask_source!r}")
    if mask_source == "weight" and kernel == "fused":
        raise ValueError("kernel=fused reads the stored mask; use mask_source=stored or kernel=auto|torch|triton")
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init_samples <= 0:
        raise ValueError(f"init_samples must be > 0, got {init_samples}")
    if not (init_gamma > 0 and math.isfinite(init_gamma)):
        raise ValueError(f"init_gamma must be > 0, got {init_gamma}")
