"""Efficiency benchmark (docs/measurement.md §Efficiency benchmark; issues 5, 13).

    python -m lorsbench.bench --model random-llama3-8b --pattern 2of4 --seq-lens 512 1024 2048 \\
        --methods lora spp sqft lors lors_exact slope full_sparse_ft --peers peft_lora authors_lors
    python -m lorsbench.bench.layer            # per-layer fwd+bwd micro-benchmark (+ --tune, --semi)

`cell` measures one cell (method or peer × batch × sequence length × step mode) in its own process, with its
config composed by Hydra (`experiment=bench`) and typed by the pipeline's `build_run_config`; `peers` holds the
peer rows (never methods); `flops` the FLOP floor; `table` turns results into CSV, Markdown (the report's table
writer) and a plot; `merge` joins the tables of several device calls.
"""
