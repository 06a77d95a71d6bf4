"""The Triton LoRS kernels (methods/_lors_triton.py: one-pass W_eff builder, fused GEMMs) against the unfused torch path and float64 references.

GPU tests are marked `gpu` (skipped without CUDA). The kernel math also runs on CPU under the Triton interpreter:
`TRITON_INTERPRET=1 pytest tests/test_lors_triton.py` (float32; needs triton installed; skipped otherwise).
"""
from __future__ import annotations

import json

import pytest
import torch

from lorsbench.config import ConfigError, MethodSpec
from lorsbench.registry import build_method, methods_package

methods_package()
from lorsbench.methods import _lors_triton as lt  # noqa: E402
from lorsbench.methods._lors import lors_linear  # noqa: E402

needs_triton = pytest.mark.skipif(lt.triton is None, reason="needs triton")
interpreter = pytest.mark.skipif(lt.triton is None or not lt.interpreting(),
                                 reason="needs triton and TRITON_INTERPRET=1")


def _problem(T, N, K, r, device, dtype, seed, bias=False, density=0.5):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.rand(N, K, generator=gen) < density
    w = torch.randn(N, K, generator=gen) * mask
    u = torch.randn(N, r, generator=gen)
    v = torch.randn(r, K, generator=gen)
    x = torch.randn(T, K, generator=gen)
    dy = torch.randn(T, N, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (to(x).to(dtype), to(w).to(dtype), to(u), to(v), to(mask), to(b if b is None else b.to(dtype)),
            to(dy).to(dtype))


def _reference(x, w, u, v, mask, s, b, dy):
    """float64: Y = X ((W + s U V) ⊙ M)ᵀ + b and dX = dY ((W + s U V) ⊙ M)."""
    w_eff = (w.double() + s * u.double() @ v.double()) * mask
    y = x.double() @ w_eff.t() + (0 if b is None else b.double())
    return y, dy.double() @ w_eff


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------------------------- always (CPU)


def test_kernel_option_is_validated_by_the_method_config():
    with pytest.raises(ConfigError, match="kernel"):
        build_method(MethodSpec("lors", {"kernel": "cuda"}))
    assert build_method(MethodSpec("lors_exact", {"kernel": "torch"})).config.kernel == "torch"
    assert build_method(MethodSpec("lors")).config.kernel == "auto"


def test_auto_resolves_to_the_torch_path_on_cpu():
    x = torch.randn(4, 8)
    assert lt.resolve_kernel("auto", x) == "torch"
    assert lt.resolve_kernel("torch", x) == "torch"
    with pytest.raises(ValueError, match="kernel must be one of"):
        lt.resolve_kernel("fast", x)


@pytest.mark.skipif(lt.interpreting(), reason="the interpreter runs triton on CPU")
def test_triton_on_cpu_is_one_clear_error():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="kernel=triton needs"):
        lt.resolve_kernel("triton", x)


def test_pick_config_uses_the_largest_tuned_token_count_not_above_t(tmp_path, monkeypatch):
    small = lt.TileConfig(64, 128, 64, 8, 4, 4, False)
    large = lt.TileConfig(128, 256, 64, 8, 8, 3, True)
    entries = [{"kind": "fwd", "N": 256, "K": 128, "T": 512, "config": small.__dict__},
               {"kind": "fwd", "N": 256, "K": 128, "T": 2048, "config": large.__dict__}]
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(entries))
    monkeypatch.setenv(lt.TILES_ENV, str(path))
    assert lt.pick_config("fwd", 1024, 256, 128) == small
    assert lt.pick_config("fwd", 4096, 256, 128) == large
    assert lt.pick_config("fwd", 256, 256, 128) == small  # below every tuned T: the smallest entry
    assert lt.pick_config("dx", 4096, 256, 128) == lt._DEFAULT  # not tuned
    assert lt.pick_config("dx", 20, 256, 128).block_t == 32  # short inputs shrink the token tile


# --------------------------------------------------------------------------------- Triton interpreter (CPU)


@interpreter
@pytest.mark.parametrize("T,N,K,r,bias,cfg", [
    (40, 48, 80, 16, True, lt.TileConfig(16, 32, 32, 2, 4, 1, False)),
    (64, 64, 64, 8, False, lt.TileConfig(32, 32, 32, 2, 4, 1, True)),
    (33, 70, 50, 4, True, lt.TileConfig(16, 16, 16, 1, 4, 1, False)),
])
def test_interpreted_kernels_match_float64(T, N, K, r, bias, cfg):
    x, w, u, v, mask, b, dy = _problem(T, N, K, r, "cpu", torch.float32, seed=T + N, bias=bias)
    y_ref, dx_ref = _reference(x, w, u, v, mask, 0.7, b, dy)
    assert _rel(lt.weff_linear(x, w, u, v, mask, 0.7, b, config=cfg), y_ref) < 1e-5
    assert _rel(lt.weff_grad_input(dy, w, u, v, mask, 0.7, config=cfg), dx_ref) < 1e-5


@interpreter
@pytest.mark.parametrize("N,K,r,blocks", [(48, 80, 16, (16, 32, 4)), (70, 50, 4, (32, 16, 4)), (64, 128, 8, None)])
def test_interpreted_weff_builder_matches_float64(N, K, r, blocks):
    x, w, u, v, mask, _, dy = _problem(8, N, K, r, "cpu", torch.float32, seed=N)
    ref = (w.double() + 0.7 * u.double() @ v.double()) * mask
    built = lt.build_weff(w, u, v, mask, 0.7, blocks=blocks)
    assert _rel(built, ref) < 1e-6
    assert bool((built[~mask] == 0).all())
    y_ref, dx_ref = _reference(x, w, u, v, mask, 0.7, None, dy)
    assert _rel(lt.forward("triton", x, w, u, v, mask, 0.7), y_ref) < 1e-5
    assert _rel(lt.grad_input("triton", dy, w, u, v, mask, 0.7), dx_ref) < 1e-5


# ----------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("T,N,K,r,bias", [(512, 1024, 512, 16, False), (300, 200, 136, 8, True),
                                          (2048, 384, 256, 32, False), (7, 256, 64, 16, True)])
def test_fused_kernels_match_the_unfused_path_in_bf16(T, N, K, r, bias):
    from lorsbench.methods._lors import _effective_weight

    x, w, u, v, mask, b, dy = _problem(T, N, K, r, "cuda", torch.bfloat16, seed=T, bias=bias)
    y_ref, dx_ref = _reference(x, w, u, v, mask, 4.0, b, dy)
    w_eff = _effective_weight(w, u, v, mask, 4.0)
    y_unfused = torch.nn.functional.linear(x, w_eff, b)
    poison = torch.full((T, max(N, K)), float("nan"), device="cuda", dtype=torch.bfloat16)
    del poison  # the caching allocator hands this NaN block to the next outputs: unwritten elements stay NaN
    y = lt.weff_linear(x, w, u, v, mask, 4.0, b)
    dx = lt.weff_grad_input(dy, w, u, v, mask, 4.0)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(dx).all())
    assert _rel(y, y_ref) < 1e-2 and _rel(dx, dx_ref) < 1e-2
    assert _rel(y, y_unfused) < 1e-2
    assert _rel(dx, dy @ w_eff) < 1e-2


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("N,K,r", [(1024, 512, 16), (200, 136, 8), (4096, 1024, 32)])
def test_weff_builder_rounds_like_addmm_then_mask(N, K, r):
    from lorsbench.methods._lors import _effective_weight

    _, w, u, v, mask, _, _ = _problem(4, N, K, r, "cuda", torch.bfloat16, seed=N)
    poison = torch.full((N, K), float("nan"), device="cuda", dtype=torch.bfloat16)
    del poison
    built = lt.build_weff(w, u, v, mask, 4.0)
    ref = _effective_weight(w, u, v, mask, 4.0)
    assert built.dtype == torch.bfloat16 and bool(torch.isfinite(built).all())
    assert bool((built[~mask] == 0).all())
    # same bf16 rounding of w + s·uv; the two differ only by the order of the r-term fp32 sum
    assert float((built.float() - ref.float()).abs().max()) <= float(ref.float().abs().max()) * 2**-7


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("cfg", lt.CANDIDATES, ids=lambda c: c.label())
def test_every_candidate_config_is_correct(cfg):
    x, w, u, v, mask, _, dy = _problem(384, 640, 320, 16, "cuda", torch.bfloat16, seed=1)
    y_ref, dx_ref = _reference(x, w, u, v, mask, 2.0, None, dy)
    assert _rel(lt.weff_linear(x, w, u, v, mask, 2.0, config=cfg), y_ref) < 1e-2
    assert _rel(lt.weff_grad_input(dy, w, u, v, mask, 2.0, config=cfg), dx_ref) < 1e-2


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("kernel", ["triton", "fused"])
@pytest.mark.parametrize("exact", [False, True])
def test_lors_linear_triton_and_torch_give_the_same_gradients(exact, kernel):
    x, w, u, v, mask, b, dy = _problem(256, 384, 256, 16, "cuda", torch.bfloat16, seed=3, bias=True)
    outs = {}
    for path in ("torch", kernel):
        xi = x.clone().requires_grad_(True)
        ui, vi = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
        y = lors_linear(xi, w, ui, vi, mask, 4.0, b, exact=exact, kernel=path)
        y.backward(dy)
        outs[path] = (y, xi.grad, ui.grad, vi.grad)
    for fused, unfused in zip(outs[kernel], outs["torch"]):
        assert _rel(fused, unfused) < 1e-2


@pytest.mark.gpu
@needs_triton
def test_lors_module_on_a_tiny_model_trains_the_same_with_every_kernel():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorsbench.composition import default_targets
    from lorsbench.config import PatternConfig, PruningConfig
    from lorsbench.pruning import build_pruner
    from lorsbench.registry import MethodContext

    targets = default_targets()
    losses, grads = {}, {}
    variants = {"torch": "weight", "triton": "weight", "triton_stored": "stored", "fused": "stored"}
    for variant, mask_source in variants.items():
        kernel = variant.removesuffix("_stored")
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        pruning = PruningConfig("magnitude", 0.5, PatternConfig("2of4", 2, 4), targets)
        masks = build_pruner(pruning).prune(model, None, keep_on_device=True)
        method = build_method(MethodSpec("lors", {"init": "lora", "kernel": kernel, "mask_source": mask_source}))
        ctx = MethodContext(targets, torch.device("cuda"), torch.bfloat16, torch.Generator().manual_seed(0))
        params = method.attach(model, masks, ctx)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.02)
        ids = torch.randint(3, 300, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[variant] = float(loss)
        grads[variant] = torch.cat([p.grad.flatten() for p in params])
    for variant in ("triton", "triton_stored", "fused"):
        assert abs(losses["torch"] - losses[variant]) < 1e-2 * abs(losses["torch"]), variant
        assert _rel(grads[variant], grads["torch"]) < 2e-2, variant


@interpreter
def test_interpreted_builder_derives_the_mask_from_the_weight():
    """build_weff(mask=None): M = W != 0 read from the weight tile, bit-identical to passing that mask."""
    x, w, u, v, mask, _, dy = _problem(8, 48, 80, 16, "cpu", torch.float32, seed=5)
    assert torch.equal(w != 0, mask)
    torch.testing.assert_close(lt.build_weff(w, u, v, None, 0.7), lt.build_weff(w, u, v, mask, 0.7), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel=fused reads the stored mask"):
        lt.forward("fused", x, w, u, v, None, 0.7)
