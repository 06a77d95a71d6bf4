"""Leaf definitions shared by the config edge, the registries and the pipeline: the configuration error and the
batch type. Imports nothing of lorsbench (so no module that lorsbench.config needs can import it back)."""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# A tokenized batch: input_ids, attention_mask, labels (each [batch, seq_len]).
Batch = dict[str, "torch.Tensor"]


class ConfigError(ValueError):
    """A bad configuration value; the message says what is valid."""


def unknown_name_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """One clear error for an unknown registry name, with the valid names and a suggestion."""
    hint = difflib.get_close_matches(str(name), list(valid), n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(f"unknown {kind} '{name}'. Valid: {', '.join(sorted(valid))}.{did_you_mean}")
