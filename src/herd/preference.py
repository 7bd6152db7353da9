"""Preference pairs in, tokenized train/eval splits out (method=dpo): read, convert, validate, mix, split, tokenize,
cache.

A run reads one data set (data.path) or several (data.sources), each with its own split, system prompt, weight or
samples, mixed by SFT's rules and code (herd.data.select_items): each source's usable pairs shuffled with a seed
derived from data.seed and its name (one data set: data.seed), each giving its count (herd.data.mix_counts:
weights or samples, data.max_samples), the eval split taken from every source in proportion, train and eval then
shuffled together. Pairs are tokenized only as far as the mix needs (PairPool).

Every row becomes a Pair: the prompt as messages ([system] user, assistant, ..., user) and two answers. The
layouts read, decided row by row from the row's shape (no setting):

- prompt + chosen + rejected: the prompt a string (one user turn; an Anthropic-style "\\n\\nHuman: ..." text is
  split into its turns) or a message list ending with a user turn; each answer a string, a one-message
  [assistant] list, or a whole conversation whose turns before the last answer must be the prompt's
  (TRL's explicit-prompt layouts; HuggingFaceH4/ultrafeedback_binarized).
- chosen + rejected message lists: two whole conversations that share every turn but the last answer
  (TRL's implicit-prompt layout).
- chosen + rejected strings in the Anthropic HH format, "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic/hh-rlhf).

Bad rows are counted by kind with their line (in a mix, their source too), through data.py's policy
(data.bad_rows): besides SFT's kinds (invalid_json, missing_field, empty, roles_out_of_order, too_long, ...),
`identical` (chosen equals rejected), `prompt_mismatch` (the two conversations' prompts differ) and
`prompt_too_long` (dpo.max_prompt_length).

Each pair is formatted in the Llama-2 chat format (herd.chat_format) and tokenized as TRL's DPOTrainer
tokenizes a conversational pair: the prompt alone (ending in "[/INST]", what generation is given) and
prompt + answer for each answer, the answers starting where the prompt's tokens stop being a prefix of both.
The samples (prompt_ids, chosen_ids, rejected_ids) are cached like SFT's, keyed by every source's data and
settings, the tokenizer, every setting and the source of this code.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from herd import chat_format, data
from herd.chat_format import ConversationError, format_llama2, validate_messages, with_system_prompt
from herd.config.dpo import DpoConfig
from herd.config.train import DataConfig
from herd.data import DataReport, Selection, Source, TokenizedPool, read_cache, select_items, write_cache
from herd.paths import resolve_path

log = logging.getLogger(__name__)

TOKENIZATION_CODE = (Path(chat_format.__file__), Path(data.__file__), Path(__file__))
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # what TRL's DataCollatorForPreference reads


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]  # [system] user, assistant, ..., user
    chosen: str
    rejected: str

    def conversation(self, answer: str) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------- rows -> pairs

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_to_messages(text: str) -> list[dict]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." to messages (a trailing empty "Assistant:" is dropped)."""
    if not isinstance(text, str) or not text.strip():
        raise ConversationError("empty", "text is empty")
    pieces = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if pieces[0].strip() or len(pieces) < 3:
        raise ConversationError("malformed", "not in the '\\n\\nHuman: ... \\n\\nAssistant: ...' format")
    messages = [{"role": "user" if name == "Human" else "assistant", "content": content.strip()}
                for name, content in zip(pieces[1::2], pieces[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # a prompt ending in "Assistant:", waiting for the answer
    return messages


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ConversationError("malformed", f"'{what}' is neither text nor a list of messages")
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def _split_conversation(messages: list[dict], what: str) -> tuple[list[dict], str]:
    """A whole conversation ending in an assistant answer: (the turns before it, the answer)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ConversationError("malformed", f"'{what}' does not end with an assistant answer")
    validate_messages(messages)
    return messages[:-1], messages[-1]["content"]


def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        prompt = hh_to_messages(value) if _HH_TURN.search("\n\n" + value.lstrip("\n")) and "Human:" in value \
            else [{"role": "user", "content": value.strip()}]
    else:
        prompt = _messages(value, "prompt")
    if not prompt or prompt[-1]["role"] != "user":
        raise ConversationError("malformed", "the prompt does not end with a user turn")
    return prompt


def _answer(value, prompt: list[dict], what: str) -> str:
    """One answer of an explicit-prompt row: text, [assistant], or a whole conversation repeating the prompt."""
    if isinstance(value, str):
        return value.strip()
    messages = _messages(value, what)
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        content = messages[0]["content"]
        if not isinstance(content, str):
            raise ConversationError("not_text", f"'{what}' content is {type(content).__name__}, not a string")
        return content.strip()
    turns, answer = _split_conversation(messages, what)
    if turns != prompt:
        raise ConversationError("prompt_mismatch", f"'{what}' repeats a prompt that differs from 'prompt'")
    return answer


def row_to_pair(row: dict, system_prompt: str | None = None) -> Pair:
    """One row as a validated Pair; raises ConversationError naming the bad-row kind."""
    if not isinstance(row, dict):
        raise ConversationError("malformed", f"a {type(row).__name__}, not an object")
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        raise ConversationError("missing_field", f"row has no '{missing[0]}' field; its fields: "
                                f"{', '.join(map(str, row)) or 'none'}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = _prompt(row["prompt"])
        answers = _answer(chosen, prompt, "chosen"), _answer(rejected, prompt, "rejected")
    else:
        if isinstance(chosen, str) and isinstance(rejected, str):  # Anthropic HH text
            sides = [hh_to_messages(chosen), hh_to_messages(rejected)]
        else:
            sides = [_messages(chosen, "chosen"), _messages(rejected, "rejected")]
        (prompt, first), (other, second) = (_split_conversation(m, w) for m, w in zip(sides, ("chosen", "rejected")))
        if prompt != other:
            differ = next(i for i, (a, b) in enumerate(zip([*prompt, None], [*other, None])) if a != b)
            raise ConversationError("prompt_mismatch", f"chosen and rejected differ before their last answer "
                                    f"(message {differ})")
        answers = first, second
    prompt = with_system_prompt(prompt, system_prompt)
    for answer in answers:
        validate_messages([*prompt, {"role": "assistant", "content": answer}])
    if answers[0].strip() == answers[1].strip():
        raise ConversationError("identical", "chosen and rejected are the same answer")
    return Pair(tuple(prompt), *answers)


# ---------------------------------------------------------------- tokenizing


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def tokenize_pairs(pairs: list[Pair], tokenizer) -> list[dict]:
    """prompt_ids, chosen_ids, rejected_ids for each pair, as TRL tokenizes a conversational pair with this
    chat template: prompt alone, prompt + each answer, answers from the end of the common prefix."""
    texts = []
    for pair in pairs:
        texts += [format_llama2(list(pair.prompt)).text, format_llama2(pair.conversation(pair.chosen)).text,
                  format_llama2(pair.conversation(pair.rejected)).text]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    samples = []
    for index in range(0, len(ids), 3):
        prompt, chosen, rejected = ids[index:index + 3]
        cut = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        samples.append({"prompt_ids": prompt[:cut], "chosen_ids": chosen[cut:], "rejected_ids": rejected[cut:]})
    return samples


# ---------------------------------------------------------------- the pipeline


class PairPool(TokenizedPool):
    """A Pool of one source's (Pair, tokenized sample) pairs, tokenized only as far as the mix needs: a pair
    whose prompt + longer answer exceeds data.max_seq_len is `too_long`, one whose prompt exceeds
    dpo.max_prompt_length `prompt_too_long` (nothing is truncated)."""

    def __init__(self, source: Source, pairs: list[tuple[str, Pair]], tokenizer, data_cfg: DataConfig,
                 dpo_cfg: DpoConfig, report: DataReport):
        super().__init__(source, pairs, tokenizer, data_cfg, report)
        self.max_prompt_length = dpo_cfg.max_prompt_length

    def chars(self, pair: Pair) -> int:
        return sum(len(m["content"]) for m in pair.prompt) + max(len(pair.chosen), len(pair.rejected))

    def keep(self, fitting: list[tuple[str, Pair]]) -> list[tuple[Pair, dict]]:
        source, limit = self.source, self.data_cfg.max_seq_len
        kept = []
        for (where, pair), sample in zip(fitting, tokenize_pairs([p for _, p in fitting], self.tokenizer)):
            prompt = len(sample["prompt_ids"])
            longest = prompt + max(len(sample["chosen_ids"]), len(sample["rejected_ids"]))
            if longest > limit:
                self.report.add_bad("too_long", where, f"{longest} tokens (prompt + longer answer) > "
                                    f"data.max_seq_len={limit}", source.name)
            elif self.max_prompt_length is not None and prompt > self.max_prompt_length:
                self.report.add_bad("prompt_too_long", where, f"prompt of {prompt} tokens > dpo.max_prompt_length="
                                    f"{self.max_prompt_length}", source.name)
            else:
                kept.append((pair, sample))
        return kept


def select_pairs(data_cfg: DataConfig, dpo_cfg: DpoConfig, tokenizer) -> Selection:
    """The train and eval (Pair, sample) pairs of data.path or the data.sources mix, by the rules
    data.select_samples takes conversations by (herd.data.select_items)."""
    return select_items(data_cfg, lambda row, source: row_to_pair(row, source.system_prompt),
                        lambda source, pairs, report: PairPool(source, pairs, tokenizer, data_cfg, dpo_cfg, report))


def split_pairs(data_cfg: DataConfig, dpo_cfg: DpoConfig, tokenizer) -> tuple[list[Pair], list[Pair], DataReport]:
    """The train and eval pairs, exactly those build_pair_splits tokenizes, in the same order."""
    selection = select_pairs(data_cfg, dpo_cfg, tokenizer)
    return [p for p, _ in selection.train], [p for p, _ in selection.eval], selection.report


def build_pair_splits(data_cfg: DataConfig, dpo_cfg: DpoConfig, tokenizer) -> tuple[Dataset, Dataset | None,
                                                                                      DataReport]:
    return select_pairs(data_cfg, dpo_cfg, tokenizer).datasets()


def cache_key(data_cfg: DataConfig, dpo_cfg: DpoConfig, tokenizer) -> str:
    """SFT's key (every source's data and settings, the tokenizer, every data setting) over this code, and the
    pair settings."""
    return "pairs-" + data.cache_key(data_cfg, tokenizer, TOKENIZATION_CODE,
                                     extra={"max_prompt_length": dpo_cfg.max_prompt_length})


def load_pair_splits(data_cfg: DataConfig, dpo_cfg: DpoConfig, tokenizer) -> tuple[Dataset, Dataset | None,
                                                                                     DataReport]:
    """Cached build_pair_splits (under data.cache_dir, next to SFT's caches): written once, atomically."""
    cache = resolve_path(data_cfg.cache_dir, must_exist=False) / cache_key(data_cfg, dpo_cfg, tokenizer)
    if not (cache / "report.json").exists():
        train, evaluation, report = build_pair_splits(data_cfg, dpo_cfg, tokenizer)
        write_cache(cache, train, evaluation, report)
        hit = False
    else:
        hit = True
    report = DataReport(**json.loads((cache / "report.json").read_text()))
    report.cache_hit = hit
    return (*read_cache(cache), report)
