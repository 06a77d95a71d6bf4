"""Peer rows of the efficiency benchmark: what a user would pick instead of a lorsbench method, run through the
same cell protocol (docs/measurement.md §Peers and larger batches; issue 13 item 3). Peers are NOT methods: they live
here, are never registered, and their rows say `peer`. Each takes its hyper-parameters from the composed config
of the method it stands beside (`config_method`), so rank and alpha are the protocol's.

- `peft_lora`: Hugging Face peft's LoRA (`get_peft_model` with `LoraConfig` on the same target projections).
- `authors_lors`: the LoRS authors' autograd function (hyx1999/LoRS `pefts/lors/lors_autograd.py`), written here
  from its formulas in its op order: forward `W_m = addmm(W, A, B, alpha=s) ⊙ (W != 0)`, `Y = X W_mᵀ (+ b)`,
  saving X, W, A, B; backward recomputes `W_m` for `dX = dY W_m`, and `dA = dYᵀ (X Bᵀ)`, `dB = (dY A)ᵀ X`
  (no s in the adapter gradient); A (d_out × r) zero, B (r × d_in) kaiming-uniform, both in the weight's dtype
  (bf16 adapters, as theirs), s = alpha / sqrt(r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lorsbench.config import ConfigError, unknown_name_error
from lorsbench.modules import replace_module, target_linears

PREFIX = "peer:"
Attach = Callable[[nn.Module, dict[str, Any], tuple[str, ...], torch.Generator], list[nn.Parameter]]


@dataclass(frozen=True)
class Peer:
    name: str
    config_method: str  # conf/method/<name>.yaml: where rank, alpha and dropout come from
    attach: Attach  # (model, method params, targets, generator) -> trainable parameters


class _AuthorsLorsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        merged = weight.addmm(lora_a, lora_b, alpha=scaling).mul_(weight != 0)
        y = x2.mm(merged.t()).reshape(*x.shape[:-1], -1)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dx = db = da = dv = None
        if ctx.needs_input_grad[0]:
            merged = weight.addmm(lora_a, lora_b, alpha=ctx.scaling).mul_(weight != 0)
            dx = dy.mm(merged).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0)
        if ctx.needs_input_grad[3]:
            da = dy.t() @ (x2 @ lora_b.t())
        if ctx.needs_input_grad[4]:
            dv = (dy @ lora_a).t() @ x2
        return dx, None, db, da, dv, None


class AuthorsLorsLinear(nn.Module):
    """A frozen (pruned) linear with the authors' LoRS adapter: `lora_A` d_out × r, `lora_B` r × d_in."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        d_out, d_in = base.weight.shape
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on an r × d_in tensor
        self.lora_A = nn.Parameter(torch.zeros(d_out, rank, **like))
        self.lora_B = nn.Parameter(((torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound).to(**like))
        self.scaling = alpha / math.sqrt(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AuthorsLorsFunction.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)


def attach_authors_lors(model: nn.Module, params: dict[str, Any], targets: tuple[str, ...],
                        generator: torch.Generator) -> list[nn.Parameter]:
    model.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for name, linear in target_linears(model, targets).items():
        module = AuthorsLorsLinear(linear, int(params["rank"]), float(params["alpha"]), generator)
        replace_module(model, name, module)
        trainable += [module.lora_A, module.lora_B]
    return trainable


def attach_peft_lora(model: nn.Module, params: dict[str, Any], targets: tuple[str, ...],
                     generator: torch.Generator) -> list[nn.Parameter]:
    """peft's LoRA injected in place into `model` (the training loop calls the model itself)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError("peer:peft_lora needs peft (pip install 'lorsbench[peers]')") from exc
    torch.manual_seed(int(generator.initial_seed()))  # peft draws its init from the global generator
    config = LoraConfig(r=int(params["rank"]), lora_alpha=float(params["alpha"]),
                        lora_dropout=float(params.get("dropout", 0.0)), target_modules=list(targets), bias="none")
    get_peft_model(model, config)
    return [p for p in model.parameters() if p.requires_grad]


PEERS: dict[str, Peer] = {
    "peft_lora": Peer("peft_lora", "lora", attach_peft_lora),
    "authors_lors": Peer("authors_lors", "lors", attach_authors_lors),
}


def peer_of(label: str) -> Peer | None:
    """The peer a cell label names (`peer:<name>`), None for a method label; unknown peers are a ConfigError."""
    if not label.startswith(PREFIX):
        return None
    name = label[len(PREFIX):]
    if name not in PEERS:
        raise unknown_name_error("peer", name, list(PEERS))
    return PEERS[name]
