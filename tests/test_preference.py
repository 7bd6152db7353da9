"""Preference pairs (method=dpo): every hub layout to the same pairs, bad rows by kind and line, TRL's tokens,
the cache, and the bundled samples equal to their generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herd.chat_format import ConversationError
from herd.config.dpo import DpoConfig
from herd.config.train import BadRows, DataConfig
from herd.errors import DataError
from herd.fixtures.sample_data import PAIR_LAYOUTS, generate_pairs, preference_rows
from herd.preference import (
    Pair,
    build_pair_splits,
    load_pair_splits,
    row_to_pair,
    split_pairs,
    tokenize_pairs,
)

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("layout", PAIR_LAYOUTS)
def test_every_layout_reads_as_the_generated_pairs(layout):
    pairs = [Pair(tuple(p), c, r) for p, c, r in generate_pairs(60, seed=3)]
    if layout == "hh":  # the HH format has no system turn
        pairs = [Pair(tuple(m for m in p.prompt if m["role"] != "system"), p.chosen, p.rejected) for p in pairs]
    read = [row_to_pair(row) for row in preference_rows(60, seed=3, layout=layout)]
    expected = [pair for pair in pairs if layout != "text" or len(pair.prompt) == 1]
    assert layout in ("hh", "text") or any(pair.prompt[0]["role"] == "system" for pair in read)
    assert read == expected and len(read) >= 20


def test_explicit_prompt_with_whole_conversations_and_system_prompts():
    # HuggingFaceH4/ultrafeedback_binarized: a text prompt, answers repeating it as whole conversations.
    row = {"prompt": "Why?", "chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "A."}],
           "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "B."}]}
    assert row_to_pair(row) == Pair(({"role": "user", "content": "Why?"},), "A.", "B.")
    assert row_to_pair(row, "Be brief.").prompt[0] == {"role": "system", "content": "Be brief."}
    hh_prompt = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Why?\n\nAssistant:", "chosen": " A.",
                 "rejected": " B."}
    assert [m["role"] for m in row_to_pair(hh_prompt).prompt] == ["user", "assistant", "user"]


@pytest.mark.parametrize("row, kind", [
    ({"prompt": "Q", "chosen": "same", "rejected": " same "}, "identical"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]}, "prompt_mismatch"),
    ({"chosen": "\n\nHuman: Q1\n\nAssistant: A", "rejected": "\n\nHuman: Q2\n\nAssistant: B"}, "prompt_mismatch"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "A"}],
      "rejected": "B"}, "prompt_mismatch"),
    ({"prompt": "Q", "chosen": "A"}, "missing_field"),
    ({"prompt": "Q", "chosen": "", "rejected": "B"}, "empty"),
    ({"chosen": "plain text", "rejected": "other text"}, "malformed"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "x",
      "rejected": "y"}, "malformed"),
    ({"chosen": "\n\nHuman: Q\n\nHuman: Q again\n\nAssistant: A",
      "rejected": "\n\nHuman: Q\n\nHuman: Q again\n\nAssistant: B"}, "roles_out_of_order"),
])
def test_bad_pairs_have_a_kind(row, kind):
    with pytest.raises(ConversationError) as error:
        row_to_pair(row)
    assert error.value.kind == kind


def test_bad_rows_are_counted_with_their_line_and_refused_under_error(tmp_path, tiny_tokenizer):
    good = preference_rows(12, seed=5)
    rows = [*good[:6], {"prompt": "Q", "chosen": "same", "rejected": "same"}, "{not json", *good[6:],
            {"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
             "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    data_cfg = DataConfig(name="p", path=str(path), max_seq_len=1024, eval_size=2, cache_dir=str(tmp_path / "c"))
    train, evaluation, report = build_pair_splits(data_cfg, DpoConfig(), tiny_tokenizer)
    assert report.bad == {"identical": 1, "invalid_json": 1, "prompt_mismatch": 1}
    assert report.bad_examples["identical"] == ["line 7: chosen and rejected are the same answer"]
    assert report.bad_examples["prompt_mismatch"][0].startswith("line 15: ")
    assert (len(train), len(evaluation)) == (10, 2)
    with pytest.raises(DataError, match=r"3 bad rows .*identical=1, invalid_json=1, prompt_mismatch=1"):
        build_pair_splits(DataConfig(name="p", path=str(path), bad_rows=BadRows.error), DpoConfig(), tiny_tokenizer)
    # Lengths: a pair whose prompt + longer answer exceeds max_seq_len, or whose prompt exceeds
    # dpo.max_prompt_length, is a bad row; nothing is truncated.
    _, _, short = build_pair_splits(DataConfig(name="p", path=str(path), max_seq_len=200), DpoConfig(), tiny_tokenizer)
    assert short.bad.get("too_long", 0) > 0
    _, _, prompts = build_pair_splits(data_cfg, DpoConfig(max_prompt_length=20), tiny_tokenizer)
    assert prompts.bad.get("prompt_too_long", 0) > 0


def test_tokens_are_trls_for_the_same_conversational_pair(tiny_tokenizer):
    # TRL's DPOTrainer tokenizes a conversational pair with the tokenizer's chat template (herd's Llama-2 one):
    # the prompt with the generation prompt, prompt + answer for each answer, answers after the common prefix.
    pairs = [Pair(tuple(p), c, r) for p, c, r in generate_pairs(20, seed=7)]
    for pair, sample in zip(pairs, tokenize_pairs(pairs, tiny_tokenizer)):
        def template(messages, **kwargs):
            return tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

        prompt = template(list(pair.prompt), add_generation_prompt=True)
        assert sample["prompt_ids"] == prompt  # the whole prompt: it ends on a token boundary ("[/INST]")
        assert prompt + sample["chosen_ids"] == template(pair.conversation(pair.chosen))
        assert prompt + sample["rejected_ids"] == template(pair.conversation(pair.rejected))
        assert tiny_tokenizer.decode(sample["chosen_ids"]).endswith("</s>")


def test_cache_is_reused_and_splits_are_those_of_split_pairs(tmp_path, tiny_tokenizer):
    path = write_rows(tmp_path / "pairs.jsonl", preference_rows(30, seed=2))
    data_cfg = DataConfig(name="p", path=str(path), eval_size=4, cache_dir=str(tmp_path / "cache"))
    first = load_pair_splits(data_cfg, DpoConfig(), tiny_tokenizer)
    second = load_pair_splits(data_cfg, DpoConfig(), tiny_tokenizer)
    assert not first[2].cache_hit and second[2].cache_hit
    assert first[0].to_list() == second[0].to_list() and first[1].to_list() == second[1].to_list()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    load_pair_splits(data_cfg, DpoConfig(max_prompt_length=500), tiny_tokenizer)  # a pair setting: its own cache
    assert len(list((tmp_path / "cache").iterdir())) == 2
    train_pairs, eval_pairs, _ = split_pairs(data_cfg, DpoConfig(), tiny_tokenizer)
    assert tokenize_pairs(eval_pairs, tiny_tokenizer) == first[1].to_list()
    assert tokenize_pairs(train_pairs, tiny_tokenizer) == first[0].to_list()


@pytest.mark.parametrize("name, n, seed, layout", [("preference_sample.jsonl", 400, 0, "pairs"),
                                                   ("preference_hh_sample.jsonl", 100, 1, "hh")])
def test_bundled_pairs_match_the_generator(name, n, seed, layout):
    lines = (SAMPLE_DIR / name).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == preference_rows(n, seed, layout)
