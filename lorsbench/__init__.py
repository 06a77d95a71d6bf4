"""lorsbench: a benchmark harness for sparsity-preserving fine-tuning of pruned LLMs."""

__version__ = "0.1.0"
