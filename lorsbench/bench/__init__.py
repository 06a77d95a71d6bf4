"""Efficiency benchmark (issue 5; methods.md 5.5 "Efficiency protocol", 7.1-7.5).

    python -m lorsbench.bench --model random-llama3-8b --pattern 2of4 --seq-lens 512 1024 2048 \\
        --methods lora spp sqft lors lors_exact slope full_sparse_ft
    python -m lorsbench.bench.layer            # per-layer fwd+bwd micro-benchmark (+ --tune, --semi)

`step` measures one (method, sequence length) configuration through the pipeline's own pieces (random-weight
model from `lorsbench.models`, magnitude masks, the method registry, THE training loop `lorsbench.training.train`,
`lorsbench.profiling.PhaseMeter`) in its own process; `table` turns rows into CSV, Markdown and a plot.
Nothing here imports Hydra: the GPU machine does not have it.
"""
