"""Layer-wise sequential calibration (docs/methods.md §Calibration), as the Wanda / SparseGPT / LoRS pruners do it.

1. Capture the inputs of decoder block 0 (hidden states plus the keyword arguments the block is called with:
   attention mask, position ids, rotary position embeddings) for every calibration sample.
2. For each block in order: move it to the compute device; hooks on its target linears feed per-layer statistics
   from all samples through the still-dense block; prune every target of the block; re-run the pruned block to turn
   its inputs into the next block's inputs; move it back.

Only one block's weights (plus the samples' hidden states) are on the compute device at a time, so a model larger
than the accelerator prunes block by block; the rest of the model stays where it is.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from lorsbench.config import CalibrationConfig, ConfigError
from lorsbench.modules import decoder_layers, target_linears
from lorsbench.pruning.base import Batch

log = logging.getLogger(__name__)

CALIBRATION_SOURCES = ("pydoc", "c4")


class LayerStats(Protocol):
    """Statistics of one linear's inputs, accumulated over calibration samples."""

    def add(self, x: torch.Tensor) -> None: ...


@dataclass
class BlockInputs:
    """Per calibration sample: the hidden states entering the current block and the block's keyword arguments."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


class _StopForward(Exception):
    pass


def _layers_path(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ValueError("decoder layers are not a submodule of the model")


def _share_equal(value: Any, previous: Any) -> Any:
    """Reuse the first sample's tensor when this sample's is identical (an eager causal mask of a 2048-token
    sequence is 16 MiB; 128 copies would not fit next to the hidden states)."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        if value.shape == previous.shape and value.dtype == previous.dtype and torch.equal(value, previous):
            return previous
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        shared = tuple(_share_equal(v, p) for v, p in zip(value, previous))
        if all(s is p for s, p in zip(shared, previous)):
            return previous
        return shared
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[Batch], device: torch.device | str) -> BlockInputs:
    """Run the embeddings of `model` on each batch and record what decoder block 0 receives.

    The modules that run before block 0 (embeddings, rotary embedding; everything beside the layer list in the
    base model) move to `device` for the capture and back afterwards.
    """
    device = torch.device(device)
    layers = decoder_layers(model)
    base = model.get_submodule(_layers_path(model, layers).rpartition(".")[0])
    captured = BlockInputs(hidden=[], kwargs=[])

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = None
        kwargs["use_cache"] = False
        if captured.kwargs:
            first = captured.kwargs[0]
            kwargs = {k: _share_equal(v, first.get(k)) for k, v in kwargs.items()}
        captured.hidden.append(hidden)
        captured.kwargs.append(kwargs)
        raise _StopForward

    others = [child for child in base.children() if child is not layers]
    homes = [_module_device(child) for child in others]
    for child in others:
        child.to(device)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            try:
                base(**inputs, use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("block 0 was never called: cannot capture its inputs")
    finally:
        handle.remove()
        for child, home in zip(others, homes):
            if home is not None:
                child.to(home)
    return captured


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 returns the hidden states; 4.x returned a tuple whose first entry they are
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_statistics(
    block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs,
    new_stats: Callable[[nn.Module], LayerStats],
) -> dict[str, LayerStats]:
    """Feed every sample through `block` and accumulate `new_stats(linear)` on each linear's input.

    Linears that read the very same tensor (q/k/v after the input norm, gate/up after the post-attention norm)
    share one statistics object, so X^T X is computed once per distinct input. Sharing is decided on the first
    sample by tensor identity (the tensors are kept alive while compared, so no address is reused)."""
    if not linears:
        return {}
    first_inputs: dict[str, torch.Tensor] = {}

    def remember(name):
        def hook(module, args, output):
            first_inputs[name] = args[0]
        return hook

    handles = [linear.register_forward_hook(remember(name)) for name, linear in linears.items()]
    try:
        block(inputs.hidden[0], **inputs.kwargs[0])
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(first_inputs))
    if missing:
        raise RuntimeError(f"target linears never called by their block: {missing}")

    leaders: dict[str, str] = {}  # name -> name of the linear whose stats object it shares
    for name in linears:
        leaders[name] = next((lead for lead in leaders.values() if first_inputs[lead] is first_inputs[name]), name)
    stats = {name: new_stats(linears[name]) for name in set(leaders.values())}
    for name in stats:
        stats[name].add(first_inputs[name])
    first_inputs.clear()

    def accumulate(name):
        def hook(module, args, output):
            stats[name].add(args[0])
        return hook

    handles = [linears[name].register_forward_hook(accumulate(name)) for name in stats]
    try:
        for hidden, kwargs in zip(inputs.hidden[1:], inputs.kwargs[1:]):
            block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[leaders[name]] for name in linears}


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace each sample's hidden states by the block's output (the next block's inputs)."""
    for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        inputs.hidden[i] = _block_output(block(hidden, **kwargs))


def compute_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device blocks run on: `device` when given, else where the model's decoder layers are."""
    if device is not None:
        return torch.device(device)
    return _module_device(decoder_layers(model)) or torch.device("cpu")


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    batches: list[Batch],
    targets: tuple[str, ...],
    new_stats: Callable[[nn.Module], LayerStats],
    prune_linear: Callable[[str, nn.Module, LayerStats], torch.Tensor],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The sequential procedure of docs/methods.md §Calibration (no true-sequential ordering: within a block every
    linear sees statistics of the dense block). `prune_linear(name, linear, stats)` prunes in place and returns the
    keep-mask. Returns name -> keep-mask (on CPU)."""
    if not batches:
        raise ConfigError("calibrated pruning needs at least one calibration sample (pruning.calibration.nsamples)")
    device = compute_device(model, device)
    layers = decoder_layers(model)
    path = _layers_path(model, layers)
    all_targets = target_linears(model, targets)
    was_training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    try:
        inputs = capture_block_inputs(model, batches, device)
        for index, block in enumerate(layers):
            home = _module_device(block)
            block.to(device)
            prefix = f"{path}.{index}."
            linears = {name: linear for name, linear in all_targets.items() if name.startswith(prefix)}
            stats = collect_statistics(block, linears, inputs, new_stats)
            for name, linear in linears.items():
                masks[name] = prune_linear(name, linear, stats[name]).cpu()
            del stats
            run_block(block, inputs)
            if home is not None:
                block.to(home)
            log.debug("pruned block %d/%d", index + 1, len(layers))
    finally:
        model.train(was_training)
    return masks


# --- calibration text -------------------------------------------------------------------------------------------

def calibration_source(tokenizer, config: CalibrationConfig) -> Callable[[], list[Batch]]:
    """A loader for `config` (called only when the pruning cache misses): `pydoc` = the calibration part of the
    offline text (`lorsbench.data.text`), `c4` = the papers' C4 shard (needs the network)."""
    if config.source not in CALIBRATION_SOURCES:
        from lorsbench.config import unknown_name_error

        raise unknown_name_error("calibration source", config.source, CALIBRATION_SOURCES)
    if config.source == "pydoc":
        from lorsbench.data.text import calibration_batches

        return lambda: calibration_batches(tokenizer, "pydoc", config.nsamples, config.seq_len, config.seed)
    return lambda: c4_calibration_batches(tokenizer, config.nsamples, config.seq_len, config.seed)


C4_DATASET = "allenai/c4"
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


def c4_calibration_batches(tokenizer, nsamples: int, seq_len: int, seed: int) -> list[Batch]:
    """docs/methods.md §Calibration: `random.seed(seed)`; per sample draw random documents of the first C4 train shard
    until one tokenizes to more than `seq_len` tokens, then take a random window of exactly `seq_len` tokens."""
    offline = any(os.environ.get(k, "0") not in ("", "0", "false", "False") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline:
        raise ConfigError(
            "pruning.calibration.source=c4 needs the HuggingFace hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set. "
            "Use pruning.calibration.source=pydoc offline."
        )
    try:
        from datasets import load_dataset

        data = load_dataset(C4_DATASET, data_files={"train": C4_SHARD}, split="train")
    except Exception as exc:  # the datasets library raises many kinds here (connection, hub, file system)
        raise ConfigError(
            f"could not load the C4 calibration shard ({C4_DATASET}: {C4_SHARD}): {type(exc).__name__}: {exc}. "
            "C4 needs the network; use pruning.calibration.source=pydoc offline."
        ) from exc
    rng = random.Random(seed)
    batches = []
    for _ in range(nsamples):
        while True:
            ids = tokenizer(data[rng.randint(0, len(data) - 1)]["text"], return_tensors="pt")["input_ids"]
            if ids.shape[1] > seq_len:
                break
        start = rng.randint(0, ids.shape[1] - seq_len - 1)
        window = ids[:, start : start + seq_len]
        batches.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    return batches
