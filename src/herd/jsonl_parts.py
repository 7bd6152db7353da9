"""Resumable, crash-safe JSONL output written by several ranks: part files while running, one final file.

    <final>.parts/settings.json    fingerprint of everything that changes the records (a resume must match)
    <final>.parts/rank<R>.jsonl    records rank R finished; appended, flushed and fsynced once per batch
    <final>.summary.json           written just before the final file
    <final>                        all records in input order; temp file + fsync + rename, by rank 0 only

A killed run leaves part files and no final file (or the previous one untouched). A re-run keeps every
complete record, drops a torn last line, and only computes what is missing; records are keyed by "id", so
a record written twice (a crash between two ranks' writes) is kept once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from herd.errors import ConfigError, HerdError
from herd.paths import atomic_write


def record_key(record_id: Any) -> str:
    return json.dumps(record_id)


def parts_dir(final: Path) -> Path:
    return final.with_name(final.name + ".parts")


def summary_path(final: Path) -> Path:
    return final.with_name(final.stem + ".summary.json")


def begin(final: Path, fingerprint: str, overwrite: bool) -> bool:
    """Rank 0, before any rank writes: True when `final` is already complete for these settings.
    Refuses (ConfigError) an existing output or unfinished parts made with different settings."""
    parts = parts_dir(final)
    if final.exists() and not overwrite:
        try:
            done = json.loads(summary_path(final).read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            done = False
        if done:
            return True
        raise ConfigError(f"{final} exists (made with other settings); set generate.overwrite=true "
                          "or another generate.output")
    settings = parts / "settings.json"
    if settings.exists() and not overwrite:
        try:
            previous = json.loads(settings.read_text()).get("fingerprint")
        except ValueError:
            previous = None
        if previous != fingerprint:
            raise ConfigError(f"{parts} holds unfinished results made with other settings; delete it, "
                              "set generate.overwrite=true, or rerun with the same settings")
    if overwrite:
        # Only herd's own output is replaced, and the old one stays whole until finalize swaps the new one in.
        if final.exists() and not summary_path(final).exists():
            raise ConfigError(f"generate.overwrite: {final} was not written by herd (no {summary_path(final).name} "
                              "beside it) and is left as it is; give another generate.output")
        if parts.exists() and not settings.exists():
            raise ConfigError(f"generate.overwrite: {parts} was not made by herd (no settings.json) and is left "
                              "as it is; give another generate.output")
        shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write(settings, json.dumps({"fingerprint": fingerprint}) + "\n")
    return False


def _read_records(path: Path) -> Iterable[dict]:
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                return  # torn last line of a killed writer
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record:
                yield record


def read_done(final: Path) -> dict[str, dict]:
    """Every complete record in the part files of any rank (any earlier world size), by record key."""
    done: dict[str, dict] = {}
    for path in sorted(parts_dir(final).glob("rank*.jsonl")):
        for record in _read_records(path):
            done.setdefault(record_key(record["id"]), record)
    return done


class PartWriter:
    """This rank's part file, opened for append after cutting off a torn last line."""

    def __init__(self, final: Path, rank: int):
        self.path = parts_dir(final) / f"rank{rank}.jsonl"
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(self.path, "r+b") as handle:
                    handle.truncate(keep)
        self.handle = open(self.path, "a")  # noqa: SIM115 (kept open across batches; closed by close())

    def write(self, records: list[dict]) -> None:
        self.handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def finalize(final: Path, ids_in_order: list[Any], summary: dict) -> int:
    """Rank 0, after every rank finished: merge the parts in input order into `final` atomically, then
    remove the parts. Returns the number of records."""
    done = read_done(final)
    missing = [i for i in ids_in_order if record_key(i) not in done]
    if missing:
        raise HerdError(f"{len(missing)} records missing from {parts_dir(final)} (first: id {missing[0]!r}); "
                        "rerun to complete them")
    lines = [json.dumps(done[record_key(i)], ensure_ascii=False) + "\n" for i in ids_in_order]
    # The records first, then the summary that marks them complete: a crash in between leaves a file
    # that no re-run takes for finished.
    atomic_write(final, "".join(lines))
    atomic_write(summary_path(final), json.dumps(summary, indent=2, default=str) + "\n")
    shutil.rmtree(parts_dir(final), ignore_errors=True)
    return len(lines)
