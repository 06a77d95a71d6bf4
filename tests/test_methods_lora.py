"""LoRA's `merge=remask` (docs/methods.md §Merge and sparsity, option 2): sparse again after merging, at a measurable
cost."""
from __future__ import annotations

import torch

from lorsbench.config import MethodSpec
from lorsbench.method import build_method
from lorsbench.modules import target_linears

from tests.methods_helpers import (  # noqa: F401 (single_thread is an autouse fixture)
    TARGETS, batches, context, logits, random_masks, single_thread, tiny_llama,
)


def _trained(merge: str):
    model = tiny_llama()
    masks = random_masks(model, "unstructured")
    method = build_method(MethodSpec(name="lora", params={"merge": merge}))
    params = method.attach(model, masks, context())
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)
    return model, masks, method


def test_remask_merge_is_sparse_and_differs_by_exactly_the_pruned_part_of_the_update():
    model, masks, method = _trained("remask")
    ids = batches(1)[0]["input_ids"]
    unmerged = logits(model, ids)
    deltas = {}
    for name, module in target_linears(model, TARGETS).items():
        deltas[name] = module.scaling * (module.lora_U.double() @ module.lora_V.double())
    weights = {name: m.weight.clone() for name, m in target_linears(model, TARGETS).items()}
    model = method.merge(model)
    for name, linear in target_linears(model, TARGETS).items():
        assert torch.all(linear.weight[~masks[name]] == 0)
        torch.testing.assert_close(linear.weight, (weights[name] + deltas[name]) * masks[name], rtol=1e-13, atol=1e-13)
    merged = logits(model, ids)
    assert (merged - unmerged).abs().max() > 1e-3  # the accuracy cost of re-masking is real


def test_dense_merge_equals_unmerged_and_is_dense():
    model, masks, method = _trained("dense")
    ids = batches(1)[0]["input_ids"]
    unmerged = logits(model, ids)
    model = method.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-10, atol=1e-10)
    weight = model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert float((weight == 0).float().mean()) < 0.01  # sparsity lost (docs/methods.md §Merge and sparsity)


def test_only_methods_that_train_with_the_mask_keep_it_on_the_device():
    """Plain LoRA and SPP never read the mask in training: no d_out x d_in mask buffer (6.5 GiB at Llama-3-8B);
    LoRS takes it from W != 0 by default and keeps it only with mask_source=stored; SQFT and sparse full
    fine-tuning keep it. remask keeps a host copy for the merge."""
    for name, params, keeps in [("lora", {}, False), ("lora", {"merge": "remask"}, False), ("spp", {}, False),
                                ("lors", {"init": "lora"}, False), ("lors", {"init": "lora", "mask_source": "stored"}, True),
                                ("lors_exact", {"init": "lora"}, False), ("sqft", {}, True),
                                ("full_sparse_ft", {}, True)]:
        model = tiny_llama()
        masks = random_masks(model, "unstructured")
        build_method(MethodSpec(name=name, params=params)).attach(model, masks, context())
        for target, module in target_linears(model, TARGETS).items():
            buffers = dict(module.named_buffers())
            assert ("mask" in buffers) == keeps, (name, params)
            if keeps:
                assert torch.equal(buffers["mask"], masks[target])
        remask_copy = getattr(module, "merge_mask", None)
        assert (remask_copy is not None) == (params.get("merge") == "remask")
        if remask_copy is not None:
            assert remask_copy.device.type == "cpu" and torch.equal(remask_copy, masks[target].cpu())
