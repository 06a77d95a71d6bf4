"""SPP (docs/methods.md §SPP, §Invariants): grouped == expanded, custom gradients == autograd of the expanded formula
and the closed forms of §SPP gradients, shape rules, parameter count, merge formula."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorsbench.config import ConfigError, MethodSpec
from lorsbench.method import build_method
from lorsbench.methods.spp import SPPLinear, spp_adapter_expanded, spp_adapter_grouped
from lorsbench.modules import target_linears

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    TARGETS, context, random_masks, single_thread, tiny_llama,
)

D_OUT, D_IN, ROWS, S = 32, 12, 16, 2.0


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) * (torch.rand(D_OUT, D_IN, generator=g) > 0.5)
    alpha = torch.randn(ROWS, D_IN, generator=g, dtype=torch.float64)
    beta = torch.randn(D_OUT, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, D_IN, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 5, D_OUT, generator=g, dtype=torch.float64)
    return weight, alpha, beta, x, dy


def _expanded_reference(x, weight, alpha, beta, s):
    rep = alpha.repeat_interleave(D_OUT // ROWS, dim=0)  # row i uses alpha row i // (d_out / R)
    return s * x @ (beta[:, None] * rep * weight).T


def _grads(fn, x, alpha, beta, dy):
    x, alpha, beta = (t.detach().clone().requires_grad_(True) for t in (x, alpha, beta))
    out = fn(x, alpha, beta)
    out.backward(dy)
    return out.detach(), x.grad, alpha.grad, beta.grad


def test_rep_is_repeat_interleave_not_tiling():
    weight, alpha, beta, x, _ = _problem()
    out = spp_adapter_expanded(x, weight, alpha, beta, S)
    rep = torch.stack([alpha[i // (D_OUT // ROWS)] for i in range(D_OUT)])
    torch.testing.assert_close(out, S * x @ (beta[:, None] * rep * weight).T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("form", [spp_adapter_expanded, spp_adapter_grouped])
def test_forms_and_gradients_match_autograd_of_expanded_formula(form):
    weight, alpha, beta, x, dy = _problem()
    ref = _grads(lambda x, a, b: _expanded_reference(x, weight, a, b, S), x, alpha, beta, dy)
    got = _grads(lambda x, a, b: form(x, weight, a, b, S), x, alpha, beta, dy)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_gradients_match_closed_forms():
    """dβ_i = s Σ_j P_ij α_g(i)j and dα_gj = s Σ_{i in g} P_ij β_i with P = G ⊙ W (docs/methods.md §SPP gradients)."""
    weight, alpha, beta, x, dy = _problem(1)
    _, _, d_alpha, d_beta = _grads(lambda x, a, b: spp_adapter_expanded(x, weight, a, b, S), x, alpha, beta, dy)
    P = (dy.reshape(-1, D_OUT).T @ x.reshape(-1, D_IN)) * weight
    group = torch.arange(D_OUT) // (D_OUT // ROWS)
    torch.testing.assert_close(d_beta, S * (P * alpha[group]).sum(1), rtol=1e-12, atol=1e-12)
    expected_alpha = torch.stack([S * (P[group == g] * beta[group == g, None]).sum(0) for g in range(ROWS)])
    torch.testing.assert_close(d_alpha, expected_alpha, rtol=1e-12, atol=1e-12)


def test_module_gradients_and_merge_formula():
    weight, alpha, beta, x, dy = _problem(2)
    linear = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(weight)
    module = SPPLinear(linear, weight != 0, ROWS, S, 0.0, "expanded", torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.spp_alpha.copy_(alpha)
        module.spp_beta.copy_(beta)
    xg = x.clone().requires_grad_(True)
    module(xg).backward(dy)
    ref = _grads(lambda x, a, b: x @ weight.T + linear.bias + _expanded_reference(x, weight, a, b, S),
                 x, alpha.float().double(), beta.float().double(), dy)
    torch.testing.assert_close(xg.grad, ref[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.spp_alpha.grad, ref[2].float())
    torch.testing.assert_close(module.spp_beta.grad, ref[3].float())
    rep = module.spp_alpha.double().repeat_interleave(D_OUT // ROWS, dim=0)
    merged = weight * (1 + S * module.spp_beta.double()[:, None] * rep)
    torch.testing.assert_close(module.merged_weight(), merged, rtol=1e-14, atol=1e-14)


def test_parameter_count_is_16_d_in_plus_d_out():
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    shapes = [lin.weight.shape for lin in target_linears(model, TARGETS).values()]
    params = build_method(MethodSpec(name="spp")).attach(model, masks, context())
    assert sum(p.numel() for p in params) == sum(16 * d_in + d_out for d_out, d_in in shapes)


def test_d_out_not_divisible_by_rows_is_one_clear_error():
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    with pytest.raises(ConfigError, match=r"spp needs d_out divisible by rows=48.*d_out=64"):
        build_method(MethodSpec(name="spp", params={"rows": 48})).attach(model, masks, context())
