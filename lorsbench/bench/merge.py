"""`python -m lorsbench.bench.merge OUT_DIR CSV [CSV ...]`: merge bench CSVs (one per device call, say) into
`OUT_DIR/<stem>.csv|md|png`, grouped by file stem. A later file's row replaces an earlier one with the same label
and sequence length; ratios, the Markdown table and the plot are recomputed from the merged rows.

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
from lorsbench.records import write_text_atomic

# Row order in the tables: the reference first, then LoRS and its variants, then the other methods.
METHOD_ORDER = ("lora", "lors", "lors_exact", "spp", "sqft", "slope", "full_sparse_ft")


def merge_rows(groups: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of every group, later groups winning on (label, seq_len), ordered by METHOD_ORDER then first sight."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for rows in groups:
        for row in rows:
            merged.pop((row["label"], row["seq_len"]), None)
            merged[(row["label"], row["seq_len"])] = row
    first_seen = {key: i for i, key in enumerate(dict.fromkeys(label for label, _ in merged))}

    def order(row: dict[str, Any]) -> tuple[int, int, int]:
        rank = METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else len(METHOD_ORDER)
        return rank, first_seen[row["label"]], row["seq_len"]

    return sorted(merged.values(), key=order)


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
        rows = table.add_ratios(merge_rows(groups), args.reference)
        if not rows:
            continue
        first = rows[0]
        title = f"Training-step efficiency: {first['model']}, {first['pattern']}, batch {first['batch_size']}"
        table.write_csv(rows, args.out_dir / f"{stem}.csv")
        write_text_atomic(args.out_dir / f"{stem}.md", table.markdown(rows, title, (*NOTES, *args.note), args.reference))
        if not args.no_plot:
            table.plot(rows, args.out_dir / f"{stem}.png", title)
        print(f"[merge] {args.out_dir / stem}.csv|md: {len(rows)} rows from {len(groups)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
