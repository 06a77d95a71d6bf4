"""`python -m lorsbench.report <run or sweep folders...> --name <name> [--out results/reports] [--reference lora,none]
[--resamples 2000] [--bootstrap-seed 0]`."""
from __future__ import annotations

import argparse
import sys

from lorsbench.report import OUTPUT_FILES, ReportError, StatsOptions, write_report
from lorsbench.report.paired import DEFAULT_REFERENCES, parse_references
from lorsbench.report.stats import DEFAULT_RESAMPLES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorsbench.report",
        description="Collect every run.json under the given folders into tidy tables, plots and a Markdown/HTML "
                    "comparison report.",
        epilog="example: python -m lorsbench.report results/raw/sweeps/main_table_2026-01-01_00-00-00 "
               "--name main_table")
    parser.add_argument("folders", nargs="+", help="run folders, sweep folders, or any folder above them")
    parser.add_argument("--name", required=True, help="report name: the output folder under --out")
    parser.add_argument("--out", default="results/reports", help="where report folders go (default: %(default)s)")
    parser.add_argument("--reference", default=None,
                        help="reference rows for the paired comparisons, comma-separated: none (pruned only), dense, "
                             f"or a method (default: {','.join(DEFAULT_REFERENCES)})")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples per comparison (default: %(default)s)")
    parser.add_argument("--bootstrap-seed", type=int, default=0,
                        help="seed of the bootstrap generator (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        stats = StatsOptions(parse_references(args.reference), args.resamples, args.bootstrap_seed,
                             explicit=args.reference is not None)
        folder = write_report(args.folders, args.name, args.out, stats)
    except ReportError as exc:
        print(f"lorsbench.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(OUTPUT_FILES)} and plots to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
