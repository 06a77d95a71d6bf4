"""`lorsbench <command> [args]`: the one command-line face of the package (the `lorsbench` console script).

Each command is the `main` of a module that also runs as `python -m <module>`; `lorsbench run` is
`python -m lorsbench` (Hydra overrides). `lorsbench <command> --help` shows a command's own options.
"""
from __future__ import annotations

import importlib
import runpy
import sys

# command -> (module:function, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("lorsbench.cli:run", "one run or a Hydra sweep (-m): prune, fine-tune, merge, evaluate, record"),
    "report": ("lorsbench.report.__main__:main", "tables, plots and statistics from run records"),
    "bench": ("lorsbench.bench.__main__:main", "the efficiency benchmark: one process per cell, step time and memory"),
    "bench-layer": ("lorsbench.bench.layer:main", "one pruned linear per method: kernel-time profiling, --tune"),
    "lr-choice": ("lorsbench.lr_choice:main", "the chosen learning rate per cell from an lr sweep"),
    "select-suite": ("lorsbench.studies.select_suite:main", "measure which BIG-bench tasks the offline suite keeps"),
    "measure-pruning": ("lorsbench.studies.measure_pruning:main", "perplexity, time and memory of every pruner"),
    "scorer-check": ("lorsbench.studies.scorer_check:main", "the harness's lm-eval scorer against stock lm-eval"),
}


def run(argv: list[str]) -> None:
    """Exactly `python -m lorsbench ...`: run as `__main__`, Hydra finds conf/ beside the package file."""
    sys.argv = ["lorsbench run", *argv]
    runpy.run_module("lorsbench", run_name="__main__", alter_sys=True)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: lorsbench <command> [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from lorsbench.errors import unknown_name_error

        print(f"error: {unknown_name_error('command', command, list(COMMANDS))}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[command][0].partition(":")
    sys.argv = [f"lorsbench {command}", *rest]  # argparse and Hydra name the command in their messages
    status = getattr(importlib.import_module(module), function)(rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
