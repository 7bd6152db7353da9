"""Where things are, and the one way herd writes a file: relative paths in configs resolve against the working
directory, then the repo; every file a reader may look at is written atomically and durably."""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from herd.errors import InputError

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


def user_file(path: str | Path, key: str, *, directory: bool = False, suffixes: tuple[str, ...] = (),
              text: bool = False) -> Path:
    """The file (or directory) a user named under config key `key`, checked before anything loads: it exists,
    is of the right kind and suffix, can be read, and (text=True) is UTF-8 throughout. Refused in one line."""
    try:
        resolved = resolve_path(path)
    except FileNotFoundError:
        resolved = None
    if resolved is None or not resolved.exists():
        where = "" if Path(path).expanduser().is_absolute() else f" (looked in {Path.cwd()} and {REPO_ROOT})"
        raise InputError(f"{key}={path}: no such {'directory' if directory else 'file'}{where}")
    if directory != resolved.is_dir():
        raise InputError(f"{key}={path}: is {'a file' if resolved.is_file() else 'a directory'}, "
                         f"expected a {'directory' if directory else 'file'}")
    if suffixes and resolved.suffix not in suffixes:
        raise InputError(f"{key}={path}: suffix '{resolved.suffix}'; allowed: {', '.join(suffixes)}")
    if not os.access(resolved, os.R_OK | (os.X_OK if directory else 0)):
        raise InputError(f"{key}={path}: permission denied (cannot read it)")
    if text:
        _check_utf8(resolved, key, path)
    return resolved


def _check_utf8(resolved: Path, key: str, shown: str | Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(resolved, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk[: error.start].count(b"\n")
                raise InputError(f"{key}={shown}: not UTF-8 text (line {line}: {error.reason}); "
                                 "convert it, e.g. iconv -f latin1 -t utf-8") from None
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise InputError(f"{key}={shown}: not UTF-8 text (ends inside a character: {error.reason})") from None


def describe_os_error(error: OSError) -> str:
    """One line for a failed read or write, naming the file and the likely fix."""
    where = f": {error.filename}" if error.filename else ""
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "no such file or directory",
        errno.EISDIR: "is a directory",
        errno.ENOTDIR: "not a directory",
    }
    reason = reasons.get(error.errno, error.strerror or str(error))
    return f"{reason}{where}"


# Storage failures as libraries written in other languages report them (safetensors' Rust writer raises a plain
# Exception "No space left on device (os error 28)"): the errno they name, found in the message.
_ERRNO_IN_MESSAGE = {"os error 28": errno.ENOSPC, "No space left on device": errno.ENOSPC,
                     "os error 122": errno.EDQUOT, "Disk quota exceeded": errno.EDQUOT,
                     "os error 30": errno.EROFS, "Read-only file system": errno.EROFS}


def storage_failure(error: BaseException) -> OSError | None:
    """The OSError behind `error` when it is a storage failure (full, over quota, read-only), following its
    causes and reading foreign libraries' messages; None for anything else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return error
        for words, number in _ERRNO_IN_MESSAGE.items():
            if words in str(error):
                return OSError(number, os.strerror(number))
        error = error.__cause__ or error.__context__
    return None


def code_fingerprint(sources: Iterable[str | Path]) -> str:
    """sha256 of the given source files, names and bytes: the key part of a cache that says which code made
    it, so that changed code rebuilds the cache without anyone bumping a version number by hand."""
    digest = hashlib.sha256()
    for source in sources:
        source = Path(source)
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()
