"""The harness's lm-eval scorer against stock lm-eval on the same model and documents: per task, how many documents
agree under `acc` and `acc_norm`, the largest difference of the gold margin, and each scorer's wall time. Writes
`<out>/scorer_check_<device>.json` and `.md`.

    python -m lorsbench.studies.scorer_check --out results/evaluation                  # CPU: 200 documents a task
    python -m lorsbench.studies.scorer_check --device cuda --all --out results/evaluation   # GPU: every document

The model is the default one, unpruned and untrained (the check is of the scorer, not of a method); the suite and
its subset are the default run's (`conf/eval/zeroshot7.yaml`). docs/evaluation.md §How the accuracy is scored.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lorsbench.config import EvalConfig, ModelConfig
from lorsbench.records import write_json_atomic

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _rows(folder: Path) -> dict[tuple[str, int], dict]:
    with gzip.open(folder / "samples.jsonl.gz", "rt") as handle:
        return {(row["task"], row["doc_id"]): row for row in map(json.loads, handle)}


def compare(stock: dict[tuple[str, int], dict], ours: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Per task: documents, agreements under acc / acc_norm, the largest |margin difference|, both mean accs."""
    if stock.keys() != ours.keys():
        raise ValueError(f"the two scorers scored different documents ({len(stock)} vs {len(ours)})")
    out: dict[str, dict] = {}
    for key in sorted(stock):
        task = out.setdefault(key[0], {"docs": 0, "acc_agree": 0, "acc_norm_agree": 0, "max_margin_diff": 0.0,
                                       "acc_stock": 0.0, "acc_ours": 0.0})
        a, b = stock[key], ours[key]
        task["docs"] += 1
        task["acc_agree"] += a["acc"] == b["acc"]
        task["acc_norm_agree"] += a["acc_norm"] == b["acc_norm"]
        if a["margin"] is not None and b["margin"] is not None:
            task["max_margin_diff"] = max(task["max_margin_diff"], abs(a["margin"] - b["margin"]))
        task["acc_stock"] += a["acc"]
        task["acc_ours"] += b["acc"]
    for task in out.values():
        task["acc_stock"] /= task["docs"]
        task["acc_ours"] /= task["docs"]
    return out


def markdown(result: dict) -> str:
    lines = [f"## lm-eval scorers on {result['model']} ({result['device_name']})", "",
             f"{result['date']} · torch {result['versions']['torch']} · transformers {result['versions']['transformers']}"
             f" · lm_eval {result['versions']['lm_eval']} · {result['dtype']} · batch {result['batch_size']} · "
             f"{'every document' if result['max_examples_per_task'] is None else str(result['max_examples_per_task']) + ' documents a task'}",
             "", f"Wall time of the whole evaluation: stock `HFLM` {result['wall_s']['stock']:.1f} s, "
             f"`BatchedHFLM` {result['wall_s']['batched']:.1f} s.", "",
             "| task | docs | acc agree | acc_norm agree | max \\|Δ margin\\| | acc stock | acc batched |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in result["tasks"].items():
        lines.append(f"| {name} | {t['docs']} | {t['acc_agree']} | {t['acc_norm_agree']} | {t['max_margin_diff']:.2e} "
                     f"| {t['acc_stock']:.4f} | {t['acc_ours']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorsbench.studies.scorer_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--all", action="store_true", help="every document (default: the default run's subset)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/lorsbench").expanduser())
    args = parser.parse_args(argv)

    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from lorsbench.evaluation import evaluate_tasks, prepare_eval
    from lorsbench.evaluation.scoring import BatchedHFLM
    from lorsbench.models import load_model

    device = torch.device(args.device)
    loaded = load_model(ModelConfig(name="smollm2-135m", source="bundled"), torch.float32, device, args.cache_dir)
    config = EvalConfig(suite="zeroshot7", tasks=TASKS, max_examples_per_task=None if args.all else 200,
                        batch_size=args.batch_size, perplexity=None)
    prepared = prepare_eval(config, args.cache_dir)
    rows, wall_s = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, lm_class in (("stock", HFLM), ("batched", BatchedHFLM)):
            started = time.perf_counter()
            evaluate_tasks(loaded.model, loaded.tokenizer, prepared, config, device, Path(scratch) / name, lm_class)
            wall_s[name] = time.perf_counter() - started
            rows[name] = _rows(Path(scratch) / name)
            print(f"[scorer_check] {name}: {len(rows[name])} documents in {wall_s[name]:.1f} s", flush=True)
    result = {
        "model": "smollm2-135m", "device": device.type, "dtype": "float32", "batch_size": args.batch_size,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "max_examples_per_task": config.max_examples_per_task, "date": datetime.now(timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lm_eval": lm_eval.__version__},
        "wall_s": wall_s, "tasks": compare(rows["stock"], rows["batched"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scorer_check_{device.type}"
    write_json_atomic(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
