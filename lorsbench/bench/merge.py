"""`python -m lorsbench.bench.merge OUT_DIR CSV [CSV ...]`: merge bench CSVs (one per device call, say) into
`OUT_DIR/<stem>.csv|md|png`, grouped by file stem. A later file's row replaces an earlier one of the same cell
(label, step mode, batch, sequence length); ratios, the Markdown table and the plot are recomputed from the merged rows.

    python -m lorsbench.bench.merge results/efficiency/nvidia-h200 call1/*.csv call2/*.csv \\
        --note "lora, lors: median of 3 processes"
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from lorsbench.bench import table


def merge_rows(groups: Sequence[Sequence[dict[str, Any]]], reference: str = "lora") -> list[dict[str, Any]]:
    """Rows of every group, later groups winning on the cell (`table.cell_key`); the reference's rows first, then
    labels in the order they were first seen, each by step mode, batch and sequence length."""
    rows = [row for group in groups for row in group]
    latest = {table.cell_key(row): row for row in rows}
    labels = list(dict.fromkeys(row["label"] for row in rows))
    labels.sort(key=lambda label: label != reference)  # stable: keeps first-sight order among the rest
    position = {label: i for i, label in enumerate(labels)}
    return [latest[key] for key in sorted(latest, key=lambda key: (position[key[0]], *key[1:]))]


def main(argv: list[str] | None = None) -> int:
    from lorsbench.bench.__main__ import NOTES

    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench.merge", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("csvs", type=Path, nargs="+", help="bench CSVs, earliest first")
    parser.add_argument("--reference", default="lora")
    parser.add_argument("--note", action="append", default=[], help="a line for the table's notes (repeatable)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.csvs if not p.is_file()]
    if missing:
        parser.error(f"no such CSV: {', '.join(missing)}")
    by_stem: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for path in args.csvs:
        by_stem[path.stem].append(table.read_csv(path))
    for stem, groups in by_stem.items():
        rows = merge_rows(groups, args.reference)
        if rows:
            table.write_tables(rows, args.out_dir, stem, (*NOTES, *args.note), args.reference, not args.no_plot)
            print(f"[merge] {args.out_dir / stem}.csv|md: {len(rows)} rows from {len(groups)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
