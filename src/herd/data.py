"""Conversations in, tokenized train/eval splits out: read, convert, validate, mix, split, tokenize, cache.

A run reads one data set (data.path) or several (data.sources), each with its own format, field and system
prompt. Rows become message lists (herd.chat_format), are formatted in the Llama-2 chat format and tokenized
once; labels keep only assistant tokens (answer and its `</s>`) unless `assistant_only_loss` is off. The
result is cached on disk under a fingerprint of the data, the tokenizer, every setting and the source of the
code that made it.

The steps, each usable on its own (herd.preference runs the same pipeline for preference pairs, with its own
row converter and pool):

    data_sources(data_cfg)        -> [Source]: the run's data sets, every key resolved; bad combinations refused
    check_source(data_cfg)        every source's config and files, checked before anything loads
    read_rows(source, report)     -> [(where, row)]: a local .jsonl/.json/.csv/.parquet file, or load_dataset()
    row_to_messages(row, source)  -> messages, or ConversationError naming the bad-row kind
    apportion / mix_counts        how many samples each source gives (weights or counts) from its Pool
    select_items(data_cfg, convert, make_pool) -> Selection: the mix of any row kind, split (the steps above)
    select_samples(data_cfg, tok) -> Selection: the train and eval (conversation, sample) pairs and the report
    build_splits / split_conversations / load_splits (cached): what train and infer call

How a mix is taken (the README's Data section says the same): each source's usable conversations are shuffled
with a seed derived from data.seed and the source's name; each source gives its count (mix_counts) from the
front of its order; the eval split is taken from every source in proportion to what it gave (the first of its
share go to eval), so eval has the mix's proportions; train and eval are then shuffled together (data.seed).
Preference pairs (method=dpo) are taken by the same rules (select_items).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from datasets import Dataset, load_dataset, load_from_disk

from herd import chat_format
from herd.chat_format import (
    ConversationError,
    alpaca_to_messages,
    format_llama2,
    guanaco_to_messages,
    llama2_to_messages,
    sharegpt_to_messages,
    validate_messages,
    with_system_prompt,
)
from herd.config.train import FORMAT_FIELDS, BadRows, DataConfig, DataFormat, SourceConfig
from herd.errors import ConfigError, DataError
from herd.paths import code_fingerprint, resolve_path, user_file

log = logging.getLogger(__name__)

# The code that turns rows into cached samples: its source is part of the cache key (herd.paths.code_fingerprint),
# so a changed format, template or mask never reuses samples made by the old code.
TOKENIZATION_CODE = (Path(chat_format.__file__), Path(__file__))
LOCAL_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# load_dataset's builders for local files: `path: csv` with `data_files: [a.csv]` reads files, not the hub.
FILE_BUILDERS = ("json", "csv", "parquet", "arrow", "text")
BAD_EXAMPLES = 3  # bad rows shown per kind
TOKENIZE_BATCH = 1000  # conversations tokenized at once; a source is tokenized only as far as its count needs


@dataclass
class DataReport:
    rows: int = 0  # rows read
    bad: dict[str, int] = field(default_factory=dict)  # bad rows by kind
    # per kind, the first few bad rows: "line 12: message 1 (assistant) is empty"
    bad_examples: dict[str, list[str]] = field(default_factory=dict)
    train: int = 0
    eval: int = 0
    cache_hit: bool = False
    # per source, by name: {"rows": n, "bad": {kind: n}, "train": n, "eval": n}
    sources: dict[str, dict] = field(default_factory=dict)

    def source(self, name: str) -> dict:
        return self.sources.setdefault(name, {"rows": 0, "bad": {}, "train": 0, "eval": 0})

    def add_bad(self, kind: str, where: str, why: str, source: str | None = None) -> None:
        self.bad[kind] = self.bad.get(kind, 0) + 1
        examples = self.bad_examples.setdefault(kind, [])
        if len(examples) < BAD_EXAMPLES:
            examples.append(f"{where}: {why}")
        if source is not None:
            bad = self.source(source)["bad"]
            bad[kind] = bad.get(kind, 0) + 1

    def bad_kinds(self, bad: dict[str, int] | None = None) -> str:
        bad = self.bad if bad is None else bad
        return ", ".join(f"{kind}={count}" for kind, count in sorted(bad.items())) or "none"

    def bad_details(self) -> str:
        """Each kind with its first rows and why, e.g. `missing_field: line 3: row has no 'text' field`."""
        return "; ".join(f"{kind}: {' | '.join(self.bad_examples.get(kind, []))}" for kind in sorted(self.bad))

    def summary(self) -> str:
        """One line of totals naming every bad-row kind and its count; with several sources, a line with each
        source's share; with bad rows, a line with the first rows of each kind and why."""
        bad_total = sum(self.bad.values())
        totals = (f"data: {self.rows} rows, {bad_total} bad skipped ({self.bad_kinds()}); "
                  f"{self.train} train / {self.eval} eval samples{' (cached)' if self.cache_hit else ''}")
        lines = [totals]
        if len(self.sources) > 1:
            lines.append("data: sources: " + "; ".join(
                f"{name} {s['rows']} rows, {sum(s['bad'].values())} bad"
                + (f" ({self.bad_kinds(s['bad'])})" if s["bad"] else "")
                + f", {s['train']} train / {s['eval']} eval" for name, s in self.sources.items()))
        if bad_total:
            lines.append(f"data: first bad rows by kind: {self.bad_details()}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the sources of a run


@dataclass(frozen=True)
class Source:
    """One data set of a run with every key resolved: data.path's (key "data"), or data.sources[i]'s (key
    "data.sources.i"; its null keys take data.*'s values)."""

    key: str  # the config key its settings live under, for messages: "data" or "data.sources.1"
    name: str
    path: str
    format: DataFormat
    field: str  # the column; alpaca: its three columns, comma-separated
    split: str
    config_name: str | None = None
    revision: str | None = None
    data_files: tuple[str, ...] | None = None
    system_prompt: str | None = None
    weight: float | None = None
    samples: int | None = None
    in_mix: bool = False  # one of several: bad-row lines name it

    def where(self, where: str) -> str:
        """A row's place as the report shows it: "line 3", or "alpaca_sample line 3" in a mix."""
        return f"{self.name} {where}" if self.in_mix else where

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(column.strip() for column in self.field.split(","))


def _is_local(path: str) -> bool:
    return Path(path).suffix in LOCAL_SUFFIXES or Path(path).expanduser().is_absolute()


def _default_name(path: str, config_name: str | None, data_files: tuple[str, ...] | None) -> str:
    if _is_local(path):
        return Path(path).stem
    if path in FILE_BUILDERS and data_files:
        return Path(data_files[0]).stem
    return f"{path}/{config_name}" if config_name else path


def _resolve(source: SourceConfig | DataConfig, data_cfg: DataConfig, key: str, in_mix: bool) -> Source:
    def pick(name: str):
        own = getattr(source, name)
        return own if own is not None else getattr(data_cfg, name)

    path = source.path
    if path in (None, "", "???"):
        raise ConfigError(f"{key}.path is not set: a hub data set id, a file builder (csv, json, parquet) with "
                          f"{key}.data_files, or a local .jsonl / .json / .csv / .parquet file")
    data_format = DataFormat(pick("format"))
    # A null field follows the format: data.field where the source keeps data.format, else its format's columns.
    inherited = data_cfg.field if getattr(source, "format", None) is None else None
    column = source.field or inherited or FORMAT_FIELDS[data_format]
    data_files = pick("data_files")
    data_files = tuple(str(f) for f in data_files) if data_files is not None else None
    config_name = pick("config_name")
    name = data_cfg.name if key == "data" else source.name or _default_name(str(path), config_name, data_files)
    resolved = Source(
        key=key, name=str(name), path=str(path), format=data_format, field=str(column), split=str(pick("split")),
        config_name=config_name, revision=pick("revision"), data_files=data_files,
        system_prompt=pick("system_prompt"), weight=getattr(source, "weight", None),
        samples=getattr(source, "samples", None), in_mix=in_mix,
    )
    if data_format == DataFormat.alpaca and (len(resolved.columns) != 3 or not all(resolved.columns)):
        raise ConfigError(f"{key}.field={column}: the alpaca format reads three columns, instruction,input,output "
                          "(comma-separated; null for these)")
    if resolved.weight is not None and resolved.samples is not None:
        raise ConfigError(f"{key}: weight={resolved.weight:g} and samples={resolved.samples} are both set; give one "
                          "(weight: a share of the mix, samples: an exact count)")
    return resolved


def data_sources(data_cfg: DataConfig) -> list[Source]:
    """The data sets of a run, resolved: data.path's alone, or each of data.sources. Refused in one line
    (ConfigError): neither or both set, an unset source path, two sources of one name, weights on some
    sources but not all, weight and samples on one source, an alpaca field that is not three columns."""
    if not data_cfg.sources:
        if data_cfg.path in (None, "", "???"):
            raise ConfigError("data.path is not set: a hub data set id or a local file, or several data sets in "
                              "data.sources")
        return [_resolve(data_cfg, data_cfg, "data", in_mix=False)]
    if data_cfg.path not in (None, "???"):
        raise ConfigError(f"data.path={data_cfg.path} and data.sources are both set: one data set goes in data.path, "
                          "several in data.sources (set data.path=null)")
    sources = [_resolve(s, data_cfg, f"data.sources.{i}", in_mix=len(data_cfg.sources) > 1)
               for i, s in enumerate(data_cfg.sources)]
    seen: dict[str, str] = {}
    for source in sources:
        if source.name in seen:
            raise ConfigError(f"{source.key} and {seen[source.name]} are both named '{source.name}'; set "
                              f"{source.key}.name")
        seen[source.name] = source.key
    weighted = [s.key for s in sources if s.weight is not None]
    if weighted and len(weighted) < len(sources):
        unweighted = [s.key for s in sources if s.weight is None]
        raise ConfigError(f"weights on {', '.join(weighted)} but not on {', '.join(unweighted)}: give every source "
                          "a weight, or none (each then gives its samples, or all its rows)")
    return sources


def check_source(data_cfg: DataConfig) -> None:
    """Every source of `data_cfg` resolves (data_sources), and its local files are there, files, readable and
    (except parquet) UTF-8, before anything loads. Refused in one line naming the key."""
    for source in data_sources(data_cfg):
        _check_files(source)


def _check_files(source: Source) -> None:
    suffixes = tuple(LOCAL_SUFFIXES)
    if _is_local(source.path):
        path = user_file(source.path, f"{source.key}.path", suffixes=suffixes)
        if LOCAL_SUFFIXES[path.suffix] != "parquet":
            user_file(source.path, f"{source.key}.path", suffixes=suffixes, text=True)
    elif source.path in FILE_BUILDERS:
        if not source.data_files:
            raise ConfigError(f"{source.key}.path={source.path} reads local files: set "
                              f"{source.key}.data_files=[FILE, ...]")
        for data_file in source.data_files:
            if not any(c in data_file for c in "*?["):  # a glob is load_dataset's to expand
                user_file(data_file, f"{source.key}.data_files")


# ---------------------------------------------------------------- reading


def load_hub(source: Source) -> Dataset:
    """The split of a hub data set (config name, revision and data_files passed on), or of local files read by
    a file builder (`csv`, `json`, ...; relative data_files resolve like data.path). One line on failure."""
    data_files = source.data_files
    if data_files is not None and source.path in FILE_BUILDERS:
        data_files = tuple(f if any(c in f for c in "*?[") else str(resolve_path(f, must_exist=False))
                           for f in data_files)
    try:
        return load_dataset(source.path, name=source.config_name, revision=source.revision,
                            data_files=list(data_files) if data_files is not None else None, split=source.split)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{source.key}.path={source.path}: cannot load it ({type(error).__name__}: {reason})") \
            from None


def read_rows(source: Source, report: DataReport) -> list[tuple[str, dict]]:
    """(where, row) for each row of a local file or hub data set. Rows a file cannot give as an object are
    counted in `report` as bad, with their line: "invalid_json" (.jsonl), "invalid_csv" (a .csv line whose
    fields do not match the header)."""
    if not _is_local(source.path):
        dataset = load_hub(source)
        return [(f"row {number}", row) for number, row in enumerate(dataset.to_list(), 1)]
    _check_files(source)
    path = resolve_path(source.path)
    kind = LOCAL_SUFFIXES[path.suffix]
    if kind == "parquet":
        return [(f"row {number}", row) for number, row in enumerate(Dataset.from_parquet(str(path)).to_list(), 1)]
    if kind == "csv":
        return _csv_rows(path, source, report)
    if kind == "json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{source.key}.path={path} is not valid JSON ({error}); a .json file holds one list of "
                            "objects, a .jsonl file one object per line") from None
        if not isinstance(rows, list):
            raise DataError(f"{source.key}.path={path} must hold a JSON list of objects, got {type(rows).__name__}")
        return [(f"item {number}", row) for number, row in enumerate(rows, 1)]
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                report.add_bad("invalid_json", source.where(f"line {number}"), f"not JSON ({error.msg})", source.name)
                continue
            if isinstance(row, dict):
                rows.append((f"line {number}", row))
            else:
                report.add_bad("invalid_json", source.where(f"line {number}"),
                               f"a JSON {type(row).__name__}, not an object", source.name)
    return rows


def _csv_rows(path: Path, source: Source, report: DataReport) -> list[tuple[str, dict]]:
    """A CSV file with a header line: each record as {column: text}, placed by the line it starts on (a quoted
    field may span lines). A record with more or fewer fields than the header is a bad row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default 128 KiB would refuse long conversations
    rows, header = [], None
    with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a spreadsheet's byte order mark
        reader = csv.reader(handle)
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                report.add_bad("invalid_csv", source.where(f"line {start}"), f"not CSV ({error})", source.name)
                continue
            if not values:
                continue
            if header is None:
                header = values
            elif len(values) != len(header):
                report.add_bad("invalid_csv", source.where(f"line {start}"),
                               f"{len(values)} fields, the header has {len(header)}", source.name)
            else:
                rows.append((f"line {start}", dict(zip(header, values))))
    return rows


def row_to_messages(row: dict, source: Source) -> list[dict]:
    """One row as a validated message list; raises ConversationError naming the bad-row kind. A list-valued
    column (messages, sharegpt) may hold its list as JSON text, as CSV files do."""
    if not isinstance(row, dict):
        raise ConversationError("malformed", f"a {type(row).__name__}, not an object")
    needed = (source.columns[0], source.columns[2]) if source.format == DataFormat.alpaca else (source.field,)
    for column in needed:
        if column not in row:
            raise ConversationError("missing_field", f"row has no '{column}' field ({source.key}.field); its fields: "
                                    f"{', '.join(map(str, row)) or 'none'}")
    if source.format == DataFormat.alpaca:
        instruction, given, output = source.columns
        messages = alpaca_to_messages(row[instruction], row.get(given), row[output])
        return with_system_prompt(messages, source.system_prompt)
    value = row[source.field]
    if source.format == DataFormat.guanaco:
        messages = guanaco_to_messages(value)
    elif source.format == DataFormat.llama2:
        messages = llama2_to_messages(value)
    else:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConversationError("malformed", f"'{source.field}' is text, not a list of turns (nor JSON "
                                        "of one)") from None
        if source.format == DataFormat.sharegpt:
            messages = sharegpt_to_messages(value)
        else:
            if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
                raise ConversationError("malformed", f"'{source.field}' is not a list of messages")
            messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
            validate_messages(messages)
    return with_system_prompt(messages, source.system_prompt)


# ---------------------------------------------------------------- tokenizing


def tokenize_conversations(
    conversations: list[list[dict]], tokenizer, assistant_only_loss: bool
) -> list[dict]:
    """input_ids and labels (-100 outside assistant answers) for each conversation.

    The whole formatted text is tokenized at once, exactly as `apply_chat_template` would produce it, and
    the loss mask comes from character offsets, so training and generation see identical token ids.
    """
    formatted = [format_llama2(messages) for messages in conversations]
    encoded = tokenizer(
        [f.text for f in formatted], add_special_tokens=False, return_offsets_mapping=True
    )
    samples = []
    for ids, offsets, fmt in zip(encoded["input_ids"], encoded["offset_mapping"], formatted):
        if assistant_only_loss:
            # A token is trained on when its first character lies inside an answer span. Vectorized: this
            # loop runs over every token of the data set (benchmarks/bench_tokenize.py).
            begins = np.fromiter((begin for begin, _ in offsets), dtype=np.int64, count=len(offsets))
            starts = np.array([start for start, _ in fmt.answer_spans], dtype=np.int64)
            ends = np.array([end for _, end in fmt.answer_spans], dtype=np.int64)
            span = np.searchsorted(starts, begins, side="right") - 1
            inside = (span >= 0) & (begins < ends[np.maximum(span, 0)])
            labels = np.where(inside, np.asarray(ids, dtype=np.int64), -100).tolist()
        else:
            labels = list(ids)
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else repr(tokenizer.get_vocab())]
    parts += [str(tokenizer.chat_template), str(tokenizer.all_special_tokens)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def source_fingerprint(source: Source) -> str:
    if _is_local(source.path):
        path = resolve_path(source.path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    # Hub data and file builders: datasets' own fingerprint of the files (changes with the revision, the
    # config name, the data files and their contents).
    return load_hub(source)._fingerprint


def cache_key(data_cfg: DataConfig, tokenizer, code: tuple[Path, ...] | None = None, extra: dict | None = None) -> str:
    """What made the cached samples: every source (its data and resolved settings), the tokenizer, every
    setting (the bad-row policy too: a cache written under `skip` must not let `error` pass), and the source
    of the code that tokenized (`code`, else TOKENIZATION_CODE; herd.preference passes its own, and its pair
    settings in `extra`)."""
    code = TOKENIZATION_CODE if code is None else code
    settings = {
        k: (v.value if hasattr(v, "value") else v)
        for k, v in asdict(data_cfg).items()
        if k not in ("name", "cache_dir")
    }
    payload = json.dumps(
        {
            "code": code_fingerprint(code),
            "sources": [{**asdict(s), "data": source_fingerprint(s)} for s in data_sources(data_cfg)],
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": settings,
            **(extra or {}),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ---------------------------------------------------------------- mixing


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` split into whole counts in proportion to `weights` (largest remainder; ties to the earlier
    source): apportion(10, [2, 1, 1]) == [5, 3, 2]. Exact arithmetic, so the same inputs give the same counts."""
    whole = sum(Fraction(w) for w in weights)
    if total <= 0 or whole <= 0:
        return [0] * len(weights)
    quotas = [total * Fraction(w) / whole for w in weights]
    counts = [floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def largest_mix(usable: list[int], weights: list[float]) -> int:
    """The largest total whose apportionment by `weights` no source's `usable` count falls short of: the
    biggest mix at these proportions that repeats no row."""
    whole = sum(Fraction(w) for w in weights)
    total = min(floor(u * whole / Fraction(w)) for u, w in zip(usable, weights)) + len(usable)
    while total > 0 and any(c > u for c, u in zip(apportion(total, weights), usable)):
        total -= 1
    return total


class TokenizedPool:
    """A Pool of one source's (conversation, tokenized sample) pairs: its conversations in their seeded order,
    tokenized only as far as asked; rows dropped on the way (too long, nothing to train on) are counted in the
    report. Another row kind (herd.preference's pairs) overrides `chars` and `keep`."""

    def __init__(self, source: Source, items: list[tuple[str, Any]], tokenizer, data_cfg: DataConfig,
                 report: DataReport):
        self.source, self.pending, self.tokenizer, self.data_cfg, self.report = (
            source, items, tokenizer, data_cfg, report)
        self.examined = 0
        self.usable: list[tuple[Any, dict]] = []  # (item, sample)
        self.most_chars = data_cfg.max_seq_len * longest_token_chars(tokenizer)

    def take(self, count: int | None) -> list[tuple[Any, dict]]:
        """The first `count` usable samples (fewer when the source has fewer; None: all of them)."""
        while (count is None or len(self.usable) < count) and self.examined < len(self.pending):
            chunk = self.pending[self.examined : self.examined + TOKENIZE_BATCH]
            self.examined += len(chunk)
            self.usable += self._usable(chunk)
        return self.usable[:count] if count is not None else list(self.usable)

    def _usable(self, chunk: list[tuple[str, Any]]) -> list[tuple[Any, dict]]:
        fitting = []
        for where, item in chunk:
            # Longer than max_seq_len tokens even if every token were the longest: dropped untokenized, so a
            # huge row costs a length check, not a tokenizer pass.
            chars = self.chars(item)
            if chars > self.most_chars:
                self.report.add_bad("too_long", where, f"{chars} characters, more than data.max_seq_len="
                                    f"{self.data_cfg.max_seq_len} tokens can hold", self.source.name)
            else:
                fitting.append((where, item))
        return self.keep(fitting)

    def chars(self, conversation: list[dict]) -> int:
        """The characters the longest tokenized sequence of an item holds (for the untokenized length check)."""
        return sum(len(m["content"]) for m in conversation)

    def keep(self, fitting: list[tuple[str, list[dict]]]) -> list[tuple[list[dict], dict]]:
        """The (item, sample) of each item of `fitting` that is usable once tokenized; the others counted bad."""
        source, limit = self.source, self.data_cfg.max_seq_len
        samples = tokenize_conversations([c for _, c in fitting], self.tokenizer, self.data_cfg.assistant_only_loss)
        kept = []
        for (where, conversation), sample in zip(fitting, samples):
            if len(sample["input_ids"]) > limit:
                self.report.add_bad("too_long", where, f"{len(sample['input_ids'])} tokens > data.max_seq_len="
                                    f"{limit}", source.name)
            elif all(label == -100 for label in sample["labels"]):
                self.report.add_bad("no_assistant", where, "no assistant token left to train on", source.name)
            else:
                kept.append((conversation, sample))
        return kept


class Pool(Protocol):
    """A source's usable items in its seeded order, examined as far as asked (what mix_counts draws from)."""

    def take(self, count: int | None) -> list:
        """The first `count` usable items (fewer when the source has fewer; None: all of them)."""
        ...


def mix_counts(data_cfg: DataConfig, sources: list[Source], pools: list[Pool], report: DataReport) -> list[int]:
    """How many samples each source gives:

    - weights (on every source): the mix keeps their proportions (apportion); its size is data.max_samples,
      else the largest mix that repeats no row (largest_mix; every source is then examined in full to know
      its usable count). A source short of its share of data.max_samples is refused.
    - no weights: each source gives `samples` (refused when it has fewer usable), or all its usable rows;
      data.max_samples then cuts the mix to that size, each source keeping its share. A single data set with
      data.max_samples is a seeded subset, tokenized only as far as needed.

    Under bad_rows=error a refusal names the bad rows first. `pools` may hold any items (Pool): preference
    pairs mix by the same rules.
    """
    limit = data_cfg.max_samples
    if all(s.weight is not None for s in sources):
        weights = [s.weight for s in sources]
        if limit is None:
            return apportion(largest_mix([len(p.take(None)) for p in pools], weights), weights)
        counts = apportion(limit, weights)
        for source, pool, count in zip(sources, pools, counts):
            if len(usable := pool.take(count)) < count:
                most = largest_mix([len(p.take(None)) for p in pools], weights)
                _refuse_bad_rows(data_cfg, report)
                raise DataError(f"{source.key} ({source.name}): data.max_samples={limit} at these weights needs "
                                f"{count} of its samples, it has {len(usable)} usable{_bad_note(report, source)}; "
                                f"the largest mix at these weights is {most} (unset data.max_samples for it)")
        return counts
    if len(sources) == 1 and sources[0].samples is None:
        return [len(pools[0].take(limit))]
    counts = []
    for source, pool in zip(sources, pools):
        got = len(pool.take(source.samples))
        if source.samples is not None and got < source.samples:
            _refuse_bad_rows(data_cfg, report)
            raise DataError(f"{source.key}.samples={source.samples} but {source.name} has {got} usable samples"
                            f"{_bad_note(report, source)}")
        counts.append(got)
    if limit is not None and sum(counts) > limit:
        counts = apportion(limit, counts)
    return counts


def _bad_note(report: DataReport, source: Source) -> str:
    bad = report.source(source.name)["bad"]
    return f" ({sum(bad.values())} bad: {report.bad_kinds(bad)})" if bad else ""


# ---------------------------------------------------------------- the pipeline


@dataclass
class Selection:
    """What a run trains and evaluates on: (item, tokenized sample) pairs in split order; an item is a
    conversation (SFT) or a herd.preference Pair."""

    train: list[tuple[Any, dict]]
    eval: list[tuple[Any, dict]]
    report: DataReport

    def datasets(self) -> tuple[Dataset, Dataset | None, DataReport]:
        """The samples as the train and eval datasets (None: no eval split), and the report."""
        train = Dataset.from_list([sample for _, sample in self.train])
        evaluation = Dataset.from_list([sample for _, sample in self.eval]) if self.eval else None
        return train, evaluation, self.report


def _eval_count(eval_size: float, total: int) -> int:
    count = int(eval_size) if eval_size >= 1 else round(total * eval_size)
    return min(max(count, 0), total - 1)


def select_items(data_cfg: DataConfig, convert: Callable[[dict, Source], Any],
                 make_pool: Callable[[Source, list[tuple[str, Any]], DataReport], Pool]) -> Selection:
    """The pipeline for any row kind: every source read, each row converted (`convert(row, source)`, raising
    ConversationError for a bad row) and shuffled (seeded), the source's items put in a Pool (`make_pool(source,
    [(where, item)], report)`, which tokenizes as far as asked), mixed (mix_counts) and split: each source's
    eval share comes from the front of what it gives."""
    sources = data_sources(data_cfg)
    report = DataReport()
    pools = []
    for source in sources:
        tally = report.source(source.name)
        rows = read_rows(source, report)
        tally["rows"] = len(rows) + sum(tally["bad"].values())  # and the lines that were not rows (invalid_json/csv)
        items = []
        for where, row in rows:
            try:
                items.append((source.where(where), convert(row, source)))
            except ConversationError as error:
                report.add_bad(error.kind, source.where(where), str(error), source.name)
        # One data set keeps data.seed's order as it always had; each source of a mix its own stream.
        random.Random(data_cfg.seed if not source.in_mix else f"{data_cfg.seed}:{source.name}").shuffle(items)
        pools.append(make_pool(source, items, report))
    report.rows = sum(report.source(s.name)["rows"] for s in sources)

    counts = mix_counts(data_cfg, sources, pools, report)
    taken = [pool.take(count) for pool, count in zip(pools, counts)]
    check_bad_rows(data_cfg, report, sum(counts))
    evals = apportion(_eval_count(data_cfg.eval_size, sum(counts)), counts)
    train, evaluation = [], []
    for source, pairs, n_eval in zip(sources, taken, evals):
        evaluation += pairs[:n_eval]
        train += pairs[n_eval:]
        tally = report.source(source.name)
        tally["train"], tally["eval"] = len(pairs) - n_eval, n_eval
    if len(sources) > 1:
        mixer = random.Random(f"{data_cfg.seed}:mix")
        mixer.shuffle(train)
        mixer.shuffle(evaluation)
    report.train, report.eval = len(train), len(evaluation)
    return Selection(train, evaluation, report)


def select_samples(data_cfg: DataConfig, tokenizer) -> Selection:
    """The run's (conversation, tokenized sample) pairs: select_items with row_to_messages and TokenizedPool."""
    return select_items(data_cfg, row_to_messages, lambda source, conversations, report: TokenizedPool(
        source, conversations, tokenizer, data_cfg, report))


def _described(data_cfg: DataConfig) -> str:
    if not data_cfg.sources:
        return str(data_cfg.path)
    return f"data.sources ({', '.join(s.name for s in data_sources(data_cfg))})"


def _refuse_bad_rows(data_cfg: DataConfig, report: DataReport) -> None:
    bad_total = sum(report.bad.values())
    if bad_total and data_cfg.bad_rows == BadRows.error:
        raise DataError(f"{bad_total} bad rows in {_described(data_cfg)} ({report.bad_kinds()}); fix them or set "
                        f"data.bad_rows=skip. First bad rows: {report.bad_details()}")


def check_bad_rows(data_cfg: DataConfig, report: DataReport, usable: int) -> None:
    """bad_rows=error refuses any bad row; either policy refuses a data set left with under 2 samples.
    Both name every kind, its count, and the first rows of each with why."""
    _refuse_bad_rows(data_cfg, report)
    if usable < 2:
        bad_total = sum(report.bad.values())
        raise DataError(f"{_described(data_cfg)}: only {usable} usable samples after dropping bad rows "
                        f"({report.bad_kinds()})" + (f". First bad rows: {report.bad_details()}" if bad_total else ""))


def build_splits(data_cfg: DataConfig, tokenizer) -> tuple[Dataset, Dataset | None, DataReport]:
    """Tokenize from scratch (no cache): the train and eval datasets and a report of what was dropped."""
    return select_samples(data_cfg, tokenizer).datasets()


def split_conversations(
    data_cfg: DataConfig, tokenizer
) -> tuple[list[list[dict]], list[list[dict]], DataReport]:
    """The train and eval conversations (message lists), exactly the samples `build_splits` keeps, in
    the same order: what infer prompts with (e.g. the user turns of the eval split)."""
    selection = select_samples(data_cfg, tokenizer)
    return ([c for c, _ in selection.train], [c for c, _ in selection.eval], selection.report)


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for (an upper bound: byte tokens like <0x41>
    count their spelling)."""
    return max(len(token) for token in tokenizer.get_vocab())


def read_cache(cache: Path) -> tuple[Dataset, Dataset | None]:
    evaluation = load_from_disk(str(cache / "eval")) if (cache / "eval").exists() else None
    return load_from_disk(str(cache / "train")), evaluation


def load_splits(data_cfg: DataConfig, tokenizer) -> tuple[Dataset, Dataset | None, DataReport]:
    """Cached `build_splits`: the first call writes the cache, later calls with equal inputs reuse it."""
    cache = resolve_path(data_cfg.cache_dir, must_exist=False) / cache_key(data_cfg, tokenizer)
    if (cache / "report.json").exists():
        log.info("reusing tokenized data from %s", cache)
        try:
            report = DataReport(**json.loads((cache / "report.json").read_text()))
            report.cache_hit = True
            return (*read_cache(cache), report)
        except Exception as error:  # noqa: BLE001 - whatever broke it, herd's own cache is rebuilt
            print(f"herd: the tokenized data cache {cache} is damaged ({type(error).__name__}); tokenizing again",
                  flush=True)
            damaged = cache.with_name(f"{cache.name}.damaged-{random.getrandbits(32):08x}")
            cache.rename(damaged)
            shutil.rmtree(damaged, ignore_errors=True)

    train, evaluation, report = build_splits(data_cfg, tokenizer)
    write_cache(cache, train, evaluation, report)
    return (*read_cache(cache), report)


def write_cache(cache: Path, train: Dataset, evaluation: Dataset | None, report: DataReport) -> None:
    """Tokenized splits and their report under `cache`, atomically: a cache directory is complete or absent
    (SFT's conversations here, herd.preference's pairs alike)."""
    partial = cache.with_name(f"{cache.name}.partial-{random.getrandbits(32):08x}")
    train.save_to_disk(str(partial / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(partial / "eval"))
    (partial / "report.json").write_text(json.dumps(asdict(report)))  # written last: marks completeness
    try:
        partial.rename(cache)
    except OSError:  # another process won the race; its copy is equal
        shutil.rmtree(partial, ignore_errors=True)
    log.info("tokenized data cached in %s", cache)
