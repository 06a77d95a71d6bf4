"""Every method and option against an independent float64 formula of its paper (docs/methods.md; issue 14).

Each case builds the method as the CLI does (conf/method/<name>.yaml composed by Hydra, build_run_config,
build_method), attaches it to a tiny float64 decoder whose target linears carry a bias, and compares the forward
output, every gradient (dX and each trainable parameter) and the merged weight after one SGD step with the
formula written here in plain torch ops on float64 copies; no project function computes a reference. Dropout runs
in train mode under a fixed seed and its keep-mask is redrawn here. tests/README.md lists the bugs these catch.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorsbench.config import build_run_config
from lorsbench.method import MethodContext, build_method
from lorsbench.pruning.masks import MaskSet

D_IN, D_OUT, LAYERS = 32, 48, 2
NAMES = ("q_proj", "k_proj", "v_proj", "up_proj")  # called in this order by Block.forward
X_SHAPE = (2, 5, D_IN)
LR = 0.1
FORWARD_REL = 1e-12  # float64 throughout (float32 masters are cast up exactly)
GRAD_REL = 1e-6  # parameter gradients are returned in the masters' float32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        for name in NAMES[:3]:
            setattr(self.self_attn, name, nn.Linear(D_IN, D_OUT, dtype=torch.float64))
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(D_IN, D_OUT, dtype=torch.float64)

    def targets(self) -> list[nn.Module]:
        return [self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj, self.mlp.up_proj]

    def forward(self, x):
        return torch.cat([m(x) for m in self.targets()], dim=-1)


class TinyDecoder(nn.Module):
    """`model.layers[i]` of blocks with biased q/k/v/up projections (a LLaMA-style path, so NLS finds layers)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.model.layers], dim=-1)


def module_names() -> list[str]:
    return [f"model.layers.{i}.{'mlp' if n == 'up_proj' else 'self_attn'}.{n}" for i in range(LAYERS) for n in NAMES]


def stored_masks(model: nn.Module, pattern: str, seed: int = 1) -> MaskSet:
    """Random keep-masks (unstructured 50 %, or 2 of every 4 consecutive inputs), applied to the weights; the first
    kept weight of each target is set to exactly 0, so the stored mask and `W != 0` differ
    (docs/methods.md §Invariants, item 7)."""
    g = torch.Generator().manual_seed(seed)
    masks = MaskSet()
    for name in module_names():
        scores = torch.rand(D_OUT, D_IN, generator=g)
        if pattern == "2of4":
            ranks = scores.reshape(D_OUT, D_IN // 4, 4).argsort(-1).argsort(-1)
            masks[name] = (ranks >= 2).reshape(D_OUT, D_IN)
        else:
            masks[name] = scores >= scores.flatten().median()
        with torch.no_grad():
            weight = model.get_submodule(name).weight
            weight.mul_(masks[name])
            row, col = masks[name].nonzero()[0]
            weight[row, col] = 0.0
    return masks


def keep_of(params: dict, weight: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """The mask the method trains with: `W != 0` under `mask_source=weight` (LoRS default), else the stored one."""
    return weight != 0 if params.get("mask_source") == "weight" else stored


# -- the gradient-SVD estimate's data: a planted gradient per target with a clear gap after rank `GAP_RANK` ----

GAP_RANK = 16


def planted_gradient(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C = P diag(σ) Qᵀ (d_out×d_in), σ: 40..28 (4), 10..5 (12), 1..0.1 (16): clear gaps after ranks 4 and 16.
    Returns C and Q (d_in×d_in)."""
    g = torch.Generator().manual_seed(100 + index)
    P, _ = torch.linalg.qr(torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.linspace(40.0, 28.0, 4), torch.linspace(10.0, 5.0, GAP_RANK - 4),
                       torch.linspace(1.0, 0.1, D_IN - GAP_RANK)])
    return (P * sigma.to(torch.float64)) @ Q.T, Q


def estimate_batches() -> list[dict[str, torch.Tensor]]:
    """Batches of 8 examples × 4 tokens whose flattened input is I_32, so the mean of dYᵀX over the first 16
    examples (2 batches) is exactly the planted C of each target; a third batch must not be read."""
    x = torch.eye(D_IN, dtype=torch.float64).reshape(8, 4, D_IN)
    blocks = [[], [], []]
    for index in range(len(module_names())):
        C, _ = planted_gradient(index)
        noise = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(200 + index), dtype=torch.float64)
        for block, G in zip(blocks, (C + noise, C - noise, 100 * noise)):
            block.append(G.T.reshape(8, 4, D_OUT))
    return [{"x": x, "dy": torch.cat(block, dim=-1)} for block in blocks]


def linear_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) * batch["dy"]).sum()


def method_context() -> MethodContext:
    data = estimate_batches()
    return MethodContext(targets=NAMES, device=torch.device("cpu"), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0), train_batches=lambda: iter(data),
                         loss_fn=linear_loss)


# -- building through the user path -------------------------------------------------------------------------


def method_spec(compose, name: str, overrides: list[str], pattern: str):
    overrides = [f"method={name}", f"pattern={pattern}", f"targets=[{','.join(NAMES)}]", *overrides]
    return build_run_config(compose(overrides)).method


def scale_of(params: dict) -> float:
    """s from the config, written out: alpha/r, alpha/sqrt(r) or 1 (docs/methods.md §Scaling)."""
    kind, alpha, rank = params["scaling"], float(params["alpha"]), params["rank"]
    return {"alpha_over_r": alpha / rank, "alpha_over_sqrt_r": alpha / math.sqrt(rank), "one": 1.0}[kind]


def roles(name: str, params: dict) -> dict[tuple[int, ...], str]:
    """Each trainable parameter's role, recognised by its shape (not by attribute names)."""
    if name == "spp":
        return {(params["rows"], D_IN): "alpha", (D_OUT,): "beta"}
    if name == "full_sparse_ft":
        return {(D_OUT, D_IN): "W"}
    if name == "none":
        return {}
    return {(D_OUT, params["rank"]): "U", (params["rank"], D_IN): "V"}


def trainable_by_role(module: nn.Module, role_of: dict) -> dict[str, nn.Parameter]:
    found = {}
    for p in module.parameters():
        if p.requires_grad:
            role = role_of.get(tuple(p.shape))
            assert role is not None and role not in found, f"unexpected trainable parameter of shape {tuple(p.shape)}"
            found[role] = p
    assert set(found) == set(role_of.values()), f"trainable {sorted(found)}, expected {sorted(role_of.values())}"
    return found


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    actual = actual.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = float((actual - expected).abs().max())
    bound = rel * max(float(expected.abs().max()), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} (|expected| max {float(expected.abs().max()):.3e})"


def keep_mask(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """The dropout scale D(X) / X drawn as nn.Dropout draws it on CPU: Bernoulli(1 - p) / (1 - p), after
    seeding the global generator with `seed` (None: the next draw of the current stream)."""
    if p == 0:
        return torch.ones_like(x)
    if seed is not None:
        torch.manual_seed(seed)
    return torch.empty_like(x).bernoulli_(1 - p) / (1 - p)


def test_keep_mask_redraws_nn_dropout():
    """The premise of every dropout check below: the redrawn keep-mask is nn.Dropout's, bit for bit."""
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    torch.manual_seed(7)
    dropped = nn.Dropout(0.1).train()(x)
    assert torch.equal(dropped, x * keep_mask(x, 0.1, 7))


# -- the formulas (docs/methods.md, a section per method); t: float64 copies; returns out, dX, grads, merged(params) --


def int4_dequantize(w: torch.Tensor, base: torch.Tensor, group: int) -> torch.Tensor:
    """Q(w) with per-(row, group of `group` inputs) asymmetric INT4 min-max scales/zeros of the frozen base,
    the range widened to include 0 (docs/methods.md §SQFT QA-SparsePEFT), written column group by column group."""
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group):
        cols = slice(start, start + group)
        low = base[:, cols].amin(1).clamp(max=0)
        high = base[:, cols].amax(1).clamp(min=0)
        empty = (low == 0) & (high == 0)
        low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
        scale = ((high - low) / 15)[:, None]
        zero = torch.round(-low[:, None] / scale).clamp(0, 15)
        q = torch.clamp(torch.round(w[:, cols] / scale) + zero, 0, 15)
        out[:, cols] = scale * (q - zero)
    return out


def column_two_of_four(w_s: torch.Tensor) -> torch.Tensor:
    """M_C: per input column, the 2 largest |W_s| of each 4 consecutive output rows (docs/methods.md §SLoPe masks)."""
    groups = w_s.abs().reshape(D_OUT // 4, 4, D_IN)
    top2 = groups.topk(2, dim=1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top2, True).reshape(D_OUT, D_IN)


def formula(name: str, params: dict, t: dict, x: torch.Tensor, dy: torch.Tensor, keep: torch.Tensor, rank=None):
    """Forward, dX, parameter gradients and `merged(t)` of method `name` at float64 copies `t` (W, b, M and the
    trainable roles). `keep` = D(X)/X. `rank` slices U, V for NLS (scaling stays alpha / r_max)."""
    W, b, M = t["W"], t["b"], t["M"].to(torch.float64)
    x2, dy2, k2 = x.reshape(-1, D_IN), dy.reshape(-1, D_OUT), keep.reshape(-1, D_IN)
    xd2 = x2 * k2
    base_out = x2 @ W.T + b
    G = dy2.T @ xd2  # gradient w.r.t. the adapter branch's effective weight
    grads: dict[str, torch.Tensor] = {}
    if name == "none":
        out, dx = base_out, dy2 @ W
        merged = lambda t: t["W"]
    elif name == "full_sparse_ft":  # docs/methods.md §Full sparse fine-tuning: dW = G ⊙ M on the fixed mask
        out, dx = base_out, dy2 @ W
        grads["W"] = (dy2.T @ x2) * M
        merged = lambda t: t["W"] * t["M"]
    elif name == "spp":  # docs/methods.md §SPP, §SPP gradients
        s, rows = scale_of(params), params["rows"]
        group_of = torch.arange(D_OUT) // (D_OUT // rows)
        rep = t["alpha"][group_of]
        delta = t["beta"][:, None] * rep * W
        out = base_out + s * xd2 @ delta.T
        dx = dy2 @ W + s * (dy2 @ delta) * k2
        P = G * W
        grads["beta"] = s * (P * rep).sum(1)
        grads["alpha"] = torch.zeros_like(t["alpha"]).index_add_(0, group_of, s * P * t["beta"][:, None])
        merged = lambda t: t["W"] * (1 + s * t["beta"][:, None] * t["alpha"][group_of])
    else:
        s = scale_of(params)
        r = rank or params["rank"]
        U, V = t["U"][:, :r], t["V"][:r]
        grad_U, grad_V = torch.zeros_like(t["U"]), torch.zeros_like(t["V"])
        if name == "lora":  # docs/methods.md §LoRA
            out = base_out + s * (xd2 @ V.T) @ U.T
            dx = dy2 @ W + s * (dy2 @ U @ V) * k2
            grad_U[:, :r], grad_V[:r] = s * dy2.T @ (xd2 @ V.T), s * (dy2 @ U).T @ xd2
            remask = params["merge"] == "remask"
            merged = lambda t: (t["W"] + s * t["U"] @ t["V"]) * (t["M"] if remask else 1)
        elif name == "sqft" and params["quantize"] == "int4":  # docs/methods.md §SQFT QA-SparsePEFT
            group = params["quant_group_size"]
            w_q = int4_dequantize(W + (s * U @ V) * M, W, group)
            out = xd2 @ w_q.T + b
            dx = (dy2 @ w_q) * k2
            grad_U[:, :r], grad_V[:r] = s * (G * M) @ V.T, s * U.T @ (G * M)
            merged = lambda t: int4_dequantize(t["W"] + (s * t["U"][:, :r] @ t["V"][:r]) * t["M"], t["W"], group)
        elif name == "sqft":  # docs/methods.md §SQFT
            delta = (s * U @ V) * M
            out = base_out + xd2 @ delta.T
            dx = dy2 @ W + (dy2 @ delta) * k2
            grad_U[:, :r], grad_V[:r] = s * (G * M) @ V.T, s * U.T @ (G * M)
            merged = lambda t: t["W"] + (s * t["U"][:, :r] @ t["V"][:r]) * t["M"]
        elif name in ("lors", "lors_exact"):  # docs/methods.md §LoRS forward, §LoRS backward
            w_eff = (W + s * U @ V) * M
            out = x2 @ w_eff.T + b
            dx = dy2 @ w_eff
            if name == "lors_exact":
                grad_U[:, :r], grad_V[:r] = s * (G * M) @ V.T, s * U.T @ (G * M)
            else:
                g = s if params["grad_scale"] == "s" else 1.0
                grad_U[:, :r], grad_V[:r] = g * G @ V.T, g * U.T @ G
            merged = lambda t: (t["W"] + s * t["U"] @ t["V"]) * t["M"]
        elif name == "slope":  # docs/methods.md §SLoPe backward: double-pruned dX through the base only
            out = base_out + s * (xd2 @ V.T) @ U.T
            dx = dy2 @ (W * column_two_of_four(W)) + s * (dy2 @ U @ V) * k2
            grad_U[:, :r], grad_V[:r] = s * dy2.T @ (xd2 @ V.T), s * (dy2 @ U).T @ xd2
            merged = lambda t: t["W"] + s * t["U"] @ t["V"]
        else:
            raise AssertionError(f"no formula for {name}")
        grads["U"], grads["V"] = grad_U, grad_V
    return out.reshape(*x.shape[:-1], D_OUT), dx.reshape(x.shape), grads, merged


def merged_formula(name: str, params: dict, t: dict, rank=None) -> torch.Tensor:
    """The merged weight of `formula` at the (post-step) float64 copies `t`."""
    x, dy = torch.zeros(1, D_IN, dtype=torch.float64), torch.zeros(1, D_OUT, dtype=torch.float64)
    return formula(name, params, t, x, dy, torch.ones_like(x), rank=rank)[3](t)


# -- one method, every module: forward, every gradient, merge after an SGD step --------------------------------

CASES = [
    ("none", []),
    ("full_sparse_ft", []),
    ("lora", []),
    ("lora", ["method.dropout=0.1"]),
    ("lora", ["method.merge=remask"]),
    ("lora", ["method.scaling=alpha_over_sqrt_r"]),
    ("lora", ["method.scaling=one", "method.rank=8"]),
    ("spp", []),  # dropout 0.05
    ("spp", ["method.form=grouped"]),
    ("spp", ["method.dropout=0.0", "method.alpha=24"]),
    ("sqft", []),  # dropout 0.1
    ("sqft", ["method.quantize=int4"]),  # one group: 128 > d_in
    ("sqft", ["method.quantize=int4", "method.quant_group_size=12"]),  # groups of 12, 12, 8
    ("lors", []),  # grad_scale=one, init=grad_svd, mask_source=weight
    ("lors", ["method.grad_scale=s"]),
    ("lors", ["method.init=lora"]),
    ("lors", ["method.mask_source=stored", "method.kernel=torch"]),
    ("lors", ["method.scaling=alpha_over_r", "method.alpha=24"]),
    ("lors_exact", []),
    ("lors_exact", ["method.init=lora", "method.mask_source=stored"]),
    ("slope", []),
    ("slope", ["method.dropout=0.1", "method.semi_structured=off"]),
]


def _case_id(case):
    name, overrides = case
    return name + "".join(f"[{o.removeprefix('method.')}]" for o in overrides)


def float64_copy(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {role: p.detach().to(torch.float64).clone() for role, p in params.items()}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_method_matches_its_formula(compose, case):
    name, overrides = case
    pattern = "2of4" if name == "slope" else "unstructured"
    spec = method_spec(compose, name, overrides, pattern)
    params = spec.params
    model = TinyDecoder()
    masks = stored_masks(model, pattern)
    base = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone())
            for n in module_names()}
    method = build_method(spec)
    trainable = method.attach(model, masks, method_context())
    role_of = roles(name, params)
    p_drop = float(params.get("dropout", 0.0))
    g = torch.Generator().manual_seed(3)
    by_module = {}
    with torch.no_grad():  # a generic point after some training: every factor non-zero
        for n in module_names():
            by_module[n] = trainable_by_role(model.get_submodule(n), role_of)
            for role, p in by_module[n].items():
                if role != "W":
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if role in ("V", "alpha") else 0.05))
    assert {id(p) for ps in by_module.values() for p in ps.values()} == {id(p) for p in trainable}

    model.train()
    for i, n in enumerate(module_names()):
        module = model.get_submodule(n)
        x = torch.randn(*X_SHAPE, generator=g, dtype=torch.float64).requires_grad_(True)
        dy = torch.randn(*X_SHAPE[:-1], D_OUT, generator=g, dtype=torch.float64)
        t = {"W": base[n][0], "b": base[n][1], "M": keep_of(params, base[n][0], masks[n]),
             **float64_copy(by_module[n])}
        torch.manual_seed(1000 + i)
        out = module(x)
        out.backward(dy)
        keep = keep_mask(x, p_drop, 1000 + i)
        exp_out, exp_dx, exp_grads, _ = formula(name, params, t, x.detach(), dy, keep)
        assert_rel(out, exp_out, FORWARD_REL, f"{n} forward (train mode)")
        assert_rel(x.grad, exp_dx, FORWARD_REL, f"{n} dX")
        for role, p in by_module[n].items():
            assert p.grad is not None, f"{n}: no gradient for {role}"
            assert_rel(p.grad, exp_grads[role], GRAD_REL if p.dtype == torch.float32 else FORWARD_REL, f"{n} d{role}")
        module.eval()
        with torch.no_grad():
            eval_out = module(x)
        module.train()
        assert_rel(eval_out, formula(name, params, t, x.detach(), dy, torch.ones_like(x))[0], FORWARD_REL,
                   f"{n} forward (eval mode: no dropout)")

    if trainable:
        torch.optim.SGD(trainable, lr=LR).step()
    expected = {n: merged_formula(name, params, {"W": base[n][0], "b": base[n][1],
                                                 "M": keep_of(params, base[n][0], masks[n]),
                                                 **float64_copy(by_module[n])}) for n in module_names()}
    merged = method.merge(model)
    for n in module_names():
        linear = merged.get_submodule(n)
        assert type(linear) is nn.Linear
        assert_rel(linear.weight, expected[n], FORWARD_REL, f"{n} merged weight")
        assert torch.equal(linear.bias, base[n][1]), f"{n}: the bias changed"
        if method.preserves_sparsity:
            assert bool((linear.weight[~masks[n]] == 0).all()), f"{n}: a pruned weight is non-zero after merge"


# -- SQFT NLS: elastic ranks per decoder layer, through the model's forward (docs/methods.md §SQFT NLS) ------


def test_sqft_nls_matches_its_formula(compose):
    spec = method_spec(compose, "sqft", ["method.nls=true"], "unstructured")
    params = spec.params
    space, r_max = list(params["nls_space"]), params["rank"]
    merge_rank = space[(len(space) - 1) // 2]
    elastic = set(params["nls_targets"])
    assert elastic == {"q_proj", "k_proj", "v_proj"} and "up_proj" not in elastic
    model = TinyDecoder()
    masks = stored_masks(model, "unstructured")
    base = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone())
            for n in module_names()}
    method = build_method(spec)
    trainable = method.attach(model, masks, method_context())
    role_of = roles("sqft", params)
    g = torch.Generator().manual_seed(4)
    by_module = {}
    with torch.no_grad():
        for n in module_names():
            by_module[n] = trainable_by_role(model.get_submodule(n), role_of)
            for role, p in by_module[n].items():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if role == "V" else 0.05))
    t = {n: {"W": base[n][0], "b": base[n][1], "M": keep_of(params, base[n][0], masks[n]),
             **float64_copy(by_module[n])} for n in module_names()}
    p_drop = float(params["dropout"])

    no_dy = torch.zeros(*X_SHAPE[:-1], D_OUT, dtype=torch.float64)  # the merge/eval formulas ignore dY
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n in module_names()]
    x = torch.randn(*X_SHAPE, generator=g, dtype=torch.float64)
    model.train()
    sampled = []
    for step in range(12):
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(2000 + step)
        out = model(xg)
        dy = torch.randn(out.shape, generator=g, dtype=torch.float64)
        torch.manual_seed(2000 + step)  # nn.Dropout draws in call order: layer 0 q, k, v, up, then layer 1
        keeps = {n: keep_mask(x, p_drop, None) for n in module_names()}
        ranks = {}
        for n in module_names():
            matches = [r for r in (space if n.rsplit(".", 1)[-1] in elastic else [r_max])
                       if torch.allclose(outputs[n], formula("sqft", params, t[n], x, no_dy, keeps[n],
                                                              rank=r)[0], rtol=0, atol=1e-12)]
            assert len(matches) == 1, f"step {step} {n}: output matches ranks {matches} of {space}"
            ranks[n] = matches[0]
        for layer in range(LAYERS):
            layer_ranks = {ranks[n] for n in module_names() if f"layers.{layer}." in n and "up_proj" not in n}
            assert len(layer_ranks) == 1, f"step {step}: q/k/v of layer {layer} drew different ranks {layer_ranks}"
            sampled.append(layer_ranks.pop())
        if step == 0:  # gradients at the sampled ranks; U[:, ρ:], V[ρ:] get exactly zero
            out.backward(dy)
            exp_dx = torch.zeros_like(x)
            for k, n in enumerate(module_names()):
                block = dy[..., k * D_OUT:(k + 1) * D_OUT]
                _, dx_n, grads, _ = formula("sqft", params, t[n], x, block, keeps[n], rank=ranks[n])
                exp_dx += dx_n
                for role, p in by_module[n].items():
                    assert_rel(p.grad, grads[role], GRAD_REL, f"{n} d{role} at rank {ranks[n]}")
            assert_rel(xg.grad, exp_dx, FORWARD_REL, "dX summed over the modules")
    assert set(sampled) == set(space), f"12 steps × {LAYERS} layers drew only {sorted(set(sampled))} of {space}"

    model.eval()  # evaluation uses the heuristic sub-adapter (median of the space) on the elastic modules
    with torch.no_grad():
        model(x)
    for n in module_names():
        r = merge_rank if n.rsplit(".", 1)[-1] in elastic else r_max
        assert_rel(outputs[n], formula("sqft", params, t[n], x, no_dy,
                                       torch.ones_like(x), rank=r)[0], FORWARD_REL, f"{n} eval forward, rank {r}")
    for h in hooks:
        h.remove()
    torch.optim.SGD(trainable, lr=LR).step()
    expected = {n: merged_formula("sqft", params, {"W": base[n][0], "b": base[n][1],
                                                   "M": keep_of(params, base[n][0], masks[n]),
                                                   **float64_copy(by_module[n])},
                                  rank=merge_rank if n.rsplit(".", 1)[-1] in elastic else r_max)
                for n in module_names()}
    merged = method.merge(model)
    for n in module_names():
        weight = merged.get_submodule(n).weight
        assert_rel(weight, expected[n], FORWARD_REL, f"{n} merged weight")
        assert bool((weight[~masks[n]] == 0).all())


def test_sqft_int4_packed_weight_is_the_formula(compose):
    """QA-SparsePEFT's INT4 deliverable dequantizes to the formula's Q(W_m) (docs/methods.md §SQFT QA-SparsePEFT)."""
    spec = method_spec(compose, "sqft", ["method.quantize=int4", "method.quant_group_size=12"], "unstructured")
    model = TinyDecoder()
    masks = stored_masks(model, "unstructured")
    base = {n: model.get_submodule(n).weight.detach().clone() for n in module_names()}
    method = build_method(spec)
    method.attach(model, masks, method_context())
    g = torch.Generator().manual_seed(5)
    s = scale_of(spec.params)
    expected = {}
    with torch.no_grad():
        for n in module_names():
            ps = trainable_by_role(model.get_submodule(n), roles("sqft", spec.params))
            for role, p in ps.items():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if role == "V" else 0.05))
            U, V = ps["U"].double(), ps["V"].double()
            expected[n] = int4_dequantize(base[n] + (s * U @ V) * masks[n], base[n], 12)
    method.merge(model)
    assert set(method.packed_int4) == set(module_names())
    for n, packed in method.packed_int4.items():
        assert_rel(packed.dequantize(), expected[n], FORWARD_REL, f"{n} packed INT4")
        assert bool((packed.dequantize()[~masks[n]] == 0).all())


# -- LoRS gradient-SVD init (docs/methods.md §LoRS gradient-SVD init): V spans the top-r right singular subspace
# of the mean gradient -------------------------------------------------------------------------------------------


def principal_angle_sines(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between span(rowsᵀ) and span(basis) (basis: orthonormal columns), as the
    singular values of the part of an orthonormal basis of span(rowsᵀ) outside span(basis): accurate near 0."""
    Q_rows, _ = torch.linalg.qr(rows.T.to(torch.float64))
    outside = Q_rows - basis @ (basis.T @ Q_rows)
    return torch.linalg.svdvals(outside)


@pytest.mark.parametrize("name,overrides", [
    ("lors", []),  # rank 16, q = min(4r, d_out, d_in) = 32: the full subspace
    ("lors_exact", []),
    ("lors", ["method.rank=4", "method.init_gamma=0.5"]),  # q = 16 < 32: the randomized path
])
def test_grad_svd_init_spans_the_top_right_singular_subspace(compose, name, overrides):
    spec = method_spec(compose, name, overrides, "unstructured")
    rank, gamma = spec.params["rank"], float(spec.params["init_gamma"])
    assert spec.params["init"] == "grad_svd" and spec.params["init_samples"] == 16
    model = TinyDecoder()
    masks = stored_masks(model, "unstructured")
    build_method(spec).attach(model, masks, method_context())
    for index, n in enumerate(module_names()):
        ps = trainable_by_role(model.get_submodule(n), roles(name, spec.params))
        assert torch.count_nonzero(ps["U"]) == 0
        V = ps["V"].detach().to(torch.float64)
        assert_rel(V @ V.T, torch.eye(rank, dtype=torch.float64) / gamma**2, 1e-5, f"{n} V Vᵀ = I / γ² (float32)")
        C, Q = planted_gradient(index)
        # the top-r right singular vectors of the mean gradient C, from a float64 SVD written here
        _, _, Vh = torch.linalg.svd(C, full_matrices=False)
        top = Vh[:rank].T
        assert float(principal_angle_sines(Q[:, :rank].T, top).max()) < 1e-12  # the plant is what it says
        sines = principal_angle_sines(V, top)
        assert float(sines.max()) <= 1e-5, f"{n}: principal-angle sines {sines.max():.2e} > 1e-5"
