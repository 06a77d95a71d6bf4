"""Triton kernels for the two W_eff GEMMs of LoRS (docs/methods.md §LoRS kernels; issue 5).

    forward   Y  = X · W_effᵀ (+ b)        (T×K · K×N)
    backward  dX = dY · W_eff              (T×N · N×K)
    W_eff = (W + s·U·V) ⊙ M = W + s·(U·V) ⊙ M    (the pruned W is already zero where M is False)

The unfused reference (`methods/_lors.py`, kernel=torch) builds W_eff with `addmm` (read W, write a d_out×d_in
buffer) then `mul_(mask)` (read it and M, write it), then the GEMM reads it again: 11 bytes per weight element
per GEMM in bf16, plus two cast launches for U and V. Two Triton paths replace it:

- `kernel=triton`: ONE pass builds W_eff (`build_weff`: read W 2 B + the stored mask 1 B, write W_eff 2 B per
  element; U, V read in fp32 and cast in the kernel), then the GEMM is cuBLAS: 7 bytes per element, one launch
  instead of four, and cuBLAS's GEMM speed. A transient W_eff lives inside one layer's forward or backward, as in
  the reference.
- `kernel=fused`: W_eff is never materialized. Each GEMM tile loads its W tile (2 B/element) and the stored
  keep-mask tile (the bool buffer viewed as uint8, zero-copy, 1 B/element), forms the U·V tile with an r-deep
  `tl.dot`, applies `(w + s·uv)` where the mask keeps and 0 elsewhere in registers, rounds to the activation dtype
  (as `addmm` does) and feeds it to the main `tl.dot`: 3 bytes per element, no temporary. With Triton 3.6
  this GEMM measured slower than cuBLAS (results/efficiency/README.md), so it is not the default.

The adapter gradients stay the small torch GEMMs of `_lors.py`. Nothing here runs unless Triton and a CUDA device
(or the Triton CPU interpreter, `TRITON_INTERPRET=1`, used by the CPU tests in float32) are present.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None


KERNELS = ("auto", "torch", "triton", "fused")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """`auto` -> `triton` (one-pass W_eff + cuBLAS, the fastest measured) for half-precision CUDA inputs when
    Triton is importable, else `torch` (the unfused reference). A Triton path where it cannot run is one clear
    error."""
    check_kernel(kernel)
    if kernel == "torch":
        return "torch"
    if kernel in ("triton", "fused"):
        if not available(x.device):
            raise RuntimeError(f"kernel={kernel} needs triton and a CUDA device (input on {x.device}); "
                               "use kernel=torch")
        return kernel
    fast = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and available(x.device)
    return "triton" if fast else "torch"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on `device`: Triton importable and (CUDA, or its interpreter on CPU)."""
    if triton is None:
        return False
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cpu":
        return interpreting()
    return torch.cuda.is_available() or interpreting()


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. `swap=True` computes the transposed product so W_eff (built in registers) is
    the MMA's left operand; otherwise it is the right operand."""

    block_t: int = 128
    block_n: int = 128
    block_k: int = 64
    group_t: int = 8
    num_warps: int = 8
    num_stages: int = 3
    swap: bool = False

    def label(self) -> str:
        return (f"t{self.block_t}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"
                + ("x" if self.swap else ""))


# Candidates swept by `python -m lorsbench.bench.layer --tune` (notes/gpu.md has the measured winners).
CANDIDATES: tuple[TileConfig, ...] = (
    TileConfig(128, 128, 64, 8, 8, 3, False),
    TileConfig(64, 128, 64, 8, 4, 4, False),
    TileConfig(128, 128, 128, 8, 8, 2, False),
    TileConfig(128, 128, 64, 8, 8, 3, True),
    TileConfig(64, 128, 64, 8, 4, 4, True),
    TileConfig(128, 64, 64, 8, 4, 4, True),
)

# Launch configurations measured best per (kind, d_out, d_in) and token count, from
# `python -m lorsbench.bench.layer --tune`: (kind, N, K) -> ((min T, config), ...) ascending in T. The per-kind
# defaults below came close to the per-shape winners over the Llama-3-8B shapes on an H100 (the sweep:
# results/efficiency/nvidia-h100-80gb-hbm3/kernel_tune_all_configs.json), so no per-shape entry is kept: the fused
# path is not the default anyway.
TUNED: dict[tuple[str, int, int], tuple[tuple[int, TileConfig], ...]] = {}
DEFAULTS = {"fwd": TileConfig(128, 64, 64, 8, 4, 4, True), "dx": TileConfig(128, 128, 64, 8, 8, 3, False)}
_DEFAULT = TileConfig(128, 128, 64, 8, 8, 3, False)
TILES_ENV = "LORSBENCH_LORS_TILES"  # a JSON file of tuned entries that overrides TUNED (tuning runs)


def _tuned() -> dict[tuple[str, int, int], tuple[tuple[int, TileConfig], ...]]:
    path = os.environ.get(TILES_ENV)
    return _read_tiles(path) if path else TUNED


@functools.lru_cache(maxsize=4)
def _read_tiles(path: str) -> dict[tuple[str, int, int], tuple[tuple[int, TileConfig], ...]]:
    table: dict[tuple[str, int, int], list[tuple[int, TileConfig]]] = {}
    with open(path) as handle:
        for entry in json.load(handle):
            key = (entry["kind"], int(entry["N"]), int(entry["K"]))
            table.setdefault(key, []).append((int(entry["T"]), TileConfig(**entry["config"])))
    return {key: tuple(sorted(value, key=lambda item: item[0])) for key, value in table.items()}


def pick_config(kind: str, T: int, N: int, K: int) -> TileConfig:
    """The launch configuration for `kind` ('fwd' or 'dx') at T tokens and an N×K (d_out×d_in) weight: the tuned
    entry with the largest measured T <= this T (the smallest one if none), else a generic default."""
    entries = _tuned().get((kind, N, K))
    if entries:
        config = entries[0][1]
        for t_min, candidate in entries:
            if t_min <= T:
                config = candidate
    else:
        config = DEFAULTS.get(kind, _DEFAULT)
    if T < config.block_t:  # short inputs: a smaller token tile (tl.dot needs >= 16)
        return TileConfig(max(16, 1 << (T - 1).bit_length()), config.block_n, config.block_k, config.group_t,
                          4, config.num_stages, config.swap)
    return config


if triton is not None:

    @triton.jit
    def _tile_ids(pid, n_t, n_other, GROUP_T: tl.constexpr):
        """Grouped launch order: GROUP_T consecutive programs share one weight tile (L2 reuse across tokens)."""
        width = GROUP_T * n_other
        first_t = (pid // width) * GROUP_T
        size_t = min(n_t - first_t, GROUP_T)
        pid_t = first_t + (pid % width) % size_t
        pid_o = (pid % width) // size_t
        return pid_t, pid_o

    @triton.jit
    def _weff_tile(w, keep, u, v, scaling):
        """`(w + s·u·v) ⊙ keep`, rounded to w's dtype once (as addmm then mul_ by the mask)."""
        uv = tl.dot(u, v)
        return tl.where(keep != 0, w.to(tl.float32) + scaling * uv, 0.0).to(w.dtype)

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, m_ptr, u_ptr, v_ptr, b_ptr, y_ptr, T, N, K, R, scaling,
                    sxt, sxk, swn, swk, smn, smk, sun, sur, svr, svk, syt, syn,
                    HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, R_PAD: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
                    EVEN_T: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        pid_t, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(N, BLOCK_N), GROUP_T)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_PAD)
        t_ok = offs_t < T
        n_ok = offs_n < N
        r_ok = offs_r < R
        u = tl.load(u_ptr + offs_n[:, None] * sun + offs_r[None, :] * sur, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0).to(w_ptr.dtype.element_ty)
        x_ptrs = x_ptr + offs_t[:, None] * sxt + offs_k[None, :] * sxk
        w_ptrs = w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk
        m_ptrs = m_ptr + offs_n[:, None] * smn + offs_k[None, :] * smk
        v_ptrs = v_ptr + offs_r[:, None] * svr + offs_k[None, :] * svk
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            if EVEN_T and EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if EVEN_N and EVEN_K:
                w = tl.load(w_ptrs)
                keep = tl.load(m_ptrs)
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                keep = tl.load(m_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            v = tl.load(v_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(w.dtype)
            weff = _weff_tile(w, keep, u, v, scaling)
            if SWAP:
                acc = tl.dot(weff, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(weff), acc)
            x_ptrs += BLOCK_K * sxk
            w_ptrs += BLOCK_K * swk
            m_ptrs += BLOCK_K * smk
            v_ptrs += BLOCK_K * svk
        if SWAP:
            acc = tl.trans(acc)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_t[:, None] * syt + offs_n[None, :] * syn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dx_kernel(dy_ptr, w_ptr, m_ptr, u_ptr, v_ptr, dx_ptr, T, N, K, R, scaling,
                   sdt, sdn, swn, swk, smn, smk, sun, sur, svr, svk, sxt, sxk,
                   SWAP: tl.constexpr, R_PAD: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
                   EVEN_T: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        # Output tile: BLOCK_T tokens × BLOCK_K input features; reduction over N (d_out) in BLOCK_N steps.
        pid_t, pid_k = _tile_ids(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(K, BLOCK_K), GROUP_T)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        t_ok = offs_t < T
        k_ok = offs_k < K
        r_ok = offs_r < R
        v = tl.load(v_ptr + offs_r[:, None] * svr + offs_k[None, :] * svk, mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(w_ptr.dtype.element_ty)
        dy_ptrs = dy_ptr + offs_t[:, None] * sdt + offs_n[None, :] * sdn
        w_ptrs = w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk
        m_ptrs = m_ptr + offs_n[:, None] * smn + offs_k[None, :] * smk
        u_ptrs = u_ptr + offs_n[:, None] * sun + offs_r[None, :] * sur
        if SWAP:
            acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_ok = (n0 + offs_n) < N
            if EVEN_T and EVEN_N:
                dy = tl.load(dy_ptrs)
            else:
                dy = tl.load(dy_ptrs, mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            if EVEN_N and EVEN_K:
                w = tl.load(w_ptrs)
                keep = tl.load(m_ptrs)
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                keep = tl.load(m_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            u = tl.load(u_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(w.dtype)
            weff = _weff_tile(w, keep, u, v, scaling)
            if SWAP:
                acc = tl.dot(tl.trans(weff), tl.trans(dy), acc)
            else:
                acc = tl.dot(dy, weff, acc)
            dy_ptrs += BLOCK_N * sdn
            w_ptrs += BLOCK_N * swn
            m_ptrs += BLOCK_N * smn
            u_ptrs += BLOCK_N * sun
        if SWAP:
            acc = tl.trans(acc)
        dx_ptrs = dx_ptr + offs_t[:, None] * sxt + offs_k[None, :] * sxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & k_ok[None, :])


    @triton.jit
    def _build_kernel(w_ptr, m_ptr, u_ptr, v_ptr, out_ptr, N, K, R, scaling,
                      swn, swk, smn, smk, sun, sur, svr, svk, son, sok,
                      R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      MASK_FROM_W: tl.constexpr):
        """One pass: out = (W + s·U·V) ⊙ M, U and V read in their own dtype and cast to W's.
        MASK_FROM_W: M = (W != 0), no mask read (m_ptr unused)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_PAD)
        n_ok = offs_n < N
        k_ok = offs_k < K
        r_ok = offs_r < R
        tile = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk, mask=tile, other=0.0)
        if MASK_FROM_W:
            keep = (w != 0).to(tl.int8)
        else:
            keep = tl.load(m_ptr + offs_n[:, None] * smn + offs_k[None, :] * smk, mask=tile, other=0)
        u = tl.load(u_ptr + offs_n[:, None] * sun + offs_r[None, :] * sur, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0).to(w.dtype)
        v = tl.load(v_ptr + offs_r[:, None] * svr + offs_k[None, :] * svk, mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(w.dtype)
        out = _weff_tile(w, keep, u, v, scaling)
        tl.store(out_ptr + offs_n[:, None] * son + offs_k[None, :] * sok, out.to(out_ptr.dtype.element_ty), mask=tile)


BUILD_BLOCKS = (64, 128, 4)  # (block_n, block_k, num_warps): memory-bound; measured in notes/gpu.md


def build_weff(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor | None, scaling: float,
               dtype: torch.dtype | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`(W + s U V) ⊙ M` in one Triton pass, in `dtype` (default: W's); the same rounding as `addmm` + mask.
    `mask=None`: M = `W != 0`, read from the weight tile itself (no mask bytes)."""
    if triton is None:
        raise RuntimeError("build_weff needs triton (use kernel=torch)")
    N, K = weight.shape
    dtype = dtype or weight.dtype
    w = weight if weight.dtype == dtype else weight.to(dtype)
    keep = _mask_u8(mask) if mask is not None else w  # w: an unused pointer under MASK_FROM_W
    out = torch.empty((N, K), dtype=dtype, device=weight.device)
    block_n, block_k, warps = blocks or BUILD_BLOCKS
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _build_kernel[grid](
        w, keep, U, V, out, N, K, U.shape[1], float(scaling),
        w.stride(0), w.stride(1), keep.stride(0), keep.stride(1), U.stride(0), U.stride(1),
        V.stride(0), V.stride(1), out.stride(0), out.stride(1),
        R_PAD=_rank_pad(U.shape[1]), BLOCK_N=block_n, BLOCK_K=block_k, MASK_FROM_W=mask is None,
        num_warps=warps,
    )
    return out


def forward(kernel: str, x: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
            mask: torch.Tensor | None, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`X W_effᵀ (+ b)` through the `triton` (one-pass W_eff + cuBLAS) or `fused` path."""
    _check_fused_mask(kernel, mask)
    if kernel == "fused":
        return weff_linear(x, weight, U, V, mask, scaling, bias)
    w_eff = build_weff(weight, U, V, mask, scaling, x.dtype)
    return torch.nn.functional.linear(x, w_eff, None if bias is None else bias.to(x.dtype))


def grad_input(kernel: str, grad_out: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """`dY W_eff` through the `triton` or `fused` path; grad_out is (..., N), the result (..., K)."""
    _check_fused_mask(kernel, mask)
    if kernel == "fused":
        return weff_grad_input(grad_out, weight, U, V, mask, scaling)
    return grad_out @ build_weff(weight, U, V, mask, scaling, grad_out.dtype)


def _check_fused_mask(kernel: str, mask: torch.Tensor | None) -> None:
    if kernel == "fused" and mask is None:
        raise ValueError("kernel=fused reads the stored mask; use mask_source=stored or kernel=triton")


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)  # the stored keep-mask itself, zero-copy
    if mask.dtype != torch.uint8:
        raise TypeError(f"the keep-mask must be bool or uint8, got {mask.dtype}")
    return mask


def _operands(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
    if triton is None:
        raise RuntimeError("the fused LoRS kernels need triton (use kernel=torch)")
    return (weight if weight.dtype == dtype else weight.to(dtype)), _mask_u8(mask)


def _rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs an inner size >= 16


def weff_linear(x: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """`X ((W + s U V) ⊙ M)ᵀ (+ b)` in one fused kernel; x is (..., K), the result (..., N) in x's dtype."""
    N, K = weight.shape
    w, keep = _operands(weight, mask, x.dtype)
    u, v = U, V
    x2 = x.reshape(-1, K)
    T = x2.shape[0]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return y.reshape(*x.shape[:-1], N)
    cfg = config or pick_config("fwd", T, N, K)
    b = bias.to(x.dtype) if bias is not None else y  # dummy pointer when there is no bias
    grid = (triton.cdiv(T, cfg.block_t) * triton.cdiv(N, cfg.block_n),)
    _fwd_kernel[grid](
        x2, w, keep, u, v, b, y, T, N, K, u.shape[1], float(scaling),
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), keep.stride(0), keep.stride(1),
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SWAP=cfg.swap, R_PAD=_rank_pad(u.shape[1]),
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_T=cfg.group_t,
        EVEN_T=T % cfg.block_t == 0, EVEN_N=N % cfg.block_n == 0, EVEN_K=K % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.reshape(*x.shape[:-1], N)


def weff_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                    mask: torch.Tensor, scaling: float, config: TileConfig | None = None) -> torch.Tensor:
    """`dY ((W + s U V) ⊙ M)` in one fused kernel; grad_out is (..., N), the result (..., K)."""
    N, K = weight.shape
    w, keep = _operands(weight, mask, grad_out.dtype)
    u, v = U, V
    dy = grad_out.reshape(-1, N)
    T = dy.shape[0]
    dx = torch.empty((T, K), dtype=grad_out.dtype, device=grad_out.device)
    if T == 0:
        return dx.reshape(*grad_out.shape[:-1], K)
    cfg = config or pick_config("dx", T, N, K)
    grid = (triton.cdiv(T, cfg.block_t) * triton.cdiv(K, cfg.block_k),)
    _dx_kernel[grid](
        dy, w, keep, u, v, dx, T, N, K, u.shape[1], float(scaling),
        dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), keep.stride(0), keep.stride(1),
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), dx.stride(0), dx.stride(1),
        SWAP=cfg.swap, R_PAD=_rank_pad(u.shape[1]),
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_T=cfg.group_t,
        EVEN_T=T % cfg.block_t == 0, EVEN_N=N % cfg.block_n == 0, EVEN_K=K % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx.reshape(*grad_out.shape[:-1], K)
