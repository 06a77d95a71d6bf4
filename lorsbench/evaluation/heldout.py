"""Held-out instruction loss: the validation signal of the lr sweep (docs/evaluation.md), disjoint from the
evaluation documents and from the training examples (`lorsbench.data.instructions.split_heldout`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorsbench.data.instructions import IGNORE_INDEX, TokenizedDataset


@torch.no_grad()
def heldout_loss(model, data: TokenizedDataset, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over every label token of `data` (token-weighted, float64 sums)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for begin in range(0, len(data), batch_size):
            rows = slice(begin, begin + batch_size)
            logits = model(input_ids=data.input_ids[rows].to(device),
                           attention_mask=data.attention_mask[rows].to(device), use_cache=False).logits
            labels = data.labels[rows].to(device)[:, 1:]
            scores = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll.double())
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count if count else math.nan
