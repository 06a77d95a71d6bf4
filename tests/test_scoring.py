"""`BatchedHFLM` scores every request as stock lm-eval `HFLM` does; `cached_templates` renders as lm-eval does."""
from __future__ import annotations

import random

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import LlamaConfig, LlamaForCausalLM

from lorsbench.data.tokenizers import BYTE_TOKENIZER_SIZE, byte_tokenizer
from lorsbench.evaluation.scoring import BatchedHFLM, cached_templates


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE_TOKENIZER_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _requests(n: int = 40, seed: int = 0) -> list:
    """(key, context tokens, continuation tokens): multi-token and one-token continuations, shared contexts,
    and pairs longer than the max length (truncated from the left)."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        context = [rng.randrange(3, BYTE_TOKENIZER_SIZE) for _ in range(rng.randrange(1, 90))]
        for _ in range(rng.choice([1, 2, 4])):
            continuation = [rng.randrange(3, BYTE_TOKENIZER_SIZE) for _ in range(rng.choice([1, 1, 3, 9]))]
            requests.append(((f"ctx{i}", f"cont{len(requests)}"), context, continuation))
    return requests


def _wrapper(cls, model, batch_size: int = 8):
    return cls(pretrained=model, tokenizer=byte_tokenizer(), batch_size=batch_size, device="cpu", max_length=64)


def test_batched_scores_equal_stock_hflm(model):
    requests = _requests()
    assert any(len(ctx) + len(cont) > 65 for _, ctx, cont in requests)  # truncation is exercised
    stock = _wrapper(HFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)
    batched = _wrapper(BatchedHFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(batched) == len(stock) == len(requests)
    for (ll_b, greedy_b), (ll_s, greedy_s) in zip(batched, stock):
        assert ll_b == pytest.approx(ll_s, rel=1e-5, abs=1e-5)
        assert greedy_b == greedy_s


def test_only_the_continuation_positions_reach_the_vocabulary_projection(model):
    """`logits_to_keep` is honoured: the head sees [batch, keep, hidden] with keep well below the padded width."""
    rng = random.Random(1)
    requests = [((f"c{i}", "x"), [rng.randrange(3, 200) for _ in range(50)], [rng.randrange(3, 200)] * 2)
                for i in range(16)]
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        _wrapper(BatchedHFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        handle.remove()
    assert seen == [(8, 2, 32), (8, 2, 32)]


def test_one_token_choices_of_one_context_share_a_forward_row(model):
    """BoolQ-like requests (one context, one-token answers) run one row per context, and score as stock does."""
    requests = [((f"c{i}", a), [5 + i, 6, 7, 8], [tok]) for i in range(2) for a, tok in (("yes", 40), ("no", 41))]
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        batched = _wrapper(BatchedHFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        handle.remove()
    assert seen == [(2, 1, 32)]
    stock = _wrapper(HFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-5)


def test_independent_log_likelihood_in_float64(model):
    """One request against the formula: sum over the continuation of log softmax(model(ctx + cont[:-1]))."""
    context, continuation = [5, 9, 11, 40, 41], [7, 8, 9]
    (ll, greedy), = _wrapper(BatchedHFLM, model)._loglikelihood_tokens([(("a", "b"), context, continuation)],
                                                                      disable_tqdm=True)
    with torch.no_grad():
        logits = model.double()(torch.tensor([context + continuation[:-1]])).logits[0]
    model.float()
    logprobs = torch.log_softmax(logits, -1)
    expected = sum(float(logprobs[len(context) - 1 + j, tok]) for j, tok in enumerate(continuation))
    expected_greedy = all(int(logits[len(context) - 1 + j].argmax()) == tok for j, tok in enumerate(continuation))
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == expected_greedy


def test_the_greedy_decode_is_flagged_greedy(model):
    """A continuation built token by token from the model's argmax is greedy; changing its last token is not."""
    context, greedy_tokens = [5, 9, 11, 40, 41], []
    with torch.no_grad():
        for _ in range(3):
            greedy_tokens.append(int(model(torch.tensor([context + greedy_tokens])).logits[0, -1].argmax()))
    other = greedy_tokens[:-1] + [(greedy_tokens[-1] + 1) % BYTE_TOKENIZER_SIZE]
    results = _wrapper(BatchedHFLM, model)._loglikelihood_tokens(
        [(("a", "g"), context, greedy_tokens), (("a", "o"), context, other)], disable_tqdm=True)
    assert [flag for _, flag in results] == [True, False]


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep`: the scorer falls back to slicing full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.device = inner, inner.config, inner.device

    def forward(self, input_ids):
        return self.inner(input_ids)

    def tie_weights(self):
        pass


def test_fallback_without_logits_to_keep(model):
    requests = _requests(12, seed=3)
    wrapped = _NoLogitsToKeep(model)
    stock = _wrapper(HFLM, model)._loglikelihood_tokens(requests, disable_tqdm=True)
    lm = _wrapper(BatchedHFLM, model)
    lm._model = wrapped
    fallback = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in fallback] == [g for _, g in stock]
    assert [ll for ll, _ in fallback] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-5)


def test_empty_continuation_is_an_error(model):
    with pytest.raises(ValueError, match="continuation of 0 tokens"):
        _wrapper(BatchedHFLM, model)._loglikelihood_tokens([(("a", ""), [5, 6], [])], disable_tqdm=True)


def test_cached_templates_render_like_lm_eval_and_restore():
    from lm_eval import utils

    original = utils.apply_template
    docs = [{"q": f"question {i}", "choices": ["x", "y"]} for i in range(3)]
    template = "Q: {{q}} {{choices | join(', ')}}"
    expected = [original(template, doc) for doc in docs]
    with cached_templates():
        assert utils.apply_template is not original
        assert [utils.apply_template(template, doc) for doc in docs] == expected
    assert utils.apply_template is original


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_scores_equal_stock_hflm_on_the_gpu(model):
    """The device path (logits_to_keep on CUDA, one transfer per batch) against stock HFLM on the same GPU."""
    requests = _requests(60, seed=5)
    gpu_model = model.to("cuda")
    try:
        stock = HFLM(pretrained=gpu_model, tokenizer=byte_tokenizer(), batch_size=16, device="cuda",
                     max_length=64)._loglikelihood_tokens(requests, disable_tqdm=True)
        batched = BatchedHFLM(pretrained=gpu_model, tokenizer=byte_tokenizer(), batch_size=16, device="cuda",
                              max_length=64)._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        model.to("cpu")
    assert [g for _, g in batched] == [g for _, g in stock]
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in stock], rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_real_model_on_the_zero_shot_suite_scores_like_stock_lm_eval(tmp_path):
    """The default model and its tokenizer on 8 documents of each zeroshot7 task (BoolQ's long passages, Winogrande's
    multiple inputs, HellaSwag's multi-token endings): the per-document results of `evaluate_tasks` equal those of
    the same call with stock `HFLM`."""
    import gzip
    import json
    from dataclasses import replace
    from pathlib import Path

    from lorsbench.composition import compose_config
    from lorsbench.config import build_run_config
    from lorsbench.evaluation import evaluate_tasks, prepare_eval
    from lorsbench.models import load_model

    run_cfg = build_run_config(compose_config(["dtype=float32"]))  # the default run's model and suite
    cache_dir = run_cfg.paths.cache_dir
    loaded = load_model(run_cfg.model, torch.float32, torch.device("cpu"), cache_dir)
    config = replace(run_cfg.eval, max_examples_per_task=8, batch_size=16, perplexity=None)
    prepared = prepare_eval(config, cache_dir)

    def rows(folder: Path, lm_class) -> list[dict]:
        evaluate_tasks(loaded.model, loaded.tokenizer, prepared, config, torch.device("cpu"), folder, lm_class)
        with gzip.open(folder / "samples.jsonl.gz", "rt") as handle:
            return [json.loads(line) for line in handle]

    batched, stock = rows(tmp_path / "batched", BatchedHFLM), rows(tmp_path / "stock", HFLM)
    assert len(batched) == len(stock) == 56
    for ours, theirs in zip(batched, stock):
        assert (ours["task"], ours["doc_id"], ours["acc"], ours["acc_norm"]) == \
            (theirs["task"], theirs["doc_id"], theirs["acc"], theirs["acc_norm"])
        assert ours["margin"] == pytest.approx(theirs["margin"], abs=1e-3)


def test_scorer_check_counts_agreements_and_refuses_different_documents():
    import numpy as np

    from lorsbench.report.samples import TaskSamples
    from lorsbench.studies.scorer_check import compare, markdown

    def boolq(acc, margin):  # two documents, no acc_norm (lm-eval scores acc only there)
        return {"boolq": TaskSamples(np.array([0, 1]), np.array(acc, dtype=float), None, np.array(margin))}

    stock, ours = boolq([1, 0], [0.5, -0.01]), boolq([1, 1], [0.5001, 0.002])
    tasks = compare(stock, ours)
    assert tasks["boolq"]["docs"] == 2 and tasks["boolq"]["acc_agree"] == 1 and tasks["boolq"]["acc_norm_agree"] == 2
    assert tasks["boolq"]["max_margin_diff"] == pytest.approx(0.012)
    assert (tasks["boolq"]["acc_stock"], tasks["boolq"]["acc_ours"]) == (0.5, 1.0)
    table = markdown({"model": "m", "device_name": "cpu", "date": "d", "dtype": "float32", "batch_size": 32,
                      "max_examples_per_task": 200, "versions": {"torch": "t", "transformers": "x", "lm_eval": "l"},
                      "wall_s": {"stock": 2.0, "batched": 1.0}, "tasks": tasks})
    assert "| boolq | 2 | 1 | 2 | 1.20e-02 | 0.5000 | 1.0000 |" in table
    with pytest.raises(ValueError, match="different documents"):
        compare(stock, {"boolq": TaskSamples(np.array([0]), np.array([1.0]), None, np.array([0.5]))})
