"""`python -m lorsbench.report`: golden run.json fixtures -> expected tables (snapshot), failures kept, HTML valid
and self-contained, clear one-line errors, no torch.

Snapshots live in tests/fixtures/report_expected/. After an intended change to the tables, regenerate them with
    LORSBENCH_UPDATE_SNAPSHOTS=1 pytest tests/test_report.py
and review the diff (git diff tests/fixtures/report_expected).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from lorsbench.report import write_report
from lorsbench.report.__main__ import main
from lorsbench.report.plots import pareto_front
from lorsbench.report.tables import fmt_stats

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = FIXTURES / "runs"
EXPECTED = FIXTURES / "report_expected"
UPDATE = os.environ.get("LORSBENCH_UPDATE_SNAPSHOTS") == "1"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """The report of the golden fixtures, written once for this module."""
    return write_report([RUNS], "golden", tmp_path_factory.mktemp("reports"))


@pytest.mark.parametrize("name", ["runs.csv", "metrics_long.csv", "report.md"])
def test_snapshot(golden, name):
    produced, expected = golden / name, EXPECTED / name
    if UPDATE:
        EXPECTED.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, expected)
    assert expected.exists(), f"no snapshot {expected}: run with LORSBENCH_UPDATE_SNAPSHOTS=1"
    if name.endswith(".csv"):
        pd.testing.assert_frame_equal(pd.read_csv(produced), pd.read_csv(expected), check_exact=False, rtol=1e-9)
    else:
        assert produced.read_text() == expected.read_text(), "report.md changed: review, then regenerate"


def test_every_run_is_a_row_and_failures_are_listed(golden):
    runs = pd.read_csv(golden / "runs.csv")
    assert len(runs) == len([p for p in RUNS.iterdir() if p.is_dir()])  # 16 records + 1 job folder without one
    assert runs["status"].value_counts().to_dict() == {"success": 14, "failed": 1, "oom": 1, "no_record": 1}
    text = (golden / "report.md").read_text().split("## Failed and incomplete runs")[1].split("## Accuracy")[0]
    assert "**FAILED** | train | RuntimeError: expected scalar type Float but found BFloat16" in text
    assert "**OOM** | train | OutOfMemoryError: CUDA out of memory" in text
    assert "17_sqft-wanda-2of4-s0.5-seed0` | **no record**" in text


def test_main_table_layout(golden):
    md = (golden / "report.md").read_text()
    block = md.split("**wanda · unstructured · 50% · smollm2-135m**", 1)[1].split("\n\n", 2)[1]
    lines = block.splitlines()
    assert lines[0].startswith("| method | n | general_knowledge | physics |") and "| mean | perplexity |" in lines[0]
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    assert labels == ["dense", "pruned only", "lora", "sqft", "lors"]
    lora = lines[labels.index("lora") + 2]
    assert "| 2 |" in lora and "42.87 ± 0.28" in lora  # two seeds: mean ± std, n = 2
    assert lines[0].endswith("| perplexity | mean acc_norm |") and lora.endswith("| 40.67 ± 0.00 |")  # 03, 04: 0.4067
    # Random-weight runs are never in an accuracy table; smoke runs sit in their own marked block.
    accuracy = md.split("## Accuracy")[1].split("## Cost")[0]
    assert "random" not in accuracy and "**wanda · unstructured · 50% · smollm2-135m · smoke**" in accuracy


def test_cost_ratios_and_sparsity_marks(golden):
    md = (golden / "report.md").read_text()
    cost = md.split("## Cost")[1].split("## Sparsity")[0]
    assert "| lors | 2 | 2.44M (1.00×) | 1.71 (0.89×) |" in cost
    assert "memory: peak alloc GiB (train); peak reserved GiB (train)" in cost  # GPU records
    assert "memory: peak RSS GiB (train)" in cost  # CPU records
    sparsity = md.split("## Sparsity")[1]
    assert "| lora | 1 | NO | 50.00 | 50.00 | 50.00 | 0.00 | **NO** | **NO** | ✗ **sparsity lost** |" in sparsity
    assert "| lors | 1 | yes | 50.00 | 50.00 | 50.00 | 50.00 | yes | yes | ✓ kept |" in sparsity


def test_long_table_is_tidy(golden):
    long = pd.read_csv(golden / "metrics_long.csv")
    for column in ("run_name", "method", "pruner", "pattern", "target_sparsity", "seed", "task", "metric", "value",
                   "stderr"):
        assert column in long.columns
    assert not long.duplicated(["run_dir", "task", "metric"]).any()
    acc = long[(long["metric"] == "acc") & (long["task"] == "physics")]
    assert set(acc["stderr"]) == {0.035}
    random_runs = long[long["weights"] == "random"]
    assert not random_runs.empty and not random_runs["metric"].isin(["acc", "acc_norm", "mean_acc"]).any()


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.errors.append(f"external reference <{tag} {key}={attrs[key]!r}>")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> does not close <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_html_is_valid_and_self_contained(golden):
    text = (golden / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert "script" not in checker.tags and "link" not in checker.tags
    assert len(checker.images) == 4
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in golden.glob("*.png")} == {"accuracy_vs_sparsity.png", "cost_per_method.png",
                                                      "accuracy_vs_memory.png", "task_heatmap.png"}


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorsbench.report: error: ") and err.count("\n") == 1, err
    return err


def test_clear_errors(tmp_path, capsys):
    out = ["--name", "x", "--out", str(tmp_path / "out")]
    assert "no such file or folder" in _error(capsys, [str(tmp_path / "missing")] + out)
    (tmp_path / "empty").mkdir()
    assert "no run.json found under" in _error(capsys, [str(tmp_path / "empty")] + out)
    # a malformed or invalid run.json is listed in the report as invalid (tests/test_record_schema.py), not fatal
    assert "plain folder name" in _error(capsys, [str(RUNS), "--name", "../up", "--out", str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_minimal_records_are_tolerated(tmp_path):
    """A record from a run that failed at config time has a status, an error and the resolved config only."""
    for name, record in {
        "a": {"schema_version": 1, "status": "failed", "error": "ConfigError: unknown method 'lorz'",
              "phase_failed": "config", "resolved_config": {"method": {"name": "lorz"}, "seed": 3,
                                                            "pruning": {"name": "wanda"}, "sparsity": 0.5}},
        "b": {"schema_version": 1, "status": "success", "method": "lora", "run_name": "b", "model": "m",
              "pruner": "wanda", "pattern": "unstructured", "target_sparsity": 0.5, "seed": 0,
              "tasks": {"t1": {"acc": 0.5}, "t2": {"acc": 0.7}}},
    }.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "run.json").write_text(json.dumps(record))
    folder = write_report([tmp_path / "runs"], "minimal", tmp_path / "out")
    runs = pd.read_csv(folder / "runs.csv").set_index("run_dir")
    assert runs.loc["runs/a", "method"] == "lorz" and runs.loc["runs/a", "seed"] == 3
    assert runs.loc["runs/b", "mean_acc"] == pytest.approx(0.6)  # recomputed from the tasks
    assert "ConfigError: unknown method 'lorz'" in (folder / "report.md").read_text()


def test_rank_variants_are_separate_rows_with_matching_lora(tmp_path):
    base = {"schema_version": 1, "status": "success", "pruner": "wanda", "pattern": "unstructured",
            "target_sparsity": 0.5, "model": "m", "seed": 0, "device_name": "cpu", "dtype": "bfloat16"}
    step = {("lora", 4): 100.0, ("lora", 8): 200.0, ("lors", 4): 50.0, ("lors", 8): 160.0}
    for (method, rank), ms in step.items():
        folder = tmp_path / "runs" / f"{method}{rank}"
        folder.mkdir(parents=True)
        record = {**base, "method": method, "method_config": {"rank": rank}, "step_ms_median": ms,
                  "run_name": f"{method}-r{rank}"}
        (folder / "run.json").write_text(json.dumps(record))
    md = (write_report([tmp_path / "runs"], "ranks", tmp_path / "out") / "report.md").read_text()
    assert "| lors (rank=4) | 1 | 50.00 (0.50×) |" in md
    assert "| lors (rank=8) | 1 | 160 (0.80×) |" in md


def test_cli_runs_without_torch(tmp_path):
    """`python -m lorsbench.report` imports neither torch nor transformers (-X importtime lists every import)."""
    one_run = RUNS / "03_lora-wanda-unstructured-s0.5-seed0"
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorsbench.report", str(one_run),
                             "--name", "g", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pandas" in imported and "matplotlib" in imported
    assert not imported & {"torch", "transformers", "lm_eval", "datasets"}
    assert result.stdout.startswith("wrote ") and (tmp_path / "g" / "report.html").exists()


def test_fmt_stats_and_pareto_front():
    assert fmt_stats(pd.Series([0.5, 0.7]), 100) == "60.00 ± 14.14"
    assert fmt_stats(pd.Series([0.5]), 100) == "50.00" and fmt_stats(pd.Series([None], dtype=float)) == "—"
    points = pd.DataFrame({"m": [1.0, 2.0, 3.0, 1.5, 2.5], "a": [40.0, 45.0, 44.0, 39.0, 46.0]})
    assert pareto_front(points, "m", "a").index.tolist() == [0, 1, 4]


def test_report_order_read_from_the_method_sources_is_the_classes():
    """The report sorts methods without importing them; what it reads equals each registered class's attribute."""
    from lorsbench.method_sources import report_orders
    from lorsbench.registry import get_method, list_methods

    orders = report_orders()
    assert sorted(orders) == list_methods()
    assert orders == {name: get_method(name).report_order for name in list_methods()}
    from lorsbench.report.collect import method_rank

    assert sorted(orders, key=method_rank)[:3] == ["none", "lora", "spp"]


def test_a_sharded_run_shows_its_world_size(tmp_path):
    """A distributed=fsdp record (schema 3) validates and its cost block names the GPUs: "2× <device>"."""
    base = {"schema_version": 3, "status": "success", "pruner": "wanda", "pattern": "unstructured",
            "target_sparsity": 0.5, "model": "m", "seed": 0, "device_name": "NVIDIA H200", "dtype": "bfloat16",
            "method": "lora", "method_config": {"rank": 16}}
    for name, extra in (("one", {"world_size": 1, "sharding": None, "step_ms_median": 100.0}),
                        ("two", {"world_size": 2, "sharding": "fsdp2_per_decoder_layer", "step_ms_median": 60.0,
                                 "peak_mem_gib_rank0": 3.5, "peak_mem_gib_max_over_ranks": 3.75})):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({**base, **extra, "run_name": name}))
    out = write_report([tmp_path / "runs"], "world", tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "2× NVIDIA H200" in md and "| lora | 1 | 60.00 |" in md and "| lora | 1 | 100 |" in md
    runs = pd.read_csv(out / "runs.csv").set_index("run_dir")
    assert runs.loc["runs/two", "peak_mem_gib_max_over_ranks"] == pytest.approx(3.75)
