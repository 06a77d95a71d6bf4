"""Evaluation: lm-eval accuracy on a task suite (offline BIG-bench, the papers' zero-shot 7, local YAMLs) and
held-out perplexity. The pipeline calls `prepare_eval` before training (fails fast) and the rest after merging."""
from lorsbench.evaluation.lm_eval_runner import (
    EvalUnavailableError,
    PreparedEval,
    TaskScores,
    evaluate_tasks,
    prepare_eval,
)
from lorsbench.evaluation.perplexity import PerplexityResult, perplexity

__all__ = [
    "EvalUnavailableError", "PreparedEval", "TaskScores", "evaluate_tasks", "prepare_eval",
    "PerplexityResult", "perplexity",
]
