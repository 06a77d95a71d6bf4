"""LoRS through its module (the user path) after the host-work changes (issue 13): the same math as the float64
formulas of docs/methods.md §LoRS forward, §LoRS backward, and in bf16 bit-for-bit the ops in the order the operator
ran them before."""
from __future__ import annotations

import pytest
import torch

from lorsbench.config import MethodSpec
from lorsbench.method import build_method
from lorsbench.methods._lors import LoRSLinear
from tests.methods_helpers import context, random_masks, tiny_llama

CASES = [("lors", {"grad_scale": "one"}), ("lors", {"grad_scale": "s", "mask_source": "stored"}),
         ("lors_exact", {}), ("lors_exact", {"mask_source": "stored"})]


def _module(name: str, params: dict, dtype: torch.dtype) -> LoRSLinear:
    model = tiny_llama(torch.float64)
    masks = random_masks(model, "2of4")
    build_method(MethodSpec(name=name, params={"init": "lora", "kernel": "torch", **params})).attach(
        model, masks, context())
    module = model.get_submodule("model.layers.0.mlp.down_proj")
    with torch.no_grad():  # a non-zero U so that every gradient term is exercised
        module.lora_U.copy_(torch.randn(module.lora_U.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return module.to(dtype).train() if dtype != torch.float64 else module.train()


@pytest.mark.parametrize("name,params", CASES)
def test_module_forward_and_gradients_match_float64_formulas(name, params):
    module = _module(name, params, torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, module.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, module.out_features, generator=g, dtype=torch.float64)
    y = module(x)
    y.backward(dy)
    W, M = module.weight, (module.mask if module.mask is not None else module.weight != 0)
    U, V, s = module.lora_U.detach().double(), module.lora_V.detach().double(), module.scaling
    w_eff = (W + s * U @ V) * M
    X, dY = x.detach().reshape(-1, module.in_features), dy.reshape(-1, module.out_features)
    torch.testing.assert_close(y.detach().reshape(-1, module.out_features), X @ w_eff.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.reshape(-1, module.in_features), dY @ w_eff, rtol=1e-12, atol=1e-12)
    if name == "lors_exact":
        G = (dY.T @ X) * M
        dU, dV = s * G @ V.T, s * U.T @ G
    else:
        gs = s if params.get("grad_scale") == "s" else 1.0
        dU, dV = gs * dY.T @ (X @ V.T), gs * (dY @ U).T @ X
    assert module.lora_U.grad.dtype == module.lora_V.grad.dtype == torch.float32  # float32 masters
    torch.testing.assert_close(module.lora_U.grad.double(), dU, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(module.lora_V.grad.double(), dV, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name,params", CASES)
def test_bf16_module_is_bit_equal_to_the_op_order_written_out(name, params):
    """The casts are now done once and the kernel resolved once; the bf16 arithmetic is the same ops in the
    same order as before: W_eff = addmm(W, U_bf16, V_bf16, alpha=s) ⊙ M, then the GEMMs of
    docs/methods.md §LoRS backward."""
    module = _module(name, params, torch.bfloat16)
    for p in (module.lora_U, module.lora_V):
        p.data = p.data.float()  # masters stay float32 as after attach
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, module.in_features, generator=g, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 4, module.out_features, generator=g, dtype=torch.bfloat16)
    y = module(x)
    y.backward(dy)
    W = module.weight
    M = module.mask if module.mask is not None else W != 0
    u, v, s = module.lora_U.detach().bfloat16(), module.lora_V.detach().bfloat16(), module.scaling
    w_eff = torch.addmm(W, u, v, alpha=s).mul_(M)
    X, dY = x.detach().reshape(-1, module.in_features), dy.reshape(-1, module.out_features)
    if name == "lors_exact":
        G = (dY.t() @ X).mul_(M)
        dU, dV = s * (G @ v.t()), s * (u.t() @ G)
    else:
        dU, dV = dY.t() @ (X @ v.t()), (dY @ u).t() @ X
        if params.get("grad_scale") == "s":
            dU, dV = dU.mul_(s), dV.mul_(s)
    assert torch.equal(y.detach(), torch.nn.functional.linear(x.detach(), w_eff))
    assert torch.equal(x.grad.reshape(-1, module.in_features), dY @ w_eff)
    assert torch.equal(module.lora_U.grad, dU.float()) and torch.equal(module.lora_V.grad, dV.float())
