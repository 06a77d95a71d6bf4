"""`python -m lorsbench.bench`: every method (and peer) × sequence length × step mode, one fresh process per
cell, then CSV + Markdown + PNG (docs/measurement.md §Efficiency benchmark).

    python -m lorsbench.bench --model random-llama3-8b --pattern 2of4 --seq-lens 512 1024 2048 \\
        --methods lora spp sqft lors lors:kernel=torch lors_exact slope full_sparse_ft \\
        --peers peft_lora authors_lors --modes eager cuda_graph
    python -m lorsbench.bench --batch-size 4 --seq-lens 2048 --methods lora lors --max-batch lora   # realistic load

Checks before any cell: every cell's config composes (Hydra, `experiment=bench`), a CUDA device exists (unless
`--device cpu`), and the table does not exist yet (else `--append` or `--force`). Writes
`<out-dir>/<name>.csv|md|png` (default `<paths.output_root>/bench/<gpu>/<model>_<pattern>`, outside the
repository's tracked files), rewritten after every cell so a run cut short keeps what it measured.
Exit code: 0 when every cell ran, 1 when a cell failed or ran out of memory, 2 for bad input (nothing run).
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
from typing import Any, Callable

from lorsbench.bench import table

DEFAULT_METHODS = ("lora", "spp", "sqft", "lors", "lors_exact", "slope", "full_sparse_ft")
MODES = ("eager", "cuda_graph")
NOTES = (
    "Protocol (docs/measurement.md §Cell protocol): each cell's config composed by Hydra from conf/ with "
    "experiment=bench and typed by build_run_config; random weights at the model's shapes, magnitude masks "
    "(kept on the device), bf16 weights and activations (adapters keep fp32 master weights), every sequence "
    "exactly seq_len tokens, r = 16 (spp: 16 rows), adapters on q,k,v,o,gate,up,down, no gradient checkpointing, "
    "AdamW + clipping 1.0 through `lorsbench.training.train`; one fresh process per cell; warm-up steps excluded; "
    "device-synchronized step times.",
    "`lors`/`lors_exact` use init=lora here (the gradient-SVD init is a one-off before training, not a step cost).",
    "`full_sparse_ft` trains every target weight (gradient masked by the stored mask; bf16 AdamW state): the upper "
    "anchor.",
    "(peer) rows are not lorsbench methods: peft's LoRA (`get_peft_model`, LoraConfig r 16 on the same projections) "
    "and the LoRS authors' autograd (their op order, bf16 adapters), written in lorsbench/bench/peers.py.",
    "× floor = step time over the step's forward + backward GEMM FLOPs (frozen base fwd + dX, lm_head, causal "
    "attention, a rank-r adapter) at the GEMM rate measured at the start of the invocation (bench/flops.py).",
)


def _fork_call(fn: Callable[[], dict], timeout_s: float) -> tuple[dict | None, str]:
    """`fn()` in a forked child (a fresh CUDA context and allocator; imports already paid): (its dict, or None
    and why)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            child.send(fn())
        finally:
            child.close()
            os._exit(0)

    proc = ctx.Process(target=target)
    proc.start()
    child.close()
    out = None
    if parent.poll(timeout_s):
        try:
            out = parent.recv()
        except EOFError:
            out = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    reason = "timed out" if proc.exitcode is None or proc.exitcode < 0 else f"exited with code {proc.exitcode}"
    return out, f"worker process {reason}"


def _fork_run(spec, timeout_s: float) -> dict:
    from lorsbench.bench.cell import run_cell

    row, why = _fork_call(lambda: asdict(run_cell(spec)), timeout_s)
    return row if row is not None else _failed_row(spec, why)


def _subprocess_run(spec, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.nproc}"]
        cmd = [sys.executable, *(launcher if spec.nproc > 1 else []), "-m", "lorsbench.bench.cell",
               "--model", spec.model, "--pattern", spec.pattern,
               "--rank", str(spec.rank), "--batch-size", str(spec.batch_size), "--warmup", str(spec.warmup_steps),
               "--steps", str(spec.measured_steps), "--profiled-steps", str(spec.profiled_steps),
               "--seed", str(spec.seed), "--dtype", spec.dtype, "--device", spec.device, "--method", spec.method,
               "--seq-len", str(spec.seq_len), "--json-out", str(out)]
        cmd += ["--sparsity", str(spec.sparsity)] if spec.sparsity is not None else []
        cmd += ["--cuda-graph"] if spec.cuda_graph else []
        cmd += ["--gemm-tflops", str(spec.gemm_tflops)] if spec.gemm_tflops else []
        for item in spec.overrides:
            cmd += ["--override", item]
        try:
            subprocess.run(cmd, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return _failed_row(spec, "worker process timed out")
        if not out.exists():
            return _failed_row(spec, "worker process wrote no row")
        return json.loads(out.read_text())


def _failed_row(spec, error: str) -> dict:
    from lorsbench.bench.cell import new_result

    return asdict(replace(new_result(spec), status="failed", error=error, phase="worker"))


def _probe(device: str, dtype: str, floor: bool) -> dict:
    """The GPU's name and measured GEMM rate (a child process: the parent never initialises CUDA)."""
    from lorsbench.bench.flops import gemm_tflops
    from lorsbench.runtime import device_name, resolve_device, torch_dtype

    dev = resolve_device(device)
    rate = gemm_tflops(dev, torch_dtype(dtype, dev), n=8192 if dev.type == "cuda" else 256) if floor else None
    return {"gpu": device_name(dev), "gemm_tflops": rate}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median step time (lower median for an even count); its row records every run's, and the
    kernel time (and top kernels) of the one run that profiled (kernel time barely varies between processes; wall time does)."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["step_ms_median"])
    if not ok:
        return runs[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row["step_ms_runs"] = [r["step_ms_median"] for r in runs if r["status"] == "ok"]
    profiled = [r for r in ok if r.get("gpu_kernel_ms") is not None]
    if row.get("gpu_kernel_ms") is None and profiled:
        row["gpu_kernel_ms"], row["top_kernels"] = profiled[0]["gpu_kernel_ms"], profiled[0].get("top_kernels", [])
    return row


def largest_batch(measure: Callable[[int], dict], start: int, limit: int) -> dict:
    """The row of the largest batch that runs: double from `start` until a cell is not ok (or `limit`), then
    bisect between the last ok batch and the first that was not. If none ran, the first failure's row."""
    best, bad, batch = None, None, start
    while batch <= limit:
        row = measure(batch)
        if row["status"] != "ok":
            bad = row
            break
        best, batch = row, batch * 2
    if best is None:
        return bad
    if bad is not None:
        lo, hi = best["batch_size"], bad["batch_size"]
        while hi - lo > 1:
            row = measure((lo + hi) // 2)
            if row["status"] == "ok":
                best, lo = row, row["batch_size"]
            else:
                hi = row["batch_size"]
    return {**best, "largest_batch": True}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported (it reads TQDM_* at import)
    from lorsbench.bench.cell import add_spec_arguments, compose_cell, output_root, spec_from_args

    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench", description=__doc__.splitlines()[0])
    add_spec_arguments(parser)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS),
                        help="registry names, optionally name:key=value,... (a row per entry)")
    parser.add_argument("--peers", nargs="*", default=[], help="peer rows (lorsbench/bench/peers.py): "
                        "peft_lora authors_lors")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="step modes, each a row per method (cuda_graph: trainer.cuda_graph=true)")
    parser.add_argument("--cuda-graph", action="store_true", help="shorthand for --modes cuda_graph")
    parser.add_argument("--max-batch", nargs="*", default=[], metavar="LABEL",
                        help="also find the largest batch that fits for these labels (a row each, at every seq len)")
    parser.add_argument("--max-batch-limit", type=int, default=64,
                        help="the largest batch the search tries (a row at the limit: nothing larger was tried)")
    parser.add_argument("--no-floor", action="store_true", help="skip the GEMM-rate probe (no × floor)")
    parser.add_argument("--reference", default="lora", help="the row label ratios are taken against")
    parser.add_argument("--out-dir", type=Path, default=None, help="default <paths.output_root>/bench/<gpu>")
    parser.add_argument("--name", default=None, help="file stem; default <model>_<pattern>")
    write = parser.add_mutually_exclusive_group()
    write.add_argument("--append", action="store_true", help="add to an existing table (a re-measured cell "
                       "replaces its row)")
    write.add_argument("--force", action="store_true", help="replace an existing table")
    parser.add_argument("--isolation", choices=("fork", "subprocess"), default="fork")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--repeats", type=int, default=1,
                        help="processes per cell, interleaved across methods; the row keeps the median run")
    args = parser.parse_args(argv)
    modes = args.modes or (["cuda_graph"] if args.cuda_graph else ["eager"])
    labels = [*args.methods, *(f"peer:{p}" for p in args.peers)]
    if not labels:
        parser.error("nothing to measure: give --methods and/or --peers")
    unknown = sorted(set(args.max_batch) - set(labels))
    if unknown:
        parser.error(f"--max-batch {unknown}: not among the measured labels {labels}")

    # Pay the heavy imports once in the parent (forked children inherit them); no CUDA call happens here.
    import torch

    import lorsbench.models  # noqa: F401
    import lorsbench.training  # noqa: F401
    from lorsbench.config import ConfigError

    try:  # every cell's config is composed and validated once, before any model is built
        for label in labels:
            for mode in modes:
                compose_cell(spec_from_args(args, label, max(args.seq_lens), cuda_graph=mode == "cuda_graph"))
        root = output_root(args.override)
    except ConfigError as exc:
        parser.error(str(exc))

    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:  # FSDP cells: one GPU per process (NVML: counts devices without initialising CUDA)
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        gpus = torch.cuda.device_count() if args.device != "cpu" else 0
        if gpus < args.nproc:
            print(f"error: --nproc {args.nproc} runs each cell on {args.nproc} GPUs (torchrun + FSDP2) and this "
                  f"machine has {gpus} CUDA device(s){' (--device cpu)' if args.device == 'cpu' else ''}. Run it on "
                  "a several-GPU machine (scripts/gpu_distributed.sh). Nothing was run or written.", file=sys.stderr)
            return 2
    if args.device != "cpu":  # cuda, cuda:N or auto: the benchmark times GPU steps
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # a fork-safe availability check
        if not torch.cuda.is_available():
            print(f"error: no CUDA device is available (torch {torch.__version__}, CUDA build {torch.version.cuda});"
                  " the benchmark times GPU training steps. Run it on a GPU machine, or pass --device cpu for a "
                  "smoke run. Nothing was run or written.", file=sys.stderr)
            return 2

    name = args.name or f"{args.model}_{args.pattern}" + (
        "" if args.pattern != "unstructured" else f"{args.sparsity if args.sparsity is not None else 0.5:g}") + (
        f"_{args.nproc}gpu" if args.nproc > 1 else "")

    def refuse_existing(out_dir: Path) -> bool:
        existing = [p for p in table.table_paths(out_dir, name)[:2] if p.exists()]
        if existing and not (args.append or args.force):
            print(f"error: {existing[0]} exists. Pass --append to add this run's cells to it (a cell measured again "
                  "replaces its row) or --force to replace it. Nothing was run or written.", file=sys.stderr)
            return True
        return False

    if args.out_dir is not None and refuse_existing(args.out_dir):
        return 2
    probe, why = _fork_call(lambda: _probe(args.device, args.dtype, not args.no_floor), args.timeout)
    if probe is None:
        print(f"error: the device probe failed ({why}). Nothing was run or written.", file=sys.stderr)
        return 2
    out_dir = args.out_dir or root / "bench" / table.slug(probe["gpu"])
    if args.out_dir is None and refuse_existing(out_dir):
        return 2
    csv_path = out_dir / f"{name}.csv"
    rows: list[dict[str, Any]] = table.read_csv(csv_path) if args.append and csv_path.exists() else []
    if probe["gemm_tflops"]:
        print(f"[bench] {probe['gpu']}: {probe['gemm_tflops']:.3g} TFLOP/s measured GEMM rate", flush=True)
    # torchrun starts the processes of a several-GPU cell
    run = _fork_run if args.isolation == "fork" and args.nproc == 1 else _subprocess_run
    failures = 0

    def record(row: dict) -> None:
        nonlocal rows, failures
        failures += row["status"] != "ok"
        status = row["status"] if row["status"] == "ok" else f"{row['status']} ({row.get('error')})"
        def num(key: str, digits: int) -> str:
            return "–" if row.get(key) is None else f"{row[key]:.{digits}f}"

        print(f"[bench] {row['label']:28s} {row.get('batch_size')}×{row['seq_len']:<6d} "
              f"{'graph' if row.get('cuda_graph') else 'eager'}: {status}  step {num('step_ms_median', 1)} ms  "
              f"peak {num('peak_alloc_gib', 2)} GiB  {num('x_floor', 2)}× floor  ({row.get('wall_s') or 0:.0f} s)",
              flush=True)
        rows = [r for r in rows if table.cell_key(r) != table.cell_key(row)] + [row]
        table.write_tables(rows, out_dir, name, NOTES, args.reference, plot_png=False)

    t0 = time.perf_counter()
    cells = [(label, mode == "cuda_graph") for label in labels for mode in modes]
    for seq_len in args.seq_lens:
        def spec(label: str, graph: bool, **changes):
            return spec_from_args(args, label, seq_len, cuda_graph=graph, gemm_tflops=probe["gemm_tflops"], **changes)

        runs: dict[tuple[str, bool], list[dict]] = {cell: [] for cell in cells}
        for _ in range(max(1, args.repeats) - 1):  # earlier repeats, interleaved so drift hits every cell alike
            for cell in cells:  # only the last run of a cell profiles (the profiler adds seconds per run)
                runs[cell].append(run(spec(*cell, profiled_steps=0), args.timeout))
        for cell in cells:
            record(_median_run(runs[cell] + [run(spec(*cell), args.timeout)]))
        for label, graph in cells:
            if label in args.max_batch:
                record(largest_batch(lambda b: run(spec(label, graph, batch_size=b, profiled_steps=0), args.timeout),
                                     args.batch_size, args.max_batch_limit))
    if rows:
        table.write_tables(rows, out_dir, name, NOTES, args.reference, plot_png=not args.no_plot)
        print(table.markdown(table.add_ratios(rows, args.reference), name, (), args.reference))
    print(f"[bench] wrote {out_dir}/{name}.csv|md in {time.perf_counter() - t0:.0f} s; "
          f"{failures} cell(s) failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
