"""Finding and replacing the target linears of a decoder model (the one place that knows module paths)."""
from __future__ import annotations

from torch import nn


def target_linears(model: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    """Modules inside the decoder blocks whose last name component is one of `targets`, in model order.

    Embeddings and the LM head are never returned (they are not inside `layers`).
    Returns the modules as they are now (plain nn.Linear, or a method's adapter module after attach).
    """
    wanted = set(targets)
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] in wanted and "layers" in parts and hasattr(module, "weight"):
            found[name] = module
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a LLaMA-style HF model."""
    for path in ("model.layers", "model.model.layers", "layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"cannot find decoder layers in {type(model).__name__} (expected model.layers)")
