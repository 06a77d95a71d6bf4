"""Choose the offline evaluation suite by measurement: `python -m lorsbench.evaluation.select_suite`.

The dense default model (bf16, CPU) is scored with lm-eval on candidate BIG-bench multiple-choice tasks, converted
exactly as the offline suite converts them (same seed, same <= 200-document subset, choices shuffled). A task is
kept when its accuracy is at least 2 standard errors above the better of two baselines:
- uniform chance, mean of 1/num_choices over the documents;
- the majority label, the share of the most common gold answer text (binary tasks are often unbalanced, and a
  small model that always answers one label scores exactly that; docs/environment.md §BIG-bench tasks).
With b = max(chance, majority) and n documents, z = (acc - b) / sqrt(b (1 - b) / n) (one-sided binomial test of
the baseline); kept iff z >= 2. Tasks used for training (conf/data/bigbench_mix.yaml) are never candidates.

Writes `results/eval_suite/selection.csv`, `selection.md`, lm-eval's raw JSON per task, and sets the `tasks:` of
`conf/eval/bigbench.yaml` to the kept tasks (ordered by z).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from lorsbench.runtime import torch_dtype

REPO = Path(__file__).resolve().parents[2]
Z_KEEP = 2.0

# The tasks screened on this model (docs/environment.md §BIG-bench tasks), minus conf/data/bigbench_mix.yaml's
# training tasks (removed again at run time from the composed config, in case that list changes), minus the two
# costly ones that screening put far from the threshold (goal_step_wikihow/step_inference,
# logical_deduction/five_objects). Pass --tasks to widen.
CANDIDATES = (
    "unit_conversion/unit_identification", "unit_conversion/si_conversion", "general_knowledge",
    "date_understanding", "penguins_in_a_table", "physics", "ruin_names", "reasoning_about_colored_objects",
    "hindu_knowledge", "riddle_sense", "phrase_relatedness", "metaphor_boolean", "cause_and_effect/one_sentence",
    "physical_intuition", "multiemo/products_sentence_en", "color/rgb", "entailed_polarity",
)


@dataclass(frozen=True)
class TaskSelection:
    task: str
    n: int
    chance_acc: float
    majority_acc: float
    baseline_acc: float
    acc: float
    acc_stderr: float
    acc_norm: float
    z: float
    kept: bool
    eval_s: float

    @property
    def examples_per_s(self) -> float:
        return self.n / self.eval_s if self.eval_s > 0 else math.nan


def z_above_baseline(acc: float, baseline: float, n: int) -> float:
    """(acc - b) / sqrt(b (1 - b) / n): standard errors above the baseline rate b under the null."""
    se = math.sqrt(baseline * (1.0 - baseline) / n)
    return (acc - baseline) / se if se > 0 else math.inf * (1 if acc > baseline else -1)


def judge(task: str, n: int, chance: float, majority: float, acc: float, acc_stderr: float, acc_norm: float,
          eval_s: float) -> TaskSelection:
    baseline = max(chance, majority)
    z = z_above_baseline(acc, baseline, n)
    return TaskSelection(task=task, n=n, chance_acc=chance, majority_acc=majority, baseline_acc=baseline, acc=acc,
                         acc_stderr=acc_stderr, acc_norm=acc_norm, z=z, kept=z >= Z_KEEP, eval_s=eval_s)


def _compose(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("lm_eval", "torch", "transformers", "datasets")}


def write_csv(rows: list[TaskSelection], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "n", "chance_acc", "majority_acc", "baseline_acc", "acc", "acc_stderr", "acc_norm",
                         "z", "kept", "eval_s", "examples_per_s"])
        for r in rows:
            writer.writerow([r.task, r.n, f"{r.chance_acc:.4f}", f"{r.majority_acc:.4f}", f"{r.baseline_acc:.4f}",
                             f"{r.acc:.4f}", f"{r.acc_stderr:.4f}", f"{r.acc_norm:.4f}", f"{r.z:.2f}",
                             int(r.kept), f"{r.eval_s:.1f}", f"{r.examples_per_s:.2f}"])


def write_markdown(rows: list[TaskSelection], path: Path, meta: dict) -> None:
    kept = [r.task for r in rows if r.kept]
    lines = [
        "# Offline evaluation suite: selection by measurement",
        "",
        f"Measured {meta['date']} by `python -m lorsbench.evaluation.select_suite` ({meta['wall_min']:.1f} min).",
        "",
        f"- Model: the dense default `{meta['model']}` ({meta['model_source']}), dtype {meta['dtype']}, "
        f"device {meta['device']} ({meta['threads']} torch thread(s), {meta['machine']}, {os.cpu_count()} cores "
        f"shared with other jobs: 1-min load average {meta['load_avg'][0]} at start, {meta['load_avg'][1]} at end, "
        f"so the times below are upper bounds).",
        f"- Evaluator: lm-eval `simple_evaluate` on the converted BIG-bench tasks (zero-shot, batch size "
        f"{meta['batch_size']}, no `limit`); BIG-bench default prompt format, documents shuffled and capped at "
        f"{meta['max_examples']} per task, each example's choices shuffled (seed {meta['seed']}, "
        f"conversion key `{meta['key']}`); the offline suite evaluates exactly these documents.",
        f"- Baselines: chance = mean 1/num_choices; majority = share of the most common gold answer text. "
        f"z = (acc - b) / sqrt(b(1-b)/n) with b = max(chance, majority); **kept iff z >= {Z_KEEP:g}**.",
        f"- Candidates ({len(rows)}): the tasks screened on this model (docs/environment.md §BIG-bench tasks) "
        f"minus the training tasks of conf/data/bigbench_mix.yaml, minus two costly far-from-threshold ones "
        f"(see CANDIDATES).",
        f"- Command: `{meta['command']}`",
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f", Python {meta['python']}.",
        "",
        f"**Kept ({len(kept)}):** " + (", ".join(kept) if kept else "none"),
        "",
        "| task | n | chance | majority | acc ± SE | acc_norm | z | kept | eval s | ex/s |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.task} | {r.n} | {r.chance_acc:.3f} | {r.majority_acc:.3f} | {r.acc:.3f} ± "
                     f"{r.acc_stderr:.3f} | {r.acc_norm:.3f} | {r.z:+.1f} | {'yes' if r.kept else 'no'} | "
                     f"{r.eval_s:.0f} | {r.examples_per_s:.1f} |")
    lines += ["", f"Total evaluation time: {sum(r.eval_s for r in rows):.0f} s for {sum(r.n for r in rows)} "
              "documents (time per task includes building its requests; the model is loaded once).", ""]
    path.write_text("\n".join(lines))


def update_offline_config(path: Path, tasks: list[str]) -> None:
    """Replace the `tasks: [...]` entry of conf/eval/bigbench.yaml, keeping its comments."""
    text = path.read_text()
    lines, current = [], "tasks: ["
    for i, task in enumerate(tasks):
        item = task + (", " if i < len(tasks) - 1 else "]")
        if len(current) + len(item.rstrip()) > 110 and current.strip() != "tasks: [":
            lines.append(current.rstrip())
            current = " " * 8
        current += item
    lines.append(current)
    listing = "\n".join(lines)
    new, count = re.subn(r"^tasks:\s*\[[^\]]*\]", lambda _: listing, text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise RuntimeError(f"no `tasks: [...]` entry found in {path}")
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(CANDIDATES), help="BIG-bench task names (candidates)")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: the configured dtype")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model-path", help="a local HF model folder instead of the configured default model")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "eval_suite")
    parser.add_argument("--no-update-config", action="store_true", help="leave conf/eval/bigbench.yaml as is")
    args = parser.parse_args(argv)

    from lorsbench.config import build_run_config
    from lorsbench.evaluation.bigbench_tasks import SHUFFLE_SEED, convert_suite
    from lorsbench.evaluation.lm_eval_runner import PreparedEval, evaluate_tasks

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["eval=bigbench", "device=cpu"] + ([f"dtype={args.dtype}"] if args.dtype else [])
    run_cfg = build_run_config(_compose(overrides))
    training = set(run_cfg.data.tasks)
    candidates = [t for t in args.tasks if t not in training]
    dropped = sorted(set(args.tasks) & training)
    if dropped:
        print(f"[select_suite] not candidates (training tasks): {dropped}", file=sys.stderr)
    cache_dir = run_cfg.paths.cache_dir
    dtype = torch_dtype(run_cfg.dtype, torch.device("cpu"))
    device = torch.device("cpu")

    if args.model_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
        model_name, model_source = Path(args.model_path).name, str(args.model_path)
    else:
        from lorsbench.models import load_model

        loaded = load_model(run_cfg.model, dtype, device, cache_dir)
        model, tokenizer = loaded.model, loaded.tokenizer
        model_name, model_source = run_cfg.model.name, loaded.source

    suite = convert_suite(candidates, cache_dir, args.max_examples)
    eval_cfg = replace(run_cfg.eval, batch_size=args.batch_size, limit=None, num_fewshot=0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_eval").mkdir(exist_ok=True)
    rows: list[TaskSelection] = []
    for task in suite.tasks:
        prepared = PreparedEval(suite="bigbench", lm_eval_tasks=(task.lm_eval_name,),
                                display_names={task.lm_eval_name: task.bigbench_name},
                                include_path=(str(suite.include_path),), hf_home=cache_dir / "hf", offline=True)
        with tempfile.TemporaryDirectory() as scratch:
            t0 = time.perf_counter()
            scores = evaluate_tasks(model, tokenizer, prepared, eval_cfg, device, Path(scratch))
            eval_s = time.perf_counter() - t0
            shutil.copy(Path(scratch) / scores.raw_json, args.out / "lm_eval" / f"{task.lm_eval_name}.json")
        s = scores.tasks[task.bigbench_name]
        row = judge(task.bigbench_name, int(s["n"]), task.chance_acc, task.majority_acc, s["acc"], s["acc_stderr"],
                    s["acc_norm"], eval_s)
        rows.append(row)
        print(f"[select_suite] {row.task}: acc {row.acc:.3f} (chance {row.chance_acc:.3f}, majority "
              f"{row.majority_acc:.3f}) z {row.z:+.1f} {'KEEP' if row.kept else '-'} [{eval_s:.0f} s]",
              file=sys.stderr, flush=True)

    rows.sort(key=lambda r: -r.z)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_min": (time.perf_counter() - started) / 60,
        "model": model_name, "model_source": model_source, "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "batch_size": args.batch_size, "max_examples": args.max_examples, "seed": SHUFFLE_SEED, "key": suite.key,
        "load_avg": [round(load_start, 1), round(os.getloadavg()[0], 1)], "versions": _versions(), "python": platform.python_version(),
        "command": "python -m lorsbench.evaluation.select_suite " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_csv(rows, args.out / "selection.csv")
    write_markdown(rows, args.out / "selection.md", meta)
    (args.out / "selection_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    kept = [r.task for r in rows if r.kept]
    if not args.no_update_config and kept:
        update_offline_config(REPO / "conf" / "eval" / "bigbench.yaml", kept)
    print(f"[select_suite] kept {len(kept)} of {len(rows)}: {kept}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
