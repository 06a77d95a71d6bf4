"""Launchers and the multirun index: `hydra/launcher=joblib` runs jobs in parallel processes for real,
`hydra/launcher=submitit_slurm` (and the one-GPU-per-job `slurm` wrapper) compose, and every multirun leaves a
`sweep_index.json` with each job's status, also when a job failed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lorsbench.report import write_report
from lorsbench.sweep_index import INDEX_FILE, build_index
from tests.conftest import CONF_DIR

REPO = CONF_DIR.parent


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HINT = 'the Hydra launcher plugins are optional: pip install "lorsbench[launchers]"'
needs_joblib = pytest.mark.skipif(not _installed("hydra_plugins.hydra_joblib_launcher"), reason=HINT)
needs_submitit = pytest.mark.skipif(not _installed("hydra_plugins.hydra_submitit_launcher"), reason=HINT)
CALLBACK = "++hydra.callbacks.sweep_index._target_=lorsbench.sweep_index.SweepIndexCallback"

APP = '''
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from lorsbench.records import RunRecord


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def app(cfg):
    record = RunRecord(Path(HydraConfig.get().runtime.output_dir), run_name=f"x{cfg.x}", method="lora",
                       pruner="wanda", pattern="unstructured", target_sparsity=0.5, seed=cfg.x, pid=os.getpid())
    if cfg.x == 2:  # like lorsbench: record the failure, then raise so Hydra marks the job failed
        record.update(status="failed", error="ValueError: x=2 is not allowed", phase_failed="train")
        record.save()
        raise ValueError("x=2 is not allowed")
    record.update(status="success", step_ms_median=10.0 * cfg.x, peak_rss_gib_train=0.1 * cfg.x)
    record.save()


if __name__ == "__main__":
    app()
'''


@pytest.mark.parametrize("launcher,target", [
    pytest.param("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 marks=needs_submitit),
    pytest.param("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 marks=needs_submitit),
    pytest.param("slurm_multigpu", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 marks=needs_submitit),
    pytest.param("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", marks=needs_joblib),
])
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=main_table"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1
        assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    if launcher == "slurm_multigpu":  # one task per GPU, each an FSDP rank
        assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4


@pytest.fixture
def tiny_app(tmp_path) -> Path:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 1\n")
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    return tmp_path


def _multirun(app: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep = app / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(app / "app.py"), "-m", f"hydra.sweep.dir={sweep}", CALLBACK,
                             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *overrides],
                            cwd=app, env=env, capture_output=True, text=True, timeout=300)
    return result, sweep


@needs_joblib
def test_joblib_sweep_writes_a_final_index(tiny_app):
    result, sweep = _multirun(tiny_app, "x=1,3")
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((sweep / INDEX_FILE).read_text())
    assert index["final"] is True and index["n_jobs"] == 2 and index["counts"] == {"success": 2}
    assert [(j["num"], j["status"], j["hydra_status"]) for j in index["jobs"]] == [(0, "success", "COMPLETED"),
                                                                                   (1, "success", "COMPLETED")]
    assert index["jobs"][1]["overrides"] == ["x=3"]
    records = [json.loads((sweep / j["dir"] / "run.json").read_text()) for j in index["jobs"]]
    assert os.getpid() not in {r["pid"] for r in records}  # jobs ran in joblib worker processes
    assert "JoblibLauncher" in (sweep / "multirun.yaml").read_text()


@needs_joblib
def test_failed_job_is_indexed_and_reported(tiny_app, tmp_path):
    """Hydra 1.3 skips on_multirun_end when a job raised: the index written as each job ended still lists it."""
    result, sweep = _multirun(tiny_app, "x=1,2")
    assert result.returncode != 0  # Hydra re-raises the failed job's error at the end of the sweep
    index = json.loads((sweep / INDEX_FILE).read_text())
    assert index["final"] is False and index["counts"] == {"failed": 1, "success": 1}
    failed = next(j for j in index["jobs"] if j["status"] == "failed")
    assert failed["error"] == "ValueError: x=2 is not allowed" and failed["hydra_status"] == "FAILED"
    md = (write_report([sweep], "sweep", tmp_path / "reports") / "report.md").read_text()
    assert "**FAILED** | train | ValueError: x=2 is not allowed" in md


def test_preset_starts_a_multirun_and_the_command_line_wins(tiny_app):
    """How the experiment= presets work: `hydra.mode: MULTIRUN` + `hydra.sweeper.params` in a package-global
    config make a sweep without -m; a key given on the command line replaces the preset's list."""
    (tiny_app / "conf" / "config.yaml").write_text("defaults:\n  - _self_\n  - experiment: null\nx: 1\ny: 0\n")
    (tiny_app / "conf" / "experiment").mkdir()
    (tiny_app / "conf" / "experiment" / "grid.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      x: 1,3\n      y: 0,1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra, expected in (([], {"x=1,y=0", "x=1,y=1", "x=3,y=0", "x=3,y=1"}), (["x=5"], {"x=5,y=0", "x=5,y=1"})):
        sweep = tiny_app / f"sweep{len(extra)}"
        result = subprocess.run([sys.executable, str(tiny_app / "app.py"), "experiment=grid",
                                 f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
                                 *extra],
                                cwd=tiny_app, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert {p.name.removeprefix("experiment=grid,") for p in sweep.iterdir() if p.is_dir()} == expected


def test_index_lists_jobs_that_left_no_record(tmp_path):
    job = tmp_path / "sweep" / "0_lora"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 0\n")
    (job / ".hydra" / "overrides.yaml").write_text("- method=lora\n")
    index = build_index(tmp_path / "sweep")
    assert index["jobs"] == [{"num": 0, "dir": "0_lora", "overrides": ["method=lora"], "status": "no_record",
                              "error": "no run.json: the job died before writing its record"}]


@pytest.mark.slow
@needs_joblib
def test_joblib_sweep_of_the_real_pipeline(tmp_path):
    """Two real (tiny, random-weight) lorsbench runs through joblib, indexed, then reported."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "LORSBENCH_OUTPUT": str(tmp_path / "raw")}
    result = subprocess.run(
        [sys.executable, "-m", "lorsbench", "-m", "experiment=smoke", "model=tiny-llama", "eval=none",
         "method=none,lora", "trainer.max_steps=2", "trainer.seq_len=32", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", CALLBACK],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((sweep / INDEX_FILE).read_text())
    assert index["final"] is True and index["counts"] == {"success": 2}
    md = (write_report([sweep], "real", tmp_path / "reports") / "report.md").read_text()
    assert "smoke" in md and "| lora | 1 |" in md
