"""The run-record schema (issue 14 §4): one typed definition (`RecordFields`) that the pipeline writes and the
report validates against; invalid records are listed with the reason, never fatal, never guessed from."""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timedelta, timezone

import pytest
import torch

from lorsbench.records import (
    STALE_HEARTBEAT_S, STATUSES, RecordFields, RunRecord, failure_status, liveness, validate_record,
)
from lorsbench.report import write_report
from lorsbench.report.collect import collect

GOOD = {"schema_version": 2, "status": "success", "run_name": "r", "model": "m", "method": "lora",
        "pruner": "wanda", "pattern": "unstructured", "target_sparsity": 0.5, "seed": 0}


def test_failure_status_is_the_pipelines_rule():
    assert failure_status(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "oom"
    assert failure_status(RuntimeError("CUDA error: out of memory")) == "oom"
    assert failure_status(ValueError("rank must be > 0")) == "failed"
    assert failure_status(MemoryError()) == "failed"  # host memory is not the GPU's OOM status


@pytest.mark.parametrize("record,problem", [
    ([1, 2], "not a JSON object"),
    ({}, "missing 'schema_version'"),
    ({**GOOD, "schema_version": 99}, "unknown schema_version 99"),
    ({**GOOD, "status": "done"}, "unknown status 'done'"),
    ({k: v for k, v in GOOD.items() if k != "method"}, "status success needs 'method'"),
    ({"schema_version": 2, "status": "failed"}, "status failed needs 'error'"),
    ({"schema_version": 2, "status": "running"}, "status running needs 'pid'"),
    ({**GOOD, "seed": "zero"}, "'seed' should be int, got str"),
    ({**GOOD, "target_sparsity": True}, "'target_sparsity' should be float, got bool"),
    ({**GOOD, "peak_rss_gib_train": "big"}, "'peak_rss_gib_train' should be int | float"),
    ({**GOOD, "nm_valid_after_merge": 1}, "'nm_valid_after_merge' should be bool"),
])
def test_invalid_records_say_why(record, problem):
    problems = validate_record(record)
    assert any(problem in p for p in problems), problems


def test_valid_records_of_both_versions():
    assert validate_record(GOOD) == []
    assert validate_record({**GOOD, "schema_version": 1}) == []
    assert validate_record({"schema_version": 1, "status": "running"}) == []  # v1 had no pid/host
    assert validate_record({"schema_version": 2, "status": "interrupted", "error": "interrupted by SIGTERM",
                            "phase_failed": "fine_tune", "error_type": "SIGTERM"}) == []
    assert set(STATUSES) >= {"running", "success", "failed", "oom", "interrupted"}


def test_new_record_carries_pid_host_and_heartbeat(tmp_path):
    record = RunRecord(tmp_path, run_name="r")
    record.save()
    on_disk = json.loads(record.path.read_text())
    assert on_disk["pid"] == os.getpid() and on_disk["host"] == socket.gethostname()
    assert datetime.fromisoformat(on_disk["heartbeat_at"]) <= datetime.now(timezone.utc)
    assert validate_record(on_disk) == [] and set(on_disk) <= set(RecordFields.__annotations__)


def test_liveness_of_running_records():
    now = datetime.now(timezone.utc)
    alive = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "heartbeat_at": now.isoformat()}
    assert liveness(alive) is None
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert "is gone" in liveness({**alive, "pid": gone.pid})
    elsewhere = {**alive, "host": "another-node", "pid": gone.pid}
    assert liveness(elsewhere) is None  # a pid of another host means nothing here
    old = (now - timedelta(seconds=STALE_HEARTBEAT_S + 60)).isoformat()
    assert "no heartbeat for" in liveness({**elsewhere, "heartbeat_at": old})
    assert liveness({**alive, "status": "success"}) is None


def test_report_lists_invalid_records_with_the_reason(tmp_path):
    records = {
        "good": GOOD,
        "v99": {**GOOD, "schema_version": 99},
        "empty": {},
        "bad_json": '{"status": "success", "mean_acc": 0.5,',
        "array": [1, 2],
    }
    for name, record in records.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        text = record if isinstance(record, str) else json.dumps(record)
        (tmp_path / "runs" / name / "run.json").write_text(text)
    runs = collect([tmp_path / "runs"]).runs.set_index("run_dir")
    assert runs.loc["runs/good", "status"] == "success"
    for name, reason in {"v99": "unknown schema_version 99", "empty": "missing 'schema_version'",
                         "bad_json": "malformed JSON", "array": "not a JSON object"}.items():
        assert runs.loc[f"runs/{name}", "status"] == "invalid" and reason in runs.loc[f"runs/{name}", "error"]
        assert runs.loc[f"runs/{name}", "method"] is None or runs.isna().loc[f"runs/{name}", "method"]
    md = (write_report([tmp_path / "runs"], "invalid", tmp_path / "out") / "report.md").read_text()
    assert md.count("**invalid record**") == 4 and "unknown schema_version 99" in md


def test_heartbeat_callback_is_throttled(tmp_path):
    record = RunRecord(tmp_path, run_name="r")
    never = record.heartbeat(min_interval_s=3600.0)
    never()
    assert not record.path.exists()  # within the interval: no write
    always = record.heartbeat(min_interval_s=0.0)
    always()
    assert json.loads(record.path.read_text())["heartbeat_at"] == record["heartbeat_at"]
