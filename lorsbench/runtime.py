"""Process set-up (device, dtype, seeds) and provenance capture for the run record."""
from __future__ import annotations

import importlib.metadata
import platform
import random
import subprocess
from pathlib import Path

import torch

from lorsbench.config import ConfigError

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
_PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "hydra-core", "omegaconf", "safetensors", "gguf",
             "pandas", "numpy", "triton")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when present, else cpu. Asking for cuda without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here (use device=auto or device=cpu)")
    return device


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 on CPU (many CPUs emulate bf16 matmuls: several times slower)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for method initialisation."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def git_state(folder: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit sha, dirty flag) of the repository holding lorsbench, or (None, None) outside git."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import lorsbench

    versions["lorsbench"] = lorsbench.__version__
    versions["python"] = platform.python_version()
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device) -> dict:
    sha, dirty = git_state()
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "versions": package_versions(),
        "device_name": device_name(device),
        "cuda_version": torch.version.cuda,
        "hostname": platform.node(),
    }
