"""`python -m lorsbench.bench`: every method × sequence length, one fresh process each, then CSV + Markdown + PNG.

    python -m lorsbench.bench --model random-llama3-8b --pattern 2of4 --seq-lens 512 1024 2048 \\
        --methods lora spp sqft lors lors:kernel=torch lors_exact slope full_sparse_ft

Writes `<out-dir>/<name>.csv|.md|.png` (default `results/efficiency/<gpu>/<model>_<pattern>`), rewritten after
every configuration so a run cut short keeps what it measured. `--append` merges into an existing CSV
(same label and sequence length are replaced). Exit code 0 even when configurations OOM: those are rows.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from lorsbench.bench import table

DEFAULT_METHODS = ("lora", "spp", "sqft", "lors", "lors_exact", "slope", "full_sparse_ft")
NOTES = (
    "Protocol (methods.md 5.5): random weights at the model's shapes, magnitude masks, bf16 weights and activations "
    "(adapters keep fp32 master weights), batch 1, every sequence exactly seq_len tokens, r = 16 (spp: 16 rows), "
    "adapters on q,k,v,o,gate,up,down, no gradient checkpointing, AdamW + clipping 1.0 through "
    "`lorsbench.training.train`; one fresh process per cell; warm-up steps excluded; device-synchronized step times.",
    "`lors`/`lors_exact` use init=lora here (the gradient-SVD init is a one-off before training, not a step cost).",
    "`full_sparse_ft` trains every target weight (gradient masked by the stored mask; bf16 AdamW state): the upper anchor.",
)


def _fork_run(spec, timeout_s: float) -> dict:
    """Run one configuration in a forked child (a fresh CUDA context and allocator; imports already paid)."""
    from lorsbench.bench.step import run_step

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            child.send(asdict(run_step(spec)))
        finally:
            child.close()
            os._exit(0)

    proc = ctx.Process(target=target)
    proc.start()
    child.close()
    row = None
    if parent.poll(timeout_s):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        reason = "timed out" if proc.exitcode is None or proc.exitcode < 0 else f"exited with code {proc.exitcode}"
        row = _failed_row(spec, f"worker process {reason}")
    return row


def _subprocess_run(spec, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "lorsbench.bench.step", "--model", spec.model, "--pattern", spec.pattern,
               "--sparsity", str(spec.sparsity), "--rank", str(spec.rank), "--batch-size", str(spec.batch_size),
               "--warmup", str(spec.warmup_steps), "--steps", str(spec.measured_steps),
               "--profiled-steps", str(spec.profiled_steps), "--seed", str(spec.seed),
               "--dtype", spec.dtype, "--device", spec.device, "--method", spec.method, "--seq-len",
               str(spec.seq_len), "--json-out", str(out)]
        try:
            subprocess.run(cmd, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return _failed_row(spec, "worker process timed out")
        if not out.exists():
            return _failed_row(spec, "worker process wrote no row")
        return json.loads(out.read_text())


def _failed_row(spec, error: str) -> dict:
    from lorsbench.bench.step import StepRow, parse_method

    return asdict(StepRow(label=spec.method, method=parse_method(spec.method)[0], model=spec.model,
                          pattern=spec.pattern, sparsity=spec.sparsity, seq_len=spec.seq_len,
                          batch_size=spec.batch_size, status="failed", error=error))


def _median_run(runs: list[dict]) -> dict:
    """The run with the median step time (lower median for an even count); its row records every run's, and the
    kernel time of the one run that profiled (kernel time barely varies between processes; wall time does)."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["step_ms_median"])
    if not ok:
        return runs[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row["step_ms_runs"] = [r["step_ms_median"] for r in runs if r["status"] == "ok"]
    profiled = [r["gpu_kernel_ms"] for r in ok if r.get("gpu_kernel_ms") is not None]
    if row.get("gpu_kernel_ms") is None and profiled:
        row["gpu_kernel_ms"] = profiled[0]
    return row


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported (it reads TQDM_* at import)
    from lorsbench.bench.step import add_spec_arguments, spec_from_args

    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench", description=__doc__.splitlines()[0])
    add_spec_arguments(parser)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="registry names, optionally name:key=value,... (a row per entry)")
    parser.add_argument("--reference", default="lora", help="the row label ratios are taken against")
    parser.add_argument("--out-dir", type=Path, default=None, help="default results/efficiency/<gpu>")
    parser.add_argument("--name", default=None, help="file stem; default <model>_<pattern>")
    parser.add_argument("--append", action="store_true", help="merge into an existing CSV of the same name")
    parser.add_argument("--isolation", choices=("fork", "subprocess"), default="fork")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--repeats", type=int, default=1,
                        help="processes per cell, interleaved across methods; the row keeps the median run")
    args = parser.parse_args(argv)

    # Pay the heavy imports once in the parent (forked children inherit them); no CUDA call happens here.
    import lorsbench.models  # noqa: F401
    import lorsbench.training  # noqa: F401
    from lorsbench.method import get_method

    from lorsbench.bench.step import method_spec, model_config, pattern_config
    from lorsbench.config import ConfigError

    try:  # bad names and options fail here, once, before any model is built
        model_config(args.model)
        pattern_config(args.pattern)
        for text in args.methods:
            get_method(text.partition(":")[0])
            method_spec(text, args.rank)
    except ConfigError as exc:
        parser.error(str(exc))

    name = args.name or f"{args.model}_{args.pattern}" + ("" if args.pattern != "unstructured" else f"{args.sparsity:g}")
    rows: list[dict] = []
    out_dir = args.out_dir
    run = _fork_run if args.isolation == "fork" else _subprocess_run
    t0 = time.perf_counter()
    for seq_len in args.seq_lens:
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for _ in range(max(1, args.repeats) - 1):  # earlier repeats, interleaved so drift hits every method alike
            for method in args.methods:  # only the last run of a cell profiles (the profiler adds seconds per run)
                spec = replace(spec_from_args(args, method, seq_len), profiled_steps=0)
                runs[method].append(run(spec, args.timeout))
        for method in args.methods:
            spec = spec_from_args(args, method, seq_len)
            row = _median_run(runs[method] + [run(spec, args.timeout)])
            status = row["status"] if row["status"] == "ok" else f"{row['status']} ({row.get('error')})"
            print(f"[bench] {method:28s} seq {seq_len:6d}: {status}  step {row.get('step_ms_median')} ms  "
                  f"peak {row.get('peak_alloc_gib')} GiB  ({row.get('wall_s') or 0:.0f} s)", flush=True)
            if out_dir is None and row.get("gpu"):
                out_dir = Path("results/efficiency") / table.slug(row["gpu"])
            if out_dir is not None:
                if not rows and args.append and (out_dir / f"{name}.csv").exists():
                    rows = table.read_csv(out_dir / f"{name}.csv")
                rows = [r for r in rows if (r["label"], r["seq_len"]) != (row["label"], row["seq_len"])] + [row]
                table.write_tables(rows, out_dir, name, NOTES, args.reference, plot_png=False)
            else:
                rows.append(row)
    if out_dir is None:
        out_dir = Path("results/efficiency/unknown")
    if rows:
        table.write_tables(rows, out_dir, name, NOTES, args.reference, plot_png=not args.no_plot)
        print(table.markdown(table.add_ratios(rows, args.reference), name, (), args.reference))
    print(f"[bench] wrote {out_dir}/{name}.csv|md|png in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
