"""SLoPe fine-tuning variant (docs/methods.md §SLoPe, §Invariants): masks, double-pruned backward, adapter gradients,
errors, and the semi-structured 2:4 kernels on CUDA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorsbench.config import ConfigError, MethodSpec, PatternConfig
from lorsbench.method import build_method
from lorsbench.methods.slope import SLoPeLinear, column_mask
from lorsbench.pruning.masks import mask_from_scores, nm_valid

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    context, random_masks, single_thread, tiny_llama,
)

TWO_OF_FOUR = PatternConfig(name="2of4", n=2, m=4)


def _module(d_out=32, d_in=24, rank=4, dtype=torch.float64, semi="off", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, dtype=dtype)
    mask = mask_from_scores(linear.weight.detach().abs(), 0.5, TWO_OF_FOUR)  # magnitude 2:4 = M_R
    with torch.no_grad():
        linear.weight.mul_(mask)
    module = SLoPeLinear(linear.to(device), mask, rank, 1.0 / rank, 0.0, semi, g)
    with torch.no_grad():
        module.lora_U.normal_(generator=g)
    return module.to(device), mask


def test_row_and_column_masks_are_2of4_both_ways():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    m_r = mask_from_scores(w.abs(), 0.5, TWO_OF_FOUR)
    m_c = column_mask(w * m_r)
    assert nm_valid(m_r, 2, 4) and nm_valid(m_c.t(), 2, 4)
    both = m_r & m_c
    assert nm_valid(both, 2, 4) and nm_valid(both.t(), 2, 4)
    assert abs(float(both.float().mean()) - 26 / 64) < 0.01  # 40.6 % on random weights (docs/methods.md §SLoPe masks)


def test_forward_and_double_pruned_backward():
    module, m_r = _module()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 32, dtype=torch.float64)
    out = module(x)
    out.backward(dy)
    w, s = module.weight.detach(), module.scaling
    U, V = module.lora_U.detach().double(), module.lora_V.detach().double()
    torch.testing.assert_close(out, x @ (w * m_r).T + module.bias + s * (x @ V.T) @ U.T, rtol=1e-12, atol=1e-12)
    w_dp = w * m_r * module.mask_col
    torch.testing.assert_close(x.grad, dy @ w_dp + s * (dy @ U) @ V, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(x.grad, dy @ w + s * (dy @ U) @ V)  # the approximation is real
    # adapter gradients: plain LoRA's
    Ur, Vr = U.clone().requires_grad_(True), V.clone().requires_grad_(True)
    (x.detach() @ w.T + s * (x.detach() @ Vr.T) @ Ur.T).backward(dy)
    torch.testing.assert_close(module.lora_U.grad, Ur.grad.float())
    torch.testing.assert_close(module.lora_V.grad, Vr.grad.float())
    assert module.weight.grad is None


def test_slope_needs_a_2of4_base():
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    with pytest.raises(ConfigError, match="slope needs pattern=2of4"):
        build_method(MethodSpec(name="slope")).attach(model, masks, context())


def test_semi_structured_on_without_cuda_is_a_clear_error():
    module, _ = _module(semi="on")
    with pytest.raises(ConfigError, match="semi_structured=on cannot run: the input is not on a CUDA device"):
        module(torch.randn(2, 24, dtype=torch.float64))


def test_merge_is_dense_and_recorded():
    method = build_method(MethodSpec(name="slope"))
    assert method.preserves_sparsity is False
    assert method.describe()["merge"].startswith("dense")
    assert method.describe()["scaling_value"] == pytest.approx(1 / 16)


@pytest.mark.gpu
def test_semi_structured_kernels_match_masked_dense_gemms():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse kernels need compute capability 8.0+")
    dense, _ = _module(d_out=256, d_in=128, rank=8, dtype=torch.bfloat16, semi="off", device="cuda")
    sparse, _ = _module(d_out=256, d_in=128, rank=8, dtype=torch.bfloat16, semi="on", device="cuda")
    x = torch.randn(4, 64, 128, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn(4, 64, 256, dtype=torch.bfloat16, device="cuda")
    grads = []
    for module in (dense, sparse):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(dy)
        grads.append((out.float(), xi.grad.float(), module.lora_U.grad, module.lora_V.grad))
    assert sparse._sparse is not None  # the compressed weights were used
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=5e-2)
