"""Fair learning rates: pick each method's lr from an lr sweep by its held-out instruction loss.

    python -m lorsbench experiment=lr_sweep                      # every method x a grid of lrs (conf/experiment)
    python -m lorsbench.lr_choice results/raw/sweeps/lr_sweep_* --out results/methods/lr_choice.json
    python -m lorsbench experiment=methods_table trainer.lr_from=results/methods/lr_choice.json

The methods parameterize their updates differently (the LoRS authors' scripts train SPP at lr 1e-3 and the others
at 2e-5), so one shared lr can favour some. The choice is scored on `val_loss` (held-out instruction examples,
never trained on and disjoint from the evaluation documents), per (model, pruner, pattern, sparsity, method);
every run that uses the file records `lr_source` (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lorsbench.config import ConfigError
from lorsbench.records import RECORD_FILE, write_json_atomic

CHOICE_VERSION = 1


def choice_key(model: str, pruner: str, pattern: str, sparsity: float, method: str) -> str:
    return f"{model}|{pruner}|{pattern}|s{float(sparsity):g}|{method}"


def select(records: list[dict]) -> dict[str, dict]:
    """{key: {lr, val_loss, grid: {lr: [val_loss per seed]}, runs}}: the lr with the lowest mean val_loss.

    Only successful, full (not smoke) runs with a finite val_loss count."""
    grid: dict[str, dict[float, list[float]]] = {}
    for rec in records:
        loss = rec.get("val_loss")
        if rec.get("status") != "success" or rec.get("smoke") or loss is None or not math.isfinite(loss):
            continue
        key = choice_key(rec["model"], rec["pruner"], rec["pattern"], rec["target_sparsity"], rec["method"])
        grid.setdefault(key, {}).setdefault(float(rec["lr"]), []).append(float(loss))
    chosen = {}
    for key, by_lr in sorted(grid.items()):
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        best = min(means, key=means.get)
        chosen[key] = {"lr": best, "val_loss": means[best], "runs": sum(len(v) for v in by_lr.values()),
                       "grid": {f"{lr:g}": by_lr[lr] for lr in sorted(by_lr)},
                       "at_grid_edge": len(means) > 1 and best in (min(means), max(means))}
    return chosen


def chosen_lr(path: str | Path, model: str, pruner: str, pattern: str, sparsity: float,
              method: str) -> tuple[float, str]:
    """(lr, lr_source) for one run from a chosen-lr file; ConfigError naming the key and the file otherwise."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists():  # a preset's repository-relative path, run from elsewhere
        path = Path(__file__).resolve().parent.parent / path
    try:
        payload = json.loads(path.read_text())
        table = payload["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"trainer.lr_from={path}: not a readable chosen-lr file ({exc}); write one with "
                          f"`python -m lorsbench.lr_choice <lr sweep folders> --out {path}`") from exc
    key = choice_key(model, pruner, pattern, sparsity, method)
    if key not in table:
        raise ConfigError(f"trainer.lr_from={path} has no lr for {key}. It has: {', '.join(sorted(table))}. "
                          "Run the lr sweep for this configuration, or drop trainer.lr_from.")
    return float(table[key]["lr"]), f"lr_sweep:{path.resolve()}#{key}"


def _records(folders: list[str]) -> list[dict]:
    out = []
    for folder in folders:
        for path in sorted(Path(folder).rglob(RECORD_FILE)):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                print(f"[lorsbench] skipped {path}: {exc}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorsbench.lr_choice", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="lr sweep folders (searched for run.json)")
    parser.add_argument("--out", required=True, help="the chosen-lr JSON to write (trainer.lr_from reads it)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        parser.error(f"{out} exists; pass --force to replace it")
    chosen = select(_records(args.folders))
    if not chosen:
        parser.error(f"no successful run with a val_loss under {args.folders}")
    write_json_atomic(out, {"version": CHOICE_VERSION, "signal": "val_loss (held-out instruction examples)",
                            "inputs": args.folders, "chosen": chosen})
    for key, row in chosen.items():
        grid = ", ".join(f"{lr}: {sum(v) / len(v):.4f}" for lr, v in row["grid"].items())
        edge = "  (best at the grid's edge: widen it)" if row["at_grid_edge"] else ""
        print(f"{key}: lr {row['lr']:g}  [{grid}]{edge}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
