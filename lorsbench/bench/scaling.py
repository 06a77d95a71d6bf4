"""`python -m lorsbench.bench.scaling OUT.md table.csv...`: the efficiency benchmark's cells at 1..N GPUs side by side
(docs/distributed.md "Benchmark"): per method × batch × sequence length and world size, the median step time,
the global tokens/s, the scaling efficiency `tokens/s(N) / (N × tokens/s(1))`, rank 0's and the highest rank's peak
memory, and the peak against `lora` at the same world size (what LoRS's per-layer W_eff adds under FSDP).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lorsbench.bench import table
from lorsbench.records import write_text_atomic


def scaling_frame(rows: list[dict], reference: str = "lora") -> pd.DataFrame:
    """One row per (model, label, batch, seq_len, world_size) of the ok cells, with the derived columns."""
    frame = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    if frame.empty:
        return frame
    frame["world_size"] = frame.get("world_size", pd.Series(1, index=frame.index)).fillna(1).astype(int)
    frame["peak_max_gib"] = frame["peak_alloc_gib_max_over_ranks"].fillna(frame["peak_alloc_gib"]) \
        if "peak_alloc_gib_max_over_ranks" in frame else frame["peak_alloc_gib"]
    cell = ["model", "label", "batch_size", "seq_len"]
    one = frame[frame["world_size"] == 1].set_index(cell)["tokens_per_s"]
    frame["scaling_eff"] = [
        row.tokens_per_s / (row.world_size * one.get(tuple(getattr(row, c) for c in cell), float("nan")))
        for row in frame.itertuples()]
    ref = frame[frame["label"] == reference].set_index(["model", "batch_size", "seq_len", "world_size"])["peak_max_gib"]
    frame["peak_vs_ref"] = [
        row.peak_max_gib / ref.get((row.model, row.batch_size, row.seq_len, row.world_size), float("nan"))
        for row in frame.itertuples()]
    return frame.sort_values(["model", "batch_size", "seq_len", "label", "world_size"])


def markdown(frame: pd.DataFrame, reference: str = "lora") -> str:
    if frame.empty:
        return "(no ok cells)\n"
    lines = []
    for (model, batch, seq), group in frame.groupby(["model", "batch_size", "seq_len"], sort=False):
        lines += [f"## {model}: {batch} × {seq} per GPU", "",
                  "| method | GPUs | step ms | tokens/s (global) | scaling eff. | peak GiB rank 0 | peak GiB max "
                  f"| peak × {reference} |", "|---|---|---|---|---|---|---|---|"]
        for row in group.itertuples():
            def num(value, digits=2):
                return "–" if pd.isna(value) else f"{value:.{digits}f}"
            lines.append(f"| `{row.label}` | {row.world_size} | {num(row.step_ms_median, 1)} | "
                         f"{num(row.tokens_per_s, 0)} | {num(row.scaling_eff)} | {num(row.peak_alloc_gib)} | "
                         f"{num(row.peak_max_gib)} | {num(row.peak_vs_ref)} |")
        lines.append("")
    lines.append("Scaling eff. = global tokens/s at N GPUs over N × the 1-GPU tokens/s (1 GPU: one process, no FSDP). "
                 "Peak: `torch.cuda.max_memory_allocated` in the train phase, rank 0's and the highest rank's; "
                 f"× {reference}: against the `{reference}` row at the same GPUs.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the Markdown table to write")
    parser.add_argument("csvs", type=Path, nargs="+", help="tables of python -m lorsbench.bench (any --nproc)")
    parser.add_argument("--reference", default="lora")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.csvs if not p.is_file()]
    if missing:
        parser.error(f"no such table: {', '.join(missing)}")
    rows = [row for path in args.csvs for row in table.read_csv(path)]
    text = markdown(scaling_frame(rows, args.reference), args.reference)
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
