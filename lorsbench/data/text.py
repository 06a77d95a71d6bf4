"""Offline English text: Python's reference manual (`pydoc_data.topics`, in every CPython).

The manual changes between Python releases (and with it a model's perplexity on it), so perplexities are
comparable only between runs whose records carry the same `perplexity_text_sha256`.

One fixed split: the first (1 - heldout_fraction) of the tokens is calibration text, the rest is held out for
perplexity, so pruning never sees the text it is scored on.
"""
from __future__ import annotations

import torch

HELDOUT_FRACTION = 0.25


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus_text(source: str) -> str:
    if source == "pydoc":
        return pydoc_text()
    raise ValueError(f"unknown offline text source '{source}' (valid: pydoc)")


def corpus_tokens(source: str, tokenizer, part: str) -> torch.Tensor:
    """Token ids (1-D) of the `calibration` or `heldout` part of a text corpus."""
    ids = tokenizer(corpus_text(source), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    if part == "calibration":
        return ids[:cut]
    if part == "heldout":
        return ids[cut:]
    raise ValueError(f"part must be calibration or heldout, got {part!r}")


def calibration_batches(tokenizer, source: str, nsamples: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`nsamples` random windows of exactly `seq_len` tokens from the calibration part (as the Wanda /
    SparseGPT loaders draw random windows from C4), each as a batch of one sequence."""
    ids = corpus_tokens(source, tokenizer, "calibration")
    if len(ids) <= seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (nsamples,), generator=generator)
    return [
        {"input_ids": ids[s : s + seq_len].unsqueeze(0), "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
        for s in starts.tolist()
    ]
