"""Where things are, and the one way herd writes a file: relative paths in configs resolve against the working
directory, then the repo; every file a reader may look at is written atomically and durably."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path, must_exist: bool = True) -> Path:
    """An absolute path for `path`: as given if absolute, else under the working directory when it
    exists there, else under the repository root (so `data/sample/...` works from any directory)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    in_cwd = Path.cwd() / candidate
    in_repo = REPO_ROOT / candidate
    if in_cwd.exists() or (not in_repo.exists() and not must_exist):
        return in_cwd if in_cwd.exists() else in_repo
    if in_repo.exists():
        return in_repo
    raise FileNotFoundError(f"{path} (looked in {Path.cwd()} and {REPO_ROOT})")


def share_per_umask(directory: str | Path) -> None:
    """Give `directory` and the files directly in it the permissions the umask allows. transformers 5
    writes model.safetensors with mode 0600 and mkdtemp makes 0700 directories: on a shared cluster the
    group could not read an adapter or a model otherwise."""
    umask = os.umask(0)
    os.umask(umask)
    directory = Path(directory)
    for item in [directory, *directory.iterdir()]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def atomic_write(path: str | Path, content: str | bytes) -> None:
    """Write `content` to `path` so that a reader (or a re-run after a kill or a power cut) sees the old file
    or the whole new one, never a part: a temporary file beside it, flushed and fsynced, renamed over `path`,
    then the directory fsynced so that the rename itself is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(partial, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def code_fingerprint(sources: Iterable[str | Path]) -> str:
    """sha256 of the given source files, names and bytes: the key part of a cache that says which code made
    it, so that changed code rebuilds the cache without anyone bumping a version number by hand."""
    digest = hashlib.sha256()
    for source in sources:
        source = Path(source)
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()
