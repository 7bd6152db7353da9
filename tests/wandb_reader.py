"""Reading an offline W&B run back, for the tests: the `.wandb` transaction-log reader (wandb 0.31 ships no
reader for it), and `log_table`, which resumes a tracked run to log a table.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.config.train import TrackingBackend, TrackingConfig
from herd.redaction import redact
from herd.training.tracking.wandb import (
    RUN_NAMES_FILE,
    choose_mode,
    close_wandb,
    experiment_name,
    init_wandb,
    offline_run_dirs,
    run_names,
    sync_offline,
)

TABLES_DIR = "tables"  # log_table's local copy: <run_dir>/tables/<name>.jsonl


# ---- logging a table onto a finished run ------------------------------------------------------------------

def _tracking_of_run(run_dir: Path) -> TrackingConfig:
    import yaml

    path = run_dir / "config.yaml"
    section = (yaml.safe_load(path.read_text()) or {}).get("tracking") if path.exists() else None
    if not section:
        return TrackingConfig()
    known = {k: v for k, v in section.items() if k in TrackingConfig.__dataclass_fields__}
    known["backend"] = TrackingBackend(known.get("backend", "none"))
    return TrackingConfig(**known)


def log_table(run_dir: str | Path, name: str, rows: list[dict], tracking: TrackingConfig | None = None) -> Path:
    """Record rows (generations, say: prompt, reference, output) as table `name`.

    Always writes <run_dir>/tables/<name>.jsonl. When the run was tracked with W&B (its config.yaml, or
    `tracking` given), also resumes that W&B run (same id) and logs a wandb.Table under `name`.
    Call from one process only."""
    run_dir = Path(run_dir)
    path = run_dir / TABLES_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(redact(row), default=str) + "\n" for row in rows))
    tracking = tracking or _tracking_of_run(run_dir)
    mode, _ = choose_mode(tracking)
    if mode is None or not rows:
        return path
    import wandb

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = wandb.Table(columns=columns,
                        data=[[redact(row.get(c)) for c in columns] for row in rows])
    names_file = run_dir / RUN_NAMES_FILE
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    name_, group = run_names(tracking, experiment_name() or run_dir.name, run_dir)
    name_, group = names.get("name") or name_, names.get("group") or group
    run = init_wandb(tracking, run_dir, mode, name_, group, config=None, job_type="infer")
    run.log({name: table})
    close_wandb(run)
    if mode == "offline" and tracking.sync_at_end:
        sync_offline(offline_run_dirs(run_dir, run.id))
    return path


# ---- reading an offline run back ---------------------------------------------------------------------

# The .wandb file: a 7-byte file header (b":W&B", magic 0xBEE1 LE, version 0), then LevelDB's log format:
# 32 KiB blocks of chunks, each chunk a 7-byte header (crc32 LE 4 bytes, length LE 2, type 1) + data.
# crc32 is zlib's, over the type byte then the data. A block tail shorter than a header is zero padding.
# Each complete record is a serialized wandb.proto.wandb_internal_pb2.Record.
_FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_record_bytes(data: bytes) -> Iterator[bytes]:
    """The records of a .wandb file's bytes. A torn tail (the writer was killed) ends the stream; a bad
    checksum or chunk order before that raises ValueError."""
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B transaction log (bad file header)")
    pos, pending = _FILE_HEADER.size, None
    while pos < len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # zero padding
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return  # torn header
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        if start + length > len(data):
            return  # torn chunk
        chunk = data[start:start + length]
        pos = start + length
        if kind == 0 and length == 0 and crc == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0  # preallocated zeros: skip the block rest
            continue
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"checksum mismatch in chunk at byte {pos - length - CHUNK_HEADER.size}")
        if kind == _FULL:
            if pending is not None:
                raise ValueError("FULL chunk inside a fragmented record")
            yield chunk
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind in (_MIDDLE, _LAST):
            if pending is None:
                raise ValueError(f"chunk type {kind} without a FIRST")
            pending += chunk
            if kind == _LAST:
                yield bytes(pending)
                pending = None
        else:
            raise ValueError(f"unknown chunk type {kind}")


def _wandb_file(run_path: str | Path) -> Path:
    path = Path(run_path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one run-*.wandb in {path}, found {len(found)}")
        return found[0]
    return path


def _item_value(item) -> Any:
    """A history/config/summary item's value: the JSON form, else the typed form (x_history_value_encoding)."""
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which in (None, "none"):
        return None
    value = getattr(item, which)
    return json.loads(value) if which == "json" else value


def _items(items) -> dict:
    """{key: value}; a nested_key path (how wandb-core stores logged dicts, e.g. a table's fields)
    becomes nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _item_value(item)
    return out


def _item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_wandb_records(run_path: str | Path) -> list[dict]:
    """Every record of an offline run (a run-<id>.wandb file or its offline-run directory), decoded:
    {"type": "history", "row": {...}}, {"type": "config", "update": {...}, "remove": [...]},
    {"type": "summary", "update": {...}}, {"type": "run", "id", "project", "name", "group", "tags",
    "config": {...}}, and {"type": <other>, "record": <MessageToDict>} for the rest."""
    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2 as pb

    decoded = []
    for raw in iter_record_bytes(_wandb_file(run_path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            decoded.append({"type": kind, "row": _items(record.history.item)})
        elif kind == "config":
            decoded.append({"type": kind, "update": _items(record.config.update),
                            "remove": [_item_key(i) for i in record.config.remove]})
        elif kind == "summary":
            decoded.append({"type": kind, "update": _items(record.summary.update),
                            "remove": [_item_key(i) for i in record.summary.remove]})
        elif kind == "run":
            r = record.run
            decoded.append({"type": kind, "id": r.run_id, "project": r.project, "entity": r.entity,
                            "name": r.display_name, "group": r.run_group, "tags": list(r.tags),
                            "resumed": r.resumed,
                            "config": _items(r.config.update)})
        else:
            decoded.append({"type": kind, "record": MessageToDict(getattr(record, kind)) if kind else {}})
    return decoded


@dataclass
class WandbRun:
    id: str
    name: str
    group: str
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def read_wandb_run(run_path: str | Path) -> WandbRun:
    """An offline run's id, name, config (updates applied in order; "_wandb" dropped), history rows and
    summary."""
    records = read_wandb_records(run_path)
    run = WandbRun(id="", name="", group="", records=records)
    for record in records:
        if record["type"] == "run":
            run.id, run.name, run.group = record["id"], record["name"], record["group"]
            run.config.update(record["config"])
        elif record["type"] == "config":
            run.config.update(record["update"])
            for key in record["remove"]:
                run.config.pop(key, None)
        elif record["type"] == "history":
            run.history.append(record["row"])
        elif record["type"] == "summary":
            run.summary.update(record["update"])
            for key in record["remove"]:
                run.summary.pop(key, None)
    run.config.pop("_wandb", None)
    return run


def history_values(history: Iterable[dict], key: str, step_key: str = "train/global_step") -> dict[int, Any]:
    """{step: value} of one metric in W&B history rows."""
    return {row[step_key]: row[key] for row in history if key in row and step_key in row}
