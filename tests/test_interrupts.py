"""Interrupts and resume through the real CLI on the tiny random model: SIGTERM/SIGINT mid-training leave
`status: interrupted` with the phase and a non-zero exit; a killed run's `running` record is reported stale;
`resume=true` skips a sweep job that already succeeded (issue 14 §1)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorsbench.records import RECORD_FILE, validate_record
from lorsbench.report import collect
from lorsbench.sweep_index import INDEX_FILE
from tests.conftest import REPO


def _cli(tmp_path: Path, *overrides: str, sweep: bool = False, method: str = "lora") -> list[str]:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                              "output": str(2 * i + 1)}) for i in range(16)))
    return [sys.executable, "-m", "lorsbench", *(["-m"] if sweep else []), "model=tiny-llama", "data=local",
            f"data.path={data}", "data.heldout_examples=4", "eval=none", f"method={method}", "trainer.seq_len=32",
            "trainer.micro_batch_size=2", "trainer.warmup_steps=0",
            "device=cpu", "dtype=float32", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_root={tmp_path / 'out'}", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = run_dir / "train_log.jsonl"
        if log.exists() and log.read_text().strip():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before training: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_training_records_interrupted(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(tmp_path, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"), cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(run_dir, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert validate_record(record) == []
    assert record["status"] == "interrupted" and record["phase_failed"] == "fine_tune"
    assert record["error_type"] == signal.Signals(sig).name and record["finished_at"]
    assert "Traceback" not in stderr


def test_killed_run_is_reported_stale(tmp_path):
    run_dir = tmp_path / "out" / "killed"
    proc = subprocess.Popen(_cli(tmp_path, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"), cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(run_dir, proc)
    proc.kill()  # SIGKILL: nothing can be recorded by the run itself
    proc.wait(timeout=30)
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert record["status"] == "running" and record["pid"] == proc.pid
    runs = collect([tmp_path / "out"]).runs
    row = runs.iloc[0]
    assert row["status"] == "stale" and "stale (killed?)" in row["error"] and str(proc.pid) in row["error"]


def test_resume_skips_succeeded_jobs_and_reruns_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["trainer.max_steps=1", f"hydra.sweep.dir={sweep}"]
    first = subprocess.run(_cli(tmp_path, *args, sweep=True, method="none,lora"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob(f"*/{RECORD_FILE}"))
    assert len(jobs) == 2
    kept = jobs[0] / RECORD_FILE
    kept_bytes = kept.read_bytes()
    rerun = json.loads((jobs[1] / RECORD_FILE).read_text())
    rerun["status"] = "interrupted"  # as if the job had been stopped
    rerun.update(error="interrupted by SIGTERM in phase fine_tune", phase_failed="fine_tune")
    (jobs[1] / RECORD_FILE).write_text(json.dumps(rerun))

    second = subprocess.run(_cli(tmp_path, *args, "resume=true", sweep=True, method="none,lora"), cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert kept.read_bytes() == kept_bytes  # the success record is untouched
    assert json.loads((jobs[1] / RECORD_FILE).read_text())["status"] == "success"
    index = {j["dir"]: j for j in json.loads((sweep / INDEX_FILE).read_text())["jobs"]}
    assert index[jobs[0].name].get("skipped") is True and not index[jobs[1].name].get("skipped")
