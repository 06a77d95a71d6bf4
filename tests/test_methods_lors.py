"""LoRS (docs/methods.md §LoRS, §Invariants): the custom operator against float64 autograd references, what it keeps
for backward, and the gradient-SVD initialisation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorsbench.config import MethodSpec
from lorsbench.method import build_method
from lorsbench.methods._lors import estimate_gradients, grad_svd_factor, lors_linear
from lorsbench.modules import target_linears

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    TARGETS, batches, context, random_masks, saved_large_tensors, single_thread, tiny_llama,
)

D_OUT, D_IN, RANK, TOKENS, S = 24, 20, 4, 10, 4.0


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(D_OUT, D_IN, generator=g) > 0.5
    weight = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) * mask
    U = torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64)  # non-zero so that dV is non-trivial
    V = torch.randn(RANK, D_IN, generator=g, dtype=torch.float64)
    bias = torch.randn(D_OUT, generator=g, dtype=torch.float64)
    x = torch.randn(2, TOKENS // 2, D_IN, generator=g, dtype=torch.float64)
    dy = torch.randn(2, TOKENS // 2, D_OUT, generator=g, dtype=torch.float64)
    return weight, mask, U, V, bias, x, dy


def _grads(fn, x, U, V, dy):
    x, U, V = (t.detach().clone().requires_grad_(True) for t in (x, U, V))
    out = fn(x, U, V)
    out.backward(dy)
    return out.detach(), x.grad, U.grad, V.grad


def test_lors_gradients_against_masked_and_unmasked_autograd():
    weight, mask, U, V, bias, x, dy = _problem()
    masked = _grads(lambda x, U, V: x @ ((weight + S * U @ V) * mask).T + bias, x, U, V, dy)
    unmasked = _grads(lambda x, U, V: x @ (weight + S * U @ V).T + bias, x, U, V, dy)
    lors = _grads(lambda x, U, V: lors_linear(x, weight, U, V, mask, S, bias), x, U, V, dy)
    lors_s = _grads(lambda x, U, V: lors_linear(x, weight, U, V, mask, S, bias, grad_scale=S), x, U, V, dy)
    exact = _grads(lambda x, U, V: lors_linear(x, weight, U, V, mask, S, bias, exact=True), x, U, V, dy)
    tight = dict(rtol=1e-12, atol=1e-12)

    for variant in (lors, lors_s, exact):  # forward and dX are exact in every variant
        torch.testing.assert_close(variant[0], masked[0], **tight)
        torch.testing.assert_close(variant[1], masked[1], **tight)
    # repo-faithful: (1/s) x the unmasked-LoRA gradient; grad_scale=s: exactly that gradient
    torch.testing.assert_close(lors[2], unmasked[2] / S, **tight)
    torch.testing.assert_close(lors[3], unmasked[3] / S, **tight)
    torch.testing.assert_close(lors_s[2], unmasked[2], **tight)
    torch.testing.assert_close(lors_s[3], unmasked[3], **tight)
    # ... which differs from the masked gradient by exactly the pruned part of G = dYᵀX
    G = dy.reshape(-1, D_OUT).T @ x.reshape(-1, D_IN)
    torch.testing.assert_close(lors[2] - masked[2] / S, (G * ~mask) @ V.T, **tight)
    torch.testing.assert_close(lors[3] - masked[3] / S, U.T @ (G * ~mask), **tight)
    assert not torch.allclose(lors[2], masked[2] / S, atol=1e-3)
    # lors_exact: the masked autograd gradient
    torch.testing.assert_close(exact[2], masked[2], **tight)
    torch.testing.assert_close(exact[3], masked[3], **tight)


def test_lors_exact_passes_gradcheck():
    weight, mask, U, V, bias, x, _ = _problem(1)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x[:1, :3], U, V))
    assert torch.autograd.gradcheck(
        lambda x, U, V: lors_linear(x, weight, U, V, mask, S, bias, exact=True), inputs, eps=1e-6, atol=1e-7)


def test_lors_refuses_a_trainable_base_weight():
    weight, mask, U, V, bias, x, _ = _problem()
    with pytest.raises(ValueError, match="frozen"):
        lors_linear(x, weight.requires_grad_(True), U, V, mask, S)


def _module(name: str, **params) -> nn.Module:
    model = tiny_llama(torch.float32)
    masks = random_masks(model, "unstructured")
    build_method(MethodSpec(name=name, params=params)).attach(model, masks, context())
    module = model.get_submodule("model.layers.0.mlp.up_proj")  # d_out 128 x d_in 64
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_()
    return module


@pytest.mark.parametrize("name,params,keeps_dense", [
    ("lors", {"init": "lora"}, False),
    ("lors_exact", {"init": "lora"}, False),
    ("spp", {"dropout": 0.0}, False),
    ("slope", {}, False),
    ("lora", {}, False),
    ("sqft", {"dropout": 0.0}, True),
    ("sqft", {"dropout": 0.0, "quantize": "int4", "quant_group_size": 16}, True),
])
def test_saved_tensors_for_backward(name, params, keeps_dense):
    """docs/methods.md §Costs, §Invariants (item 8): LoRS variants keep no d_out×d_in tensor for backward; naive
    SparsePEFT does."""
    if name == "slope":
        model = tiny_llama(torch.float32)
        masks = random_masks(model, "2of4")
        build_method(MethodSpec(name="slope")).attach(model, masks, context())
        module = model.get_submodule("model.layers.0.mlp.up_proj")
    else:
        module = _module(name, **params)
    x = torch.randn(1, 8, module.in_features, requires_grad=True)  # 8 tokens: X is far smaller than W
    large = saved_large_tensors(module, x)
    if keeps_dense:
        assert sorted(large[0]) == sorted((module.out_features, module.in_features))  # the masked delta (or Wᵀ)
    else:
        assert large == []


def _gap_matrix(d_out=48, d_in=40, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.tensor([20.0, 18.0, 16.0, 14.0])[:rank], torch.linspace(1.0, 0.1, d_in - rank)])
    return (P * sigma.to(torch.float64)) @ Q.T, Q[:, :rank]


def test_grad_svd_spans_top_right_singular_subspace():
    grad, top = _gap_matrix()
    torch.manual_seed(0)
    gamma = 2.0
    V = grad_svd_factor(grad, 4, gamma).double()  # q = 16 < 40: the randomized path
    torch.testing.assert_close(V @ V.T, torch.eye(4, dtype=torch.float64) / gamma**2, rtol=0, atol=1e-6)
    cosines = torch.linalg.svdvals(top.T @ (gamma * V.T))  # cosines of the principal angles
    torch.testing.assert_close(cosines, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)


def test_estimate_gradients_is_the_mean_full_weight_gradient_and_restores_state():
    model = tiny_llama()
    random_masks(model, "unstructured")
    names = list(target_linears(model, TARGETS))
    data = batches(4)
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)  # some state to restore
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate = estimate_gradients(model, names, context(data), samples=4)  # 2 batches of 2 examples

    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(True)
    for batch in data[:2]:
        reference(**batch).loss.backward()
    for name in names:
        expected = reference.get_submodule(name).weight.grad / 2
        torch.testing.assert_close(estimate[name], expected, rtol=1e-12, atol=1e-14)
        assert bool((expected[model.get_submodule(name).weight == 0] != 0).any())  # pruned positions included
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


def test_grad_svd_first_sgd_step_is_the_masked_rank_r_projection_of_the_gradient():
    """docs/methods.md §LoRS gradient-SVD init: with U = 0 the first SGD step on the estimate's batch gives ΔW_eff =
    -η s (Ĝ VᵀV) ⊙ M."""
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    data = batches(1)
    names = list(target_linears(model, TARGETS))
    G = estimate_gradients(copy.deepcopy(model), names, context(data), samples=2)
    method = build_method(MethodSpec(name="lors", params={"rank": 4, "init_samples": 2, "init_gamma": 0.5}))
    params = method.attach(model, masks, context(data))
    s, lr = 16 / 2, 0.1
    for name in names:
        module = model.get_submodule(name)
        assert torch.count_nonzero(module.lora_U) == 0
        torch.testing.assert_close(module.lora_V @ module.lora_V.T, torch.eye(4) * 4, rtol=0, atol=1e-5)
    weights = {name: model.get_submodule(name).weight.clone() for name in names}
    optimizer = torch.optim.SGD(params, lr=lr)
    model(**data[0]).loss.backward()
    optimizer.step()
    for name in names:
        module = model.get_submodule(name)
        V = module.lora_V.double()
        expected = -lr * s * (G[name] @ V.T @ V) * masks[name]
        torch.testing.assert_close(module.merged_weight() - weights[name], expected, rtol=1e-5, atol=1e-7)


def test_grad_svd_needs_training_data():
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    ctx = context()
    ctx.train_batches = None
    with pytest.raises(ValueError, match="init=grad_svd needs training batches"):
        build_method(MethodSpec(name="lors")).attach(model, masks, ctx)


def test_grad_svd_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    Vs = []
    for _ in range(2):
        model = tiny_llama()
        masks = random_masks(model, "2of4")
        torch.manual_seed(123)
        build_method(MethodSpec(name="lors_exact", params={"init_samples": 2})).attach(model, masks, context())
        assert torch.equal(torch.rand(3), expected_draw)
        Vs.append(model.get_submodule("model.layers.1.self_attn.o_proj").lora_V.clone())
    torch.testing.assert_close(Vs[0], Vs[1], rtol=0, atol=0)


@pytest.mark.parametrize("exact", [False, True])
def test_mask_from_the_weight_equals_the_stored_mask_when_no_kept_weight_is_zero(exact):
    """mask_source=weight (M = W != 0, no buffer): the same forward and every gradient as the stored mask."""
    weight, mask, U, V, bias, x, dy = _problem(3)
    assert torch.equal(weight != 0, mask)  # randn never draws an exact 0
    stored = _grads(lambda x, U, V: lors_linear(x, weight, U, V, mask, S, bias, exact=exact), x, U, V, dy)
    derived = _grads(lambda x, U, V: lors_linear(x, weight, U, V, None, S, bias, exact=exact), x, U, V, dy)
    for a, b in zip(stored, derived):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mask_from_the_weight_keeps_the_stored_mask_and_freezes_kept_zeros():
    """No mask buffer on the module; every weight the stored mask pruned is exactly 0 after merge; a kept weight
    that is exactly 0 is treated as pruned (docs/methods.md §Invariants, item 7) and stays 0."""
    model = tiny_llama()
    masks = random_masks(model, "2of4")
    name = "model.layers.0.mlp.up_proj"
    kept = masks[name].nonzero()[0]
    with torch.no_grad():
        model.get_submodule(name).weight[kept[0], kept[1]] = 0.0
    method = build_method(MethodSpec("lors", {"init": "lora", "mask_source": "weight", "kernel": "torch"}))
    params = method.attach(model, masks, context())
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)
    for module in target_linears(model, TARGETS).values():
        assert "mask" not in dict(module.named_buffers())
    merged = method.merge(model)
    for target, linear in target_linears(merged, TARGETS).items():
        assert bool((linear.weight[~masks[target]] == 0).all())
    assert float(merged.get_submodule(name).weight[kept[0], kept[1]]) == 0.0


def test_mask_source_is_validated():
    from lorsbench.config import ConfigError

    with pytest.raises(ConfigError, match="mask_source"):
        build_method(MethodSpec("lors", {"mask_source": "weights"}))
    with pytest.raises(ConfigError, match="kernel=fused reads the stored mask"):
        build_method(MethodSpec("lors_exact", {"mask_source": "weight", "kernel": "fused"}))
