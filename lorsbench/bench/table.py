"""Efficiency results -> CSV, Markdown (ratios vs the reference row, × FLOP floor) and a PNG plot.

A cell is keyed by (label, cuda_graph, batch_size, seq_len) (`cell_key`). Markdown tables are rendered by the
report's one table writer (`lorsbench.report.document.table_markdown`).
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

from lorsbench.records import write_text_atomic
from lorsbench.report.document import Table, table_markdown

COLUMNS = ("label", "method", "peer", "model", "pattern", "sparsity", "seq_len", "batch_size", "dtype", "cuda_graph",
           "step_mode", "cuda_graph_fallback", "status", "step_ms_median", "step_ms_p90", "time_vs_ref",
           "gpu_kernel_ms", "kernel_vs_ref", "peak_alloc_gib", "mem_vs_ref", "peak_reserved_gib", "static_alloc_gib",
           "saved_activations_gib", "trainable_params", "tokens_per_s", "step_gflop", "gemm_tflops", "floor_ms",
           "x_floor", "largest_batch", "world_size", "peak_alloc_gib_max_over_ranks", "measured_steps", "gpu",
           "torch_version", "triton_version", "date_utc",
           "step_ms_runs", "phase", "error", "method_config", "top_kernels")
_INTS = ("seq_len", "batch_size", "trainable_params", "measured_steps", "world_size")
_FLOATS = ("sparsity", "step_ms_median", "step_ms_p90", "time_vs_ref", "peak_alloc_gib", "mem_vs_ref", "gpu_kernel_ms",
           "kernel_vs_ref", "peak_reserved_gib", "static_alloc_gib", "saved_activations_gib", "tokens_per_s",
           "step_gflop", "gemm_tflops", "floor_ms", "x_floor", "peak_alloc_gib_max_over_ranks")
_BOOLS = ("peer", "cuda_graph", "largest_batch")
_JSON = ("method_config", "step_ms_runs", "top_kernels")


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cell_key(row: dict[str, Any]) -> tuple[str, bool, int, int]:
    """(label, cuda_graph, batch_size, seq_len): one cell of the table (older CSVs: eager, batch 1)."""
    return row["label"], bool(row.get("cuda_graph")), int(row.get("batch_size") or 1), int(row["seq_len"])


def row_name(row: dict[str, Any]) -> str:
    """The table's row label: the cell label, `· graph` in CUDA-graph mode, `(peer)` for a peer."""
    text = f"`{row['label']}`" + (" · graph" if row.get("cuda_graph") else "")
    return text + (" (peer)" if row.get("peer") else "")


def _load(row: dict[str, Any]) -> str:
    batch = int(row.get("batch_size") or 1)
    return f"{batch}×{row['seq_len']}" if batch != 1 else str(row["seq_len"])


def add_ratios(rows: list[dict[str, Any]], reference: str = "lora") -> list[dict[str, Any]]:
    """`time_vs_ref`, `mem_vs_ref`, `kernel_vs_ref`: each row over the ok reference row of the same model,
    pattern, batch, seq_len and step mode."""
    def where(r):
        return r["model"], r["pattern"], cell_key(r)[1:]

    refs = {where(r): r for r in rows if r["label"] == reference and r["status"] == "ok"}
    out = []
    for row in rows:
        row = dict(row)
        ref = refs.get(where(row))
        row["time_vs_ref"] = _ratio(row.get("step_ms_median"), ref and ref.get("step_ms_median"))
        row["mem_vs_ref"] = _ratio(row.get("peak_alloc_gib"), ref and ref.get("peak_alloc_gib"))
        row["kernel_vs_ref"] = _ratio(row.get("gpu_kernel_ms"), ref and ref.get("gpu_kernel_ms"))
        out.append(row)
    return out


def _ratio(value, ref) -> float | None:
    if value is None or not ref or value != value:
        return None
    return value / ref


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The rows as CSV (COLUMNS), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def table_paths(out_dir: Path, name: str) -> list[Path]:
    """The files `write_tables` writes (the PNG only when plotting)."""
    return [out_dir / f"{name}.{ext}" for ext in ("csv", "md", "png")]


def write_tables(rows: list[dict[str, Any]], out_dir: Path, name: str, notes: Sequence[str] = (),
                 reference: str = "lora", plot_png: bool = True) -> None:
    """`<out_dir>/<name>.csv|md` (and `.png`) from the rows, ratios vs `reference` recomputed."""
    rows = add_ratios(rows, reference)
    first = rows[0]
    title = f"Training-step efficiency: {first['model']}, {first['pattern']}"
    write_csv(rows, out_dir / f"{name}.csv")
    write_text_atomic(out_dir / f"{name}.md", markdown(rows, title, notes, reference))
    if plot_png:
        plot(rows, out_dir / f"{name}.png", title)


def read_csv(path: Path) -> list[dict[str, Any]]:
    def convert(key: str, value: str):
        if key in _BOOLS:  # empty in CSVs older than the column: eager, a method, a protocol batch
            return value == "True"
        if value == "":
            return None
        if key in _INTS:
            return int(float(value))
        if key in _FLOATS:
            return float(value)
        if key in _JSON:
            return json.loads(value)
        return value

    with open(path, newline="") as handle:
        return [{k: convert(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cells(row: dict[str, Any] | None, kernel: bool, floor: bool) -> list[str]:
    width = 2 + kernel + floor
    if row is None:
        return [""] * width
    if row["status"] != "ok":
        return [f"**{row['status'].upper()}**"] * width
    cells = [f"{_fmt(row['peak_alloc_gib'], 2)} ({_fmt(row.get('mem_vs_ref'), 2)}×)",
             f"{_fmt(row['step_ms_median'])} ({_fmt(row.get('time_vs_ref'), 2)}×)"]
    if kernel:
        cells.append(f"{_fmt(row.get('gpu_kernel_ms'))} ({_fmt(row.get('kernel_vs_ref'), 2)}×)")
    if floor:
        cells.append(f"{_fmt(row.get('x_floor'), 2)}×")
    return cells


def markdown(rows: Sequence[dict[str, Any]], title: str, notes: Sequence[str] = (), reference: str = "lora") -> str:
    """Headline table (rows: methods and peers per step mode; per batch × sequence length: peak GiB, median
    step ms and kernel ms with × reference, and × FLOP floor), then the full numbers."""
    rows = list(rows)
    if not rows:
        return f"## {title}\n\n(no rows)\n"
    first = next((r for r in rows if r.get("gpu")), rows[0])
    loads = sorted({cell_key(r)[2:] for r in rows})
    names = list(dict.fromkeys(row_name(r) for r in rows))
    by = {(row_name(r), cell_key(r)[2:]): r for r in rows}
    sparsity = first.get("sparsity")
    rate = next((r["gemm_tflops"] for r in rows if r.get("gemm_tflops")), None)
    lines = [f"## {title}", "",
             f"GPU: {first.get('gpu')} · torch {first.get('torch_version')} · triton {first.get('triton_version')} · "
             f"{first.get('date_utc')} (UTC) · model {first['model']} (random weights) · pattern {first['pattern']} "
             f"(sparsity {'–' if sparsity is None else f'{sparsity:g}'}) · {first.get('dtype', 'bfloat16')} · "
             f"ratios vs `{reference}`" + (f" · FLOP floor at a measured {rate:.3g} TFLOP/s GEMM" if rate else ""), ""]
    kernel = any(r.get("gpu_kernel_ms") is not None for r in rows)
    floor = any(r.get("x_floor") is not None for r in rows)
    columns = ["method"]
    for batch, seq in loads:
        at = f"{batch}×{seq}" if batch != 1 else str(seq)
        columns += [f"peak GiB @{at}", f"step ms @{at}"] + ([f"kernel ms @{at}"] if kernel else []) + (
            [f"× floor @{at}"] if floor else [])
    headline = [[name] + [c for load in loads for c in _cells(by.get((name, load)), kernel, floor)] for name in names]
    full = []
    for name in names:
        for load in loads:
            r = by.get((name, load))
            if r is None:
                continue
            status = r["status"] if r["status"] == "ok" else f"{r['status']} ({r.get('phase')}): {r.get('error') or ''}"
            mode = r.get("step_mode") or ("cuda_graph" if r.get("cuda_graph") else "eager")
            if r.get("cuda_graph_fallback"):
                mode += f" (fallback: {r['cuda_graph_fallback']})"
            full.append([name, _load(r) + (" (largest that fits)" if r.get("largest_batch") else ""), mode, status,
                         _fmt(r["step_ms_median"]), _fmt(r["step_ms_p90"]), _fmt(r.get("gpu_kernel_ms")),
                         _fmt(r.get("floor_ms")), _fmt(r.get("x_floor"), 2), _fmt(r.get("tokens_per_s"), 0),
                         _fmt(r["peak_alloc_gib"], 2), _fmt(r["peak_reserved_gib"], 2), _fmt(r["static_alloc_gib"], 2),
                         _fmt(r["saved_activations_gib"], 2), str(r.get("trainable_params") or "–")])
    lines += [table_markdown(Table(columns, headline)), "",
              "Full numbers (peak = `max_memory_allocated` during training, weights included; static = allocated "
              "when training starts; saved = activations autograd keeps for backward in one forward; kernel = device "
              "time of the step's kernels, host gaps excluded; floor = the step's GEMM FLOPs at the measured GEMM "
              "rate):", "",
              table_markdown(Table(["method", "batch × seq", "step mode", "status", "step ms median", "p90",
                                    "kernel ms", "floor ms", "× floor", "tokens/s", "peak alloc GiB",
                                    "peak reserved GiB", "static GiB", "saved GiB", "trainable params"], full))]
    profiled = [(name, load) for name in names for load in loads if (by.get((name, load)) or {}).get("top_kernels")]
    if profiled:
        lines += ["", "Where the kernel time goes (the longest kernels of each profiled cell, ms per step):", "",
                  table_markdown(Table(["method", "batch × seq", "kernel ms", "top kernels"], [
                      [name, _load(by[(name, load)]), _fmt(by[(name, load)].get("gpu_kernel_ms")),
                       "; ".join(f"`{k}` {ms:.1f}" for k, ms in by[(name, load)]["top_kernels"])]
                      for name, load in profiled]))]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Peak memory, median step time and (where measured) kernel time against sequence length at batch 1, one
    line per row label and step mode. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["status"] == "ok" and int(r.get("batch_size") or 1) == 1]
    names = list(dict.fromkeys(row_name(r) for r in ok))
    panels = [("peak_alloc_gib", "peak max_memory_allocated (GiB)"), ("step_ms_median", "median step time (ms)")]
    if any(r.get("gpu_kernel_ms") is not None for r in ok):
        panels.append(("gpu_kernel_ms", "device kernel time per step (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for name in names:
        mine = sorted((r for r in ok if row_name(r) == name), key=lambda r: r["seq_len"])
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["seq_len"], r[key]) for r in mine if r.get(key) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name.replace("`", ""))
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
