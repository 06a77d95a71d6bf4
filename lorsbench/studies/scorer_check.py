"""The harness's lm-eval scorer against stock lm-eval on the same model and documents: per task, how many documents
agree under `acc` and `acc_norm`, the largest difference of the gold margin, and each scorer's wall time. Writes
`<out>/scorer_check_<device>.json` and `.md`.

    python -m lorsbench.studies.scorer_check --out results/evaluation                  # CPU: 200 documents a task
    python -m lorsbench.studies.scorer_check --device cuda --all --out results/evaluation   # GPU: every document

The model, the suite and its subset are the default run's (conf/, composed as `python -m lorsbench` does); the model
is unpruned and untrained (the check is of the scorer, not of a method). docs/evaluation.md §How the accuracy is
scored.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lorsbench.records import write_json_atomic, write_text_atomic
from lorsbench.report.samples import TaskSamples, read_samples
from lorsbench.runtime import torch_dtype


def compare(stock: dict[str, TaskSamples], ours: dict[str, TaskSamples]) -> dict[str, dict]:
    """Per task: documents, agreements under acc / acc_norm, the largest |margin difference|, both mean accs."""
    if stock.keys() != ours.keys() or any(not np.array_equal(stock[t].doc_ids, ours[t].doc_ids) for t in stock):
        raise ValueError(f"the two scorers scored different documents "
                         f"({sum(len(t.doc_ids) for t in stock.values())} vs {sum(len(t.doc_ids) for t in ours.values())})")
    out: dict[str, dict] = {}
    for name in sorted(stock):
        a, b = stock[name], ours[name]
        if a.acc_norm is None or b.acc_norm is None:
            norm_agree = len(a.doc_ids) if a.acc_norm is None and b.acc_norm is None else 0
        else:
            norm_agree = int((a.acc_norm == b.acc_norm).sum())
        margin_diff = np.abs(a.margin - b.margin)
        out[name] = {"docs": len(a.doc_ids), "acc_agree": int((a.acc == b.acc).sum()), "acc_norm_agree": norm_agree,
                     "max_margin_diff": float(np.nanmax(margin_diff)) if np.isfinite(margin_diff).any() else 0.0,
                     "acc_stock": float(a.acc.mean()), "acc_ours": float(b.acc.mean())}
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
    parser.add_argument("--max-examples", type=int, default=None, help="documents a task (default: the default run's)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from lorsbench.composition import compose_config
    from lorsbench.config import build_run_config
    from lorsbench.evaluation import evaluate_tasks, prepare_eval
    from lorsbench.evaluation.lm_eval_runner import SAMPLES_FILE
    from lorsbench.evaluation.scoring import BatchedHFLM
    from lorsbench.models import load_model

    run_cfg = build_run_config(compose_config(["dtype=float32"]))
    device = torch.device(args.device)
    loaded = load_model(run_cfg.model, torch_dtype(run_cfg.dtype, device), device, run_cfg.paths.cache_dir)
    config = replace(run_cfg.eval, batch_size=args.batch_size, perplexity=None,
                     max_examples_per_task=None if args.all else args.max_examples or run_cfg.eval.max_examples_per_task)
    prepared = prepare_eval(config, run_cfg.paths.cache_dir)
    rows, wall_s = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, lm_class in (("stock", HFLM), ("batched", BatchedHFLM)):
            started = time.perf_counter()
            evaluate_tasks(loaded.model, loaded.tokenizer, prepared, config, device, Path(scratch) / name, lm_class)
            wall_s[name] = time.perf_counter() - started
            rows[name] = read_samples(Path(scratch) / name / SAMPLES_FILE)
            print(f"[scorer_check] {name}: {sum(len(t.doc_ids) for t in rows[name].values())} documents in {wall_s[name]:.1f} s", flush=True)
    result = {
        "model": run_cfg.model.name, "suite": config.suite, "device": device.type, "dtype": run_cfg.dtype,
        "batch_size": args.batch_size,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "max_examples_per_task": config.max_examples_per_task, "date": datetime.now(timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lm_eval": lm_eval.__version__},
        "wall_s": wall_s, "tasks": compare(rows["stock"], rows["batched"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scorer_check_{device.type}"
    write_json_atomic(stem.with_suffix(".json"), result)
    write_text_atomic(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
