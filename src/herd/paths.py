"""Where things are: relative paths in configs resolve against the working directory, then the repo."""

from __future__ import annotations

import os
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
