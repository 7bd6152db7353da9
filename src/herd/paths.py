"""Where things are: relative paths in configs resolve against the working directory, then the repo."""

from __future__ import annotations

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
