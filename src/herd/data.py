"""Conversations in, tokenized train/eval splits out: load, convert, validate, subset, split, tokenize, cache.

Rows become message lists (herd.chat), are formatted in the Llama-2 chat format and tokenized once; labels
keep only assistant tokens (answer and its `</s>`) unless `assistant_only_loss` is off. The result is cached
on disk under a fingerprint of the data, the tokenizer, every setting and the source of the code that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, load_dataset, load_from_disk

from herd import chat_format
from herd.chat_format import (
    ConversationError,
    format_llama2,
    guanaco_to_messages,
    llama2_to_messages,
    validate_messages,
    with_system_prompt,
)
from herd.config.train import BadRows, DataConfig, DataFormat
from herd.errors import DataError
from herd.paths import code_fingerprint, resolve_path, user_file

log = logging.getLogger(__name__)

# The code that turns rows into cached samples: its source is part of the cache key (herd.paths.code_fingerprint),
# so a changed format, template or mask never reuses samples made by the old code.
TOKENIZATION_CODE = (Path(chat_format.__file__), Path(__file__))
LOCAL_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
BAD_EXAMPLES = 3  # bad rows shown per kind


@dataclass
class DataReport:
    rows: int = 0  # rows read
    bad: dict[str, int] = field(default_factory=dict)  # bad rows by kind
    # per kind, the first few bad rows: "line 12: message 1 (assistant) is empty"
    bad_examples: dict[str, list[str]] = field(default_factory=dict)
    train: int = 0
    eval: int = 0
    cache_hit: bool = False

    def add_bad(self, kind: str, where: str, why: str) -> None:
        self.bad[kind] = self.bad.get(kind, 0) + 1
        examples = self.bad_examples.setdefault(kind, [])
        if len(examples) < BAD_EXAMPLES:
            examples.append(f"{where}: {why}")

    def bad_kinds(self) -> str:
        return ", ".join(f"{kind}={count}" for kind, count in sorted(self.bad.items())) or "none"

    def bad_details(self) -> str:
        """Each kind with its first rows and why, e.g. `missing_field: line 3: row has no 'text' field`."""
        return "; ".join(f"{kind}: {' | '.join(self.bad_examples.get(kind, []))}" for kind in sorted(self.bad))

    def summary(self) -> str:
        bad_total = sum(self.bad.values())
        line = (
            f"data: {self.rows} rows, {bad_total} bad skipped ({self.bad_kinds()}); "
            f"{self.train} train / {self.eval} eval samples{' (cached)' if self.cache_hit else ''}"
        )
        return line + (f"\ndata: first bad rows by kind: {self.bad_details()}" if bad_total else "")


# ---------------------------------------------------------------- reading


def _is_local(path: str) -> bool:
    return Path(path).suffix in LOCAL_SUFFIXES or Path(path).expanduser().is_absolute()


def check_source(data_cfg: DataConfig) -> None:
    """A local data file is there, a file, readable and UTF-8 (json/jsonl), before anything loads."""
    if _is_local(data_cfg.path):
        suffixes = tuple(LOCAL_SUFFIXES)
        path = user_file(data_cfg.path, "data.path", suffixes=suffixes)
        if LOCAL_SUFFIXES[path.suffix] != "parquet":
            user_file(data_cfg.path, "data.path", suffixes=suffixes, text=True)


def read_rows(data_cfg: DataConfig, report: DataReport) -> list[tuple[str, dict]]:
    """(where, row) for each row of a local file or hub data set; rows that are not JSON objects are
    counted in `report` as bad ("invalid_json") with their line."""
    if not _is_local(data_cfg.path):
        dataset = load_dataset(data_cfg.path, split=data_cfg.split)
        return [(f"row {number}", row) for number, row in enumerate(dataset.to_list(), 1)]
    check_source(data_cfg)
    path = resolve_path(data_cfg.path)
    kind = LOCAL_SUFFIXES[path.suffix]
    if kind == "parquet":
        return [(f"row {number}", row) for number, row in enumerate(Dataset.from_parquet(str(path)).to_list(), 1)]
    if kind == "json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"data.path={path} is not valid JSON ({error}); a .json file holds one list of "
                            "objects, a .jsonl file one object per line") from None
        if not isinstance(rows, list):
            raise DataError(f"data.path={path} must hold a JSON list of objects, got {type(rows).__name__}")
        return [(f"item {number}", row) for number, row in enumerate(rows, 1)]
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                report.add_bad("invalid_json", f"line {number}", f"not JSON ({error.msg})")
                continue
            if isinstance(row, dict):
                rows.append((f"line {number}", row))
            else:
                report.add_bad("invalid_json", f"line {number}", f"a JSON {type(row).__name__}, not an object")
    return rows


def row_to_messages(row: dict, data_cfg: DataConfig) -> list[dict]:
    """One row as a validated message list; raises ConversationError naming the bad-row kind."""
    if not isinstance(row, dict):
        raise ConversationError("malformed", f"a {type(row).__name__}, not an object")
    if data_cfg.field not in row:
        raise ConversationError("missing_field", f"row has no '{data_cfg.field}' field (data.field); its fields: "
                                f"{', '.join(map(str, row)) or 'none'}")
    value = row[data_cfg.field]
    if data_cfg.format == DataFormat.guanaco:
        messages = guanaco_to_messages(value)
    elif data_cfg.format == DataFormat.llama2:
        messages = llama2_to_messages(value)
    else:
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise ConversationError("malformed", f"'{data_cfg.field}' is not a list of messages")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
        validate_messages(messages)
    return with_system_prompt(messages, data_cfg.system_prompt)


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


def source_fingerprint(data_cfg: DataConfig) -> str:
    if _is_local(data_cfg.path):
        path = resolve_path(data_cfg.path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    # Hub data: datasets' own fingerprint of the downloaded files (changes when the revision does).
    return load_dataset(data_cfg.path, split=data_cfg.split)._fingerprint


def cache_key(data_cfg: DataConfig, tokenizer) -> str:
    """What made the cached samples: the data, the tokenizer, every setting (the bad-row policy too: a cache
    written under `skip` must not let `error` pass), and the source of the code that tokenized."""
    settings = {
        k: (v.value if hasattr(v, "value") else v)
        for k, v in asdict(data_cfg).items()
        if k not in ("name", "cache_dir")
    }
    payload = json.dumps(
        {
            "code": code_fingerprint(TOKENIZATION_CODE),
            "source": source_fingerprint(data_cfg),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ---------------------------------------------------------------- the pipeline


def _eval_count(eval_size: float, total: int) -> int:
    count = int(eval_size) if eval_size >= 1 else round(total * eval_size)
    return min(max(count, 0), total - 1)


def build_splits(data_cfg: DataConfig, tokenizer) -> tuple[Dataset, Dataset | None, DataReport]:
    """Tokenize from scratch (no cache): the train and eval datasets and a report of what was dropped."""
    _, samples, report = select_samples(data_cfg, tokenizer)
    n_eval = _eval_count(data_cfg.eval_size, len(samples))
    eval_samples, train_samples = samples[:n_eval], samples[n_eval:]
    report.train, report.eval = len(train_samples), len(eval_samples)
    train = Dataset.from_list(train_samples)
    return train, (Dataset.from_list(eval_samples) if eval_samples else None), report


def split_conversations(
    data_cfg: DataConfig, tokenizer
) -> tuple[list[list[dict]], list[list[dict]], DataReport]:
    """The train and eval conversations (message lists), exactly the samples `build_splits` keeps, in
    the same order: what infer prompts with (e.g. the user turns of the eval split)."""
    conversations, _, report = select_samples(data_cfg, tokenizer)
    n_eval = _eval_count(data_cfg.eval_size, len(conversations))
    report.train, report.eval = len(conversations) - n_eval, n_eval
    return conversations[n_eval:], conversations[:n_eval], report


def select_samples(data_cfg: DataConfig, tokenizer) -> tuple[list[list[dict]], list[dict], DataReport]:
    """The usable conversations (shuffled, subset) and their tokenized samples, in split order."""
    report = DataReport()
    rows = read_rows(data_cfg, report)
    report.rows = len(rows) + sum(report.bad.values())
    conversations = []
    for where, row in rows:
        try:
            conversations.append((where, row_to_messages(row, data_cfg)))
        except ConversationError as error:
            report.add_bad(error.kind, where, str(error))
    random.Random(data_cfg.seed).shuffle(conversations)

    wanted = data_cfg.max_samples or len(conversations)
    most_chars = data_cfg.max_seq_len * longest_token_chars(tokenizer)
    samples: list[dict] = []
    kept: list[list[dict]] = []
    batch = 1000
    for start in range(0, len(conversations), batch):
        if len(samples) >= wanted:
            break
        chunk = []
        for where, conversation in conversations[start : start + batch]:
            # Longer than max_seq_len tokens even if every token were the longest: dropped untokenized, so a
            # huge row costs a length check, not a tokenizer pass.
            chars = sum(len(m["content"]) for m in conversation)
            if chars > most_chars:
                report.add_bad("too_long", where, f"{chars} characters, more than data.max_seq_len="
                               f"{data_cfg.max_seq_len} tokens can hold")
            else:
                chunk.append((where, conversation))
        tokenized = tokenize_conversations([c for _, c in chunk], tokenizer, data_cfg.assistant_only_loss)
        for (where, conversation), sample in zip(chunk, tokenized):
            if len(sample["input_ids"]) > data_cfg.max_seq_len:
                report.add_bad("too_long", where, f"{len(sample['input_ids'])} tokens > data.max_seq_len="
                               f"{data_cfg.max_seq_len}")
            elif all(label == -100 for label in sample["labels"]):
                report.add_bad("no_assistant", where, "no assistant token left to train on")
            else:
                samples.append(sample)
                kept.append(conversation)
    samples, kept = samples[:wanted], kept[:wanted]
    check_bad_rows(data_cfg, report, len(samples))
    return kept, samples, report


def check_bad_rows(data_cfg: DataConfig, report: DataReport, usable: int) -> None:
    """bad_rows=error refuses any bad row; either policy refuses a data set left with under 2 samples.
    Both name every kind, its count, and the first rows of each with why."""
    bad_total = sum(report.bad.values())
    if bad_total and data_cfg.bad_rows == BadRows.error:
        raise DataError(f"{bad_total} bad rows in {data_cfg.path} ({report.bad_kinds()}); fix them or set "
                        f"data.bad_rows=skip. First bad rows: {report.bad_details()}")
    if usable < 2:
        raise DataError(f"{data_cfg.path}: only {usable} usable samples after dropping bad rows "
                        f"({report.bad_kinds()})" + (f". First bad rows: {report.bad_details()}" if bad_total else ""))


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for (an upper bound: byte tokens like <0x41>
    count their spelling)."""
    return max(len(token) for token in tokenizer.get_vocab())


def _read_cache(cache: Path) -> tuple[Dataset, Dataset | None]:
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
            return (*_read_cache(cache), report)
        except Exception as error:  # noqa: BLE001 - whatever broke it, herd's own cache is rebuilt
            print(f"herd: the tokenized data cache {cache} is damaged ({type(error).__name__}); tokenizing again",
                  flush=True)
            damaged = cache.with_name(f"{cache.name}.damaged-{random.getrandbits(32):08x}")
            cache.rename(damaged)
            shutil.rmtree(damaged, ignore_errors=True)

    train, evaluation, report = build_splits(data_cfg, tokenizer)
    partial = cache.with_name(f"{cache.name}.partial-{random.getrandbits(32):08x}")
    train.save_to_disk(str(partial / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(partial / "eval"))
    (partial / "report.json").write_text(json.dumps(asdict(report)))  # written last: marks completeness
    try:
        partial.rename(cache)  # atomic: a cache directory is complete or absent
    except OSError:  # another process won the race; its copy is equal
        shutil.rmtree(partial, ignore_errors=True)
    log.info("tokenized data cached in %s", cache)
    return (*_read_cache(cache), report)
