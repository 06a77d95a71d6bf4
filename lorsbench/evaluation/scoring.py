"""The lm-eval model wrapper that scores multiple-choice continuations a batch at a time.

lm-eval's `HFLM._loglikelihood_tokens` scores each request of a batch on its own (a slice, an argmax, a gather, a
sum and two host syncs per request) after a log-softmax over every position of the batch: host work and memory
that grow with the requests and the context lengths, not with the model. `BatchedHFLM` keeps lm-eval's requests,
ordering, batches, padding and truncation, and changes only how a batch's results are read: the logits from the
batch's first continuation position on (`logits_to_keep` where the model takes it), one log-softmax, one gather,
one transfer. Tasks, prompts and metrics stay stock lm-eval's; `tests/test_scoring.py` checks the results against
stock `HFLM` request by request (docs/evaluation.md, "How the accuracy is scored").

`cached_templates`: `lm_eval.utils.apply_template` compiles its Jinja template string on every call
(lm-evaluation-harness issue #1286); within the block each distinct template is compiled once.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator

class BatchedHFLM(HFLM):
    """`HFLM` with a batched `_loglikelihood_tokens` for causal models (lm-eval's own path otherwise)."""

    _keeps_logits: bool | None = None  # the model honours an int `logits_to_keep` (None: not yet known)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal" or not isinstance(self.batch_size, int):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm

        # lm-eval's order (longest first, ties by tokens), so batches and their padding are the same as stock.
        order = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        results: list[tuple[float, bool]] = []
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            for chunk in order.get_batched(n=override_bs or self.batch_size):
                scores = self._score_batch([(ctx, cont) for _, ctx, cont in chunk])
                for (request, _, _), answer in zip(chunk, scores, strict=True):
                    results.append(answer)
                    if request is not None:
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(len(chunk))
        return order.get_original(results)

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy decode) for each (context, continuation).

        Requests whose model input is the same (one-token continuations of one context: BoolQ's yes / no) share one
        row of the forward pass, as lm-eval's own logits cache does."""
        inputs: list[list[int]] = []  # the distinct model inputs of the batch
        row_of: dict[tuple[int, ...], int] = {}
        rows, cont_lens, conts = [], [], []
        for ctx, cont in pairs:
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError(f"loglikelihood request with a context of {len(ctx)} and a continuation of "
                                 f"{len(cont)} tokens (both must be > 0, the continuation <= {self.max_length})")
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # truncated from the left, as lm-eval
            rows.append(row_of.setdefault(tuple(inp), len(inputs)))
            if rows[-1] == len(inputs):
                inputs.append(inp)
            cont_lens.append(len(cont))
            conts.append(cont)
        width, n_cont = max(map(len, inputs)), max(cont_lens)
        tokens = torch.zeros(len(inputs), width, dtype=torch.long)  # right-padded with 0, as lm-eval's pad_and_concat
        for row, inp in enumerate(inputs):
            tokens[row, :len(inp)] = torch.tensor(inp)
        targets = torch.zeros(len(pairs), n_cont, dtype=torch.long)
        positions = torch.zeros(len(pairs), n_cont, dtype=torch.long)
        valid = torch.zeros(len(pairs), n_cont, dtype=torch.bool)
        for i, (row, cont, n) in enumerate(zip(rows, conts, cont_lens)):
            end = len(inputs[row])
            # position t's logits predict token t + 1: the continuation is read at [end - n, end)
            positions[i, :n] = torch.arange(end - n, end)
            positions[i, n:] = end - 1
            targets[i, :n] = torch.tensor(cont)
            valid[i, :n] = True
        first = int(positions.min())  # the batch's logits are needed from here to the end of the padded width
        logits = self._last_logits(tokens.to(self.device), width - first)
        positions, targets, valid = (positions - first).to(self.device), targets.to(self.device), valid.to(self.device)
        row_index = torch.tensor(rows, device=logits.device).unsqueeze(-1)
        logprobs = F.log_softmax(logits[row_index, positions], dim=-1, dtype=self.softmax_dtype)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total = torch.where(valid, picked, torch.zeros_like(picked)).sum(-1)
        greedy = ((logprobs.argmax(-1) == targets) | ~valid).all(-1)
        return list(zip(total.double().tolist(), greedy.tolist(), strict=True))

    def _last_logits(self, tokens: torch.Tensor, keep: int) -> torch.Tensor:
        """The logits of the last `keep` positions of the model run on `tokens`: [batch, keep, vocab]. Through
        `logits_to_keep` (an int: every transformers version that has it reads it the same way) where the model's
        forward takes it and honours it, from the full logits otherwise (decided on the first batch)."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            if self._keeps_logits is None:
                self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            if self._keeps_logits:
                logits = self.model(tokens, logits_to_keep=keep).logits
                if logits.ndim == 3 and logits.shape[1] == keep:
                    return logits
                self._keeps_logits = False  # ignored or read otherwise: full logits from now on
            return self.model(tokens).logits[:, -keep:]


@contextlib.contextmanager
def cached_templates() -> Iterator[None]:
    """Within the block, lm-eval compiles each distinct Jinja template string once (same environment, same
    rendering); restored afterwards."""
    from lm_eval import utils

    original = utils.apply_template
    compiled = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = original
