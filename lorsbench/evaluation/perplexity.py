"""Perplexity on held-out text with a fixed window and stride (sliding-window evaluation).

The held-out part of the corpus (`lorsbench.data.text.corpus_tokens(..., "heldout")`, never seen by pruning
calibration) is cut to its first `max_tokens` tokens and read in windows of `window` tokens starting every
`stride` tokens. Each token is scored once, in the window where it first appears, conditioned on the tokens
before it in that window; with stride < window every scored token gets at least window - stride tokens of context.
Tokens at a window's first position have no context and are not scored. Perplexity = exp(mean NLL over the scored
tokens); the count of scored tokens is recorded with it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorsbench.config import PerplexityConfig


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored
    window: int
    stride: int
    source: str
    nll_mean: float = math.nan  # mean negative log-likelihood per scored token (nats)
    text_sha256: str = ""  # of the evaluated token ids: equal digests = the same text and tokenization
    window_nll_sum: tuple[float, ...] = ()  # per window, in text order: summed NLL of its scored tokens (nats)
    window_tokens: tuple[int, ...] = ()  # per window: scored tokens (pairs two runs' perplexities per window)

    def windows_json(self) -> dict:
        """The per-window losses as written next to the record (`perplexity_windows.json`)."""
        return {"nll_sum": list(self.window_nll_sum), "tokens": list(self.window_tokens),
                "text_sha256": self.text_sha256, "window": self.window, "stride": self.stride}


@dataclass(frozen=True)
class Span:
    """One window: tokens [begin, end) go through the model; tokens [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


def window_spans(n_tokens: int, window: int, stride: int) -> list[Span]:
    """The windows covering `n_tokens` tokens; every token but the first is scored exactly once."""
    if window < 2:
        raise ValueError(f"perplexity window must be >= 2 tokens, got {window}")
    if not 0 < stride <= window:
        raise ValueError(f"perplexity stride must be in [1, window={window}] (else tokens go unscored), got {stride}")
    spans, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            spans.append(Span(begin, end, first))
        if end >= n_tokens:
            return spans
        prev_end, begin = end, begin + stride


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, spans: list[Span], batch_size: int,
               device: torch.device) -> tuple[list[float], list[int]]:
    """Per span: the sum of next-token NLL (float64) over its scored tokens, and their count.

    Windows of equal length are batched together (only the last window can be shorter), so no padding is needed.
    """
    sums: dict[Span, float] = {}
    groups: list[list[Span]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].end - groups[-1][0].begin == span.end - span.begin:
            groups[-1].append(span)
        else:
            groups.append([span])
    for group in groups:
        batch = torch.stack([ids[s.begin : s.end] for s in group]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row, span in enumerate(group):
            offset = span.first_scored - span.begin  # position of the first scored token inside the window
            # logits at position j predict token j + 1
            scores = logits[row, offset - 1 : -1]
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16 logits -> fp32 softmax
            nll = F.cross_entropy(scores, batch[row, offset:], reduction="sum")
            sums[span] = float(nll.double())
    return [sums[s] for s in spans], [s.end - s.first_scored for s in spans]


def token_nll_sum(model, ids: torch.Tensor, spans: list[Span], batch_size: int, device: torch.device) -> tuple[float, int]:
    """Sum of next-token NLL (float64 accumulation) over the scored tokens of `spans`, and their count."""
    sums, counts = window_nll(model, ids, spans, batch_size, device)
    return math.fsum(sums), sum(counts)


def perplexity(model, tokenizer, config: PerplexityConfig, device: torch.device) -> PerplexityResult:
    """Perplexity of `model` on the held-out text of `config.source` (see module docstring)."""
    from lorsbench.data.text import corpus_tokens

    window_spans(config.window + 1, config.window, config.stride)  # bad window/stride: fail before tokenizing
    ids = corpus_tokens(config.source, tokenizer, "heldout")
    if config.max_tokens is not None:
        ids = ids[: config.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"held-out text of '{config.source}' has {len(ids)} tokens; need at least 2")
    spans = window_spans(len(ids), config.window, config.stride)
    was_training = model.training
    model.eval()
    try:
        sums, counts = window_nll(model, ids, spans, config.batch_size, device)
    finally:
        model.train(was_training)
    total, count = math.fsum(sums), sum(counts)
    nll_mean = total / count
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return PerplexityResult(perplexity=math.exp(nll_mean), tokens=count, window=config.window,
                            stride=config.stride, source=config.source, nll_mean=nll_mean, text_sha256=digest,
                            window_nll_sum=tuple(sums), window_tokens=tuple(counts))
