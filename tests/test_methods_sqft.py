"""SQFT (docs/methods.md §SQFT, §Invariants): SparsePEFT gradients, QA-SparsePEFT (INT4 + STE) and NLS elastic ranks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorsbench.config import MethodSpec
from lorsbench.method import build_method
from lorsbench.methods._lors import lors_linear
from lorsbench.methods.sqft import PackedInt4, SQFTLinear, int4_params
from lorsbench.modules import decoder_layers, target_linears

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    TARGETS, batches, context, logits, random_masks, single_thread, tiny_llama,
)

D_OUT, D_IN, RANK, S = 24, 40, 4, 2.0


def _module(quantize="none", group_size=16, rank=RANK, seed=0, mask_density=0.5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(D_OUT, D_IN, generator=g) < mask_density
    linear = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.mul_(mask)
    module = SQFTLinear(linear, mask, rank, S, 0.0, quantize, group_size, rank, g)
    with torch.no_grad():
        module.lora_U.normal_(std=0.02, generator=g)
        module.lora_V.normal_(std=0.5, generator=g)
    return module, linear.weight.detach().clone(), linear.bias.detach().clone(), mask


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, D_IN, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 5, D_OUT, generator=g, dtype=torch.float64))


def test_sparsepeft_gradients_match_closed_form_and_masked_autograd():
    module, weight, bias, mask = _module()
    x, dy = _inputs()
    out = module(x)
    out.backward(dy)
    U, V = module.lora_U.detach().double(), module.lora_V.detach().double()
    torch.testing.assert_close(out, x @ weight.T + bias + x @ ((S * U @ V) * mask).T, rtol=1e-12, atol=1e-12)
    G = dy.reshape(-1, D_OUT).T @ x.detach().reshape(-1, D_IN)  # docs/methods.md §SQFT
    torch.testing.assert_close(module.lora_U.grad, (S * (G * mask) @ V.T).float())
    torch.testing.assert_close(module.lora_V.grad, (S * U.T @ (G * mask)).float())
    torch.testing.assert_close(x.grad, dy @ (weight + (S * U @ V) * mask), rtol=1e-12, atol=1e-12)
    # same function and gradient as the single-GEMM exact operator
    Ux, Vx, xx = (t.detach().clone().requires_grad_(True) for t in (U, V, x))
    lors_linear(xx, weight, Ux, Vx, mask, S, bias, exact=True).backward(dy)
    torch.testing.assert_close(Ux.grad.float(), module.lora_U.grad)
    torch.testing.assert_close(Vx.grad.float(), module.lora_V.grad)


def _reference_quantize(w, base, group_size):
    """INT4 of `w` with per-row, per-group asymmetric min-max scales/zero points of the frozen `base`
    (docs/methods.md §SQFT QA-SparsePEFT), written out with loops, independent of the module."""
    out = torch.empty_like(w)
    codes = torch.empty_like(w)
    for i in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            block = w[i, start:start + group_size]
            ref = base[i, start:start + group_size]
            lo, hi = min(float(ref.min()), 0.0), max(float(ref.max()), 0.0)
            if lo == hi == 0.0:
                lo, hi = -1.0, 1.0
            scale = (hi - lo) / 15
            zero = round(-lo / scale)
            q = torch.clamp(torch.round(block / scale) + zero, 0, 15)
            codes[i, start:start + group_size] = q
            out[i, start:start + group_size] = scale * (q - zero)
    return codes, out


def test_qa_forward_zeros_merge_and_packing():
    module, weight, bias, mask = _module("int4", group_size=16)  # d_in 40: a ragged last group of 8
    U, V = module.lora_U.detach().double(), module.lora_V.detach().double()
    w_m = weight + (S * U @ V) * mask
    codes, q_w_m = _reference_quantize(w_m, weight, 16)
    clamped = int(((codes == 0) | (codes == 15)).sum())
    assert 0 < clamped < codes.numel() // 2  # group extremes and a few saturated values, not most
    x, _ = _inputs()
    torch.testing.assert_close(module(x), x @ q_w_m.T + bias, rtol=1e-12, atol=1e-12)
    assert torch.all(q_w_m[~mask] == 0)  # zeros survive: integer zero point
    merged = module.merged_weight()
    assert torch.all(merged[~mask] == 0)
    torch.testing.assert_close(merged, q_w_m, rtol=1e-13, atol=1e-13)
    packed = module.pack_int4()
    assert packed.qweight.dtype == torch.uint8 and packed.qweight.shape == (D_OUT, D_IN // 2)
    assert torch.equal(packed.codes().double(), codes)
    assert torch.equal(packed.dequantize(), merged)  # bit-equal to the training forward's Q(W_m)
    assert packed.nbytes() < weight.numel() * 2  # smaller than the fp16 weight


def test_qa_straight_through_gradient_equals_sparsepeft_gradient():
    qa, *_ = _module("int4", group_size=8, seed=3)
    plain, *_ = _module("none", seed=3)
    x, dy = _inputs(4)
    qa(x).backward(dy)
    plain(x.detach()).backward(dy)
    torch.testing.assert_close(qa.lora_U.grad, plain.lora_U.grad)
    torch.testing.assert_close(qa.lora_V.grad, plain.lora_V.grad)


def test_int4_params_edge_cases():
    w = torch.zeros(2, 10, dtype=torch.float64)
    w[1, :5] = torch.tensor([0.5, -0.25, 0.0, 1.0, 0.1], dtype=torch.float64)
    scales, zeros = int4_params(w, 5)  # an all-zero group and a mixed group
    assert torch.all(scales > 0) and torch.all((zeros >= 0) & (zeros <= 15))
    packed = PackedInt4.pack(torch.arange(15).reshape(1, 15) % 16, scales[:1, :1], zeros[:1, :1], 15)
    assert torch.equal(packed.codes(), torch.arange(15, dtype=torch.uint8).reshape(1, 15))  # odd width


def test_qa_model_merge_keeps_packed_weights():
    model = tiny_llama()
    masks = random_masks(model, "2of4")
    method = build_method(MethodSpec(name="sqft", params={"quantize": "int4", "quant_group_size": 32, "rank": 4}))
    params = method.attach(model, masks, context())
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    ids = batches(1)[0]["input_ids"]
    unmerged = logits(model, ids)
    model = method.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-12, atol=1e-12)
    assert set(method.packed_int4) == set(target_linears(model, TARGETS))
    for name, linear in target_linears(model, TARGETS).items():
        assert torch.equal(method.packed_int4[name].dequantize(), linear.weight)
        assert torch.all(linear.weight[~masks[name]] == 0)


def test_nls_sub_adapter_equals_plain_adapter():
    super_adapter, weight, bias, mask = _module(rank=8, seed=5)
    x, _ = _inputs()
    super_adapter.train()
    super_adapter.active_rank = 4
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    plain = SQFTLinear(linear, mask, 4, S, 0.0, "none", 16, 4, g)  # same s: NLS keeps alpha / r_max
    with torch.no_grad():
        plain.lora_U.copy_(super_adapter.lora_U[:, :4])
        plain.lora_V.copy_(super_adapter.lora_V[:4])
    torch.testing.assert_close(super_adapter(x), plain(x), rtol=0, atol=0)


def test_nls_ranks_sampled_per_layer_shared_within_layer_and_median_at_merge():
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    method = build_method(MethodSpec(name="sqft", params={"rank": 8, "alpha": 16, "nls": True,
                                                           "nls_space": [8, 6, 4], "dropout": 0.0}))
    method.attach(model, masks, context())
    assert method.describe()["nls_merge_rank"] == 6
    layers = decoder_layers(model)
    seen = set()
    model.train()
    for batch in batches(12):
        model(**batch)
        ranks = [[layer.get_submodule(f"self_attn.{p}").active_rank for p in ("q_proj", "k_proj", "v_proj")]
                 for layer in layers]
        for per_layer in ranks:
            assert len(set(per_layer)) == 1 and per_layer[0] in (8, 6, 4)
        seen.add(tuple(r[0] for r in ranks))
        for layer in layers:  # modules outside nls_targets keep r_max
            assert layer.get_submodule("mlp.up_proj").active_rank == 8
    assert len(seen) > 1 and any(a != b for a, b in seen)  # independent per layer, varies over steps
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    model.eval()
    ids = batches(1)[0]["input_ids"]
    unmerged = logits(model, ids)
    q = layers[0].self_attn.q_proj
    heuristic = q.weight + (q.scaling * q.lora_U[:, :6].double() @ q.lora_V[:6].double()) * q.mask
    model = method.merge(model)
    assert all(not layer._forward_pre_hooks for layer in layers)
    torch.testing.assert_close(layers[0].self_attn.q_proj.weight, heuristic, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-12, atol=1e-12)


def test_nls_space_outside_rank_is_refused():
    with pytest.raises(Exception, match=r"nls_space \[64, 32\] must be"):
        build_method(MethodSpec(name="sqft", params={"nls": True, "nls_space": [64, 32]}))
