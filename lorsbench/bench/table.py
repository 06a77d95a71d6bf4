"""Efficiency rows -> CSV, Markdown (with ratios vs the reference method) and a PNG plot."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

from lorsbench.records import write_text_atomic

COLUMNS = ("label", "method", "model", "pattern", "sparsity", "seq_len", "batch_size", "dtype", "status", "step_ms_median",
           "step_ms_p90", "time_vs_ref", "gpu_kernel_ms", "kernel_vs_ref", "peak_alloc_gib", "mem_vs_ref", "peak_reserved_gib", "static_alloc_gib",
           "saved_activations_gib", "trainable_params", "tokens_per_s", "measured_steps", "gpu", "torch_version",
           "triton_version", "date_utc", "step_ms_runs", "step_mode", "cuda_graph_fallback", "error", "method_config")


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def add_ratios(rows: list[dict[str, Any]], reference: str = "lora") -> list[dict[str, Any]]:
    """`time_vs_ref`, `mem_vs_ref` and `kernel_vs_ref`: each ok row over the reference row of the same model, pattern and seq_len."""
    refs = {(r["model"], r["pattern"], r["seq_len"]): r for r in rows if r["label"] == reference and r["status"] == "ok"}
    out = []
    for row in rows:
        row = dict(row)
        ref = refs.get((row["model"], row["pattern"], row["seq_len"]))
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


def write_tables(rows: list[dict[str, Any]], out_dir: Path, name: str, notes: Sequence[str] = (),
                 reference: str = "lora", plot_png: bool = True) -> None:
    """`<out_dir>/<name>.csv|md` (and `.png`) from the rows, ratios vs `reference` recomputed."""
    rows = add_ratios(rows, reference)
    first = rows[0]
    title = f"Training-step efficiency: {first['model']}, {first['pattern']}, batch {first['batch_size']}"
    write_csv(rows, out_dir / f"{name}.csv")
    write_text_atomic(out_dir / f"{name}.md", markdown(rows, title, notes, reference))
    if plot_png:
        plot(rows, out_dir / f"{name}.png", title)


def read_csv(path: Path) -> list[dict[str, Any]]:
    def convert(key: str, value: str):
        if value == "":
            return None
        if key in ("seq_len", "batch_size", "trainable_params", "measured_steps"):
            return int(float(value))
        if key in ("sparsity", "step_ms_median", "step_ms_p90", "time_vs_ref", "peak_alloc_gib", "mem_vs_ref",
                   "gpu_kernel_ms", "kernel_vs_ref", "peak_reserved_gib", "static_alloc_gib", "saved_activations_gib", "tokens_per_s"):
            return float(value)
        if key in ("method_config", "step_ms_runs"):
            return json.loads(value)
        return value

    with open(path, newline="") as handle:
        return [{k: convert(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(row: dict[str, Any] | None, kernel: bool) -> list[str]:
    width = 3 if kernel else 2
    if row is None:
        return [""] * width
    if row["status"] != "ok":
        return [row["status"].upper()] * width
    cells = [f"{_fmt(row['peak_alloc_gib'], 2)} ({_fmt(row.get('mem_vs_ref'), 2)}×)",
             f"{_fmt(row['step_ms_median'])} ({_fmt(row.get('time_vs_ref'), 2)}×)"]
    if kernel:
        cells.append(f"{_fmt(row.get('gpu_kernel_ms'))} ({_fmt(row.get('kernel_vs_ref'), 2)}×)")
    return cells


def markdown(rows: Sequence[dict[str, Any]], title: str, notes: Sequence[str] = (), reference: str = "lora") -> str:
    """Headline table (rows: methods; per sequence length: peak GiB and median step ms with × reference), then
    the full numbers."""
    rows = list(rows)
    if not rows:
        return f"## {title}\n\n(no rows)\n"
    first = next((r for r in rows if r.get("gpu")), rows[0])
    seqs = sorted({r["seq_len"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["seq_len"]): r for r in rows}
    lines = [f"## {title}", "",
             f"GPU: {first.get('gpu')} · torch {first.get('torch_version')} · triton {first.get('triton_version')} · "
             f"{first.get('date_utc')} (UTC) · model {first['model']} (random weights) · pattern {first['pattern']} "
             f"(sparsity {first['sparsity']:g}) · batch {first['batch_size']} · {first.get('dtype', 'bfloat16')} · "
             f"ratios vs `{reference}`", ""]
    kernel = any(r.get("gpu_kernel_ms") is not None for r in rows)
    per_seq = "peak GiB @{s} | step ms @{s}" + (" | kernel ms @{s}" if kernel else "")
    header = "| method | " + " | ".join(per_seq.format(s=s) for s in seqs) + " |"
    lines += [header, "|" + "---|" * (1 + (3 if kernel else 2) * len(seqs))]
    for label in labels:
        cells = []
        for s in seqs:
            cells.extend(_cell(by.get((label, s)), kernel))
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", "Full numbers (peak = `max_memory_allocated` during training, weights included; static = allocated "
              "when training starts; saved = activations autograd keeps for backward in one forward; kernel = device "
              "time of the step's kernels, host gaps excluded):", "",
              "| method | seq | status | step ms median | p90 | kernel ms | peak alloc GiB | peak reserved GiB | "
              "static GiB | saved GiB | trainable params |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        for s in seqs:
            r = by.get((label, s))
            if r is None:
                continue
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error') or ''}"
            lines.append(f"| `{label}` | {s} | {status} | {_fmt(r['step_ms_median'])} | {_fmt(r['step_ms_p90'])} | "
                         f"{_fmt(r.get('gpu_kernel_ms'))} | {_fmt(r['peak_alloc_gib'], 2)} | {_fmt(r['peak_reserved_gib'], 2)} | "
                         f"{_fmt(r['static_alloc_gib'], 2)} | {_fmt(r['saved_activations_gib'], 2)} | "
                         f"{r.get('trainable_params') or '–'} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Peak memory, median step time and (where measured) kernel time against sequence length, one line per
    method. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    labels = list(dict.fromkeys(r["label"] for r in ok))
    panels = [("peak_alloc_gib", "peak max_memory_allocated (GiB)"), ("step_ms_median", "median step time (ms)")]
    if any(r.get("gpu_kernel_ms") is not None for r in ok):
        panels.append(("gpu_kernel_ms", "device kernel time per step (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for label in labels:
        mine = sorted((r for r in ok if r["label"] == label), key=lambda r: r["seq_len"])
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["seq_len"], r[key]) for r in mine if r.get(key) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
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
