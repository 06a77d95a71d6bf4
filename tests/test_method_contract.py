"""The contract every registered method must meet (docs/methods.md §Invariants), on a tiny float64 LLaMA with a stored
unstructured 50 % mask and a stored 2:4 mask: identity at init, only adapter parameters train, the base stays
bit-identical, merge gives a plain HF model computing the unmerged function, and sparsity-preserving methods keep
every pruned weight exactly zero (and N:M groups valid)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorsbench.config import ConfigError, MethodSpec
from lorsbench.method import build_method, list_methods
from lorsbench.methods._adapter import AdapterLinear
from lorsbench.modules import target_linears
from lorsbench.pruning.masks import nm_valid

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    PATTERNS, TARGETS, batches, context, logits, random_masks, single_thread, tiny_llama,
)

METHODS = list_methods()
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def test_every_method_of_the_issue_is_registered():
    assert {"none", "lora", "spp", "sqft", "lors", "lors_exact", "slope"} <= set(METHODS)


@pytest.mark.parametrize("pattern", ["unstructured", "2of4"])
@pytest.mark.parametrize("name", METHODS)
def test_contract(name, pattern):
    model = tiny_llama()
    masks = random_masks(model, pattern)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model, IDS)
    method = build_method(MethodSpec(name=name))
    assert isinstance(method.describe(), dict)

    if name == "slope" and pattern != "2of4":
        with pytest.raises(ConfigError, match="slope needs pattern=2of4"):
            method.attach(model, masks, context())
        assert not any(isinstance(m, AdapterLinear) for m in model.modules())  # nothing half-attached
        return

    params = method.attach(model, masks, context())

    # identity at init (U = 0, β = 0, R = 0)
    torch.testing.assert_close(logits(model, IDS), reference, rtol=0, atol=1e-12)

    # only the adapter parameters train, as float32 masters; a method that trains the pruned base weights
    # themselves (full sparse fine-tuning) must keep their pruned positions at exactly zero instead
    trainable = {id(p) for p in params}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    own_weights = {id(m.weight): n + ".weight" for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    trained_bases = {own_weights[id(p)] for p in params if id(p) in own_weights}
    base_names = set(state_before) - trained_bases
    for pname, p in model.named_parameters():
        if id(p) in trainable and pname not in trained_bases:
            assert pname not in base_names, f"{pname} is a base parameter but trains"
            assert p.dtype == torch.float32, f"{pname}: adapters keep float32 masters"
    if name == "none":
        assert params == []
    else:
        assert params, "a fine-tuning method must train something"

    # a few optimizer steps: base bit-identical, adapters moved, output changed
    if params:
        model.train()
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for batch in batches(3):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        model.eval()
    for key, value in model.state_dict().items():
        if key in base_names:
            assert torch.equal(value, state_before[key]), f"{key} changed during training"
        elif key in trained_bases:
            assert torch.all(value[~masks[key.removesuffix(".weight")]] == 0), f"{key}: a pruned weight trained"
    unmerged = logits(model, IDS)
    if params:
        assert not torch.allclose(unmerged, reference, atol=1e-6), "training left the output unchanged"

    # merge: a plain HF model with the original parameter names, computing the unmerged function
    model = method.merge(model)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for m in target_linears(model, TARGETS).values())
    assert set(model.state_dict()) == set(state_before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("proj.weight"))
    torch.testing.assert_close(logits(model, IDS), unmerged, rtol=1e-10, atol=1e-10)

    if method.preserves_sparsity:
        spec = PATTERNS[pattern]
        for module_name, linear in target_linears(model, TARGETS).items():
            weight = linear.weight
            assert torch.all(weight[~masks[module_name]] == 0), f"{module_name}: pruned weight became non-zero"
            if spec.is_nm:
                assert nm_valid(weight, spec.n, spec.m)
            if name != "none":
                assert not torch.equal(weight, state_before[module_name + ".weight"])


@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"])
def test_bfloat16_training_step(name):
    """Real-dtype smoke: bf16 base and activations, float32 masters with float32 gradients, finite loss."""
    model = tiny_llama(torch.bfloat16)
    masks = random_masks(model, "2of4")
    params = build_method(MethodSpec(name=name)).attach(model, masks, context())
    model.train()
    loss = model(**batches(1)[0]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in params)
    assert any(bool(p.grad.abs().sum() > 0) for p in params)


def test_unpruned_base_weight_is_refused():
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    with torch.no_grad():
        model.get_submodule("model.layers.0.self_attn.q_proj").weight.add_(1.0)
    with pytest.raises(ValueError, match="apply the masks"):
        build_method(MethodSpec(name="lors")).attach(model, masks, context())


def test_unknown_option_is_one_clear_error():
    with pytest.raises(ConfigError, match="did you mean 'grad_scale'"):
        build_method(MethodSpec(name="lors", params={"grad_scal": "s"}))
    with pytest.raises(ConfigError, match="quantize must be one of"):
        build_method(MethodSpec(name="sqft", params={"quantize": "int3"}))


@pytest.mark.gpu
@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"])
def test_cuda_bfloat16_training_step_and_merge(name):
    """GPU tier: the same bf16 step on CUDA (LoRS's Triton kernel and SLoPe's 2:4 kernels where they apply),
    then merge with the sparsity check."""
    model = tiny_llama(torch.bfloat16)
    masks = random_masks(model, "2of4")
    model.cuda()
    ctx = context()
    ctx.device = torch.device("cuda")
    method = build_method(MethodSpec(name=name))
    params = method.attach(model, masks, ctx)
    model.train()
    batch = {k: v.cuda() for k, v in batches(1)[0].items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.is_cuda and p.grad.dtype == p.dtype for p in params)
    if name == "slope":
        assert any(getattr(m, "_sparse", None) is not None for m in model.modules())
    model = method.merge(model)
    if method.preserves_sparsity:
        for module_name, linear in target_linears(model, TARGETS).items():
            assert torch.all(linear.weight[~masks[module_name].cuda()] == 0)
            assert nm_valid(linear.weight, 2, 4)


@pytest.mark.parametrize("name", METHODS)
def test_method_yaml_builds_its_config(compose, name):
    """conf/method/<name>.yaml composes through Hydra and every key is a field of the method's Config."""
    from lorsbench.config import build_run_config

    cfg = build_run_config(compose([f"method={name}", "pattern=2of4"]))
    method = build_method(cfg.method)
    described = method.describe()
    for key, value in cfg.method.params.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert described[key] == expected, key
