"""Preference pairs (method=dpo): every hub layout to the same pairs, bad rows by kind and line, TRL's tokens,
the cache, mixes of several pair data sets (data.sources, SFT's rules), and the bundled samples equal to their
generator."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from herd import preference
from herd.chat_format import ConversationError
from herd.config.dpo import DpoConfig
from herd.config.train import BadRows, DataConfig, SourceConfig
from herd.errors import ConfigError, DataError
from herd.fixtures.sample_data import PAIR_LAYOUTS, generate_pairs, preference_rows
from herd.preference import (
    Pair,
    build_pair_splits,
    cache_key,
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


# ---------------------------------------------------------------- mixes (data.sources)

HH_PROMPT = "Answer as in HH."  # the hh source's own system prompt (its rows have none): marks its pairs


def pair_mix(tmp_path, *sources: SourceConfig, **overrides) -> DataConfig:
    settings = {"name": "mix", "path": None, "sources": list(sources), "eval_size": 0.1, "max_seq_len": 1024,
                "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**settings, **overrides})


def two_sources(tmp_path, chat: dict | None = None, hh: dict | None = None) -> tuple[SourceConfig, SourceConfig]:
    """60 pairs in TRL's explicit-prompt layout ("chat") and 40 in Anthropic HH text ("hh"), all usable."""
    chat_path, hh_path = tmp_path / "chat.jsonl", tmp_path / "hh.jsonl"
    if not chat_path.exists():
        write_rows(chat_path, preference_rows(60, seed=1, layout="pairs"))
        write_rows(hh_path, preference_rows(40, seed=2, layout="hh"))
    return (SourceConfig(path=str(chat_path), **(chat or {})),
            SourceConfig(path=str(hh_path), **{"system_prompt": HH_PROMPT, **(hh or {})}))


def from_hh(pair: Pair) -> bool:
    return pair.prompt[0]["content"] == HH_PROMPT


def keys(pairs: list[Pair]) -> list[str]:
    return [json.dumps([list(p.prompt), p.chosen, p.rejected]) for p in pairs]


def test_a_weighted_pair_mix_keeps_its_proportions_in_train_and_eval(tmp_path, tiny_tokenizer):
    data_cfg = pair_mix(tmp_path, *two_sources(tmp_path, {"weight": 2}, {"weight": 1}), max_samples=30, eval_size=6)
    train, evaluation, report = split_pairs(data_cfg, DpoConfig(), tiny_tokenizer)
    # 30 at 2:1 are 20 + 10; the 6 eval pairs come from both in proportion, 4 + 2
    assert {name: (s["train"], s["eval"]) for name, s in report.sources.items()} == {"chat": (16, 4), "hh": (8, 2)}
    assert (report.train, report.eval, report.rows) == (24, 6, 100)
    assert [from_hh(p) for p in evaluation].count(True) == 2 and [from_hh(p) for p in train].count(True) == 8
    assert not set(keys(train)) & set(keys(evaluation))
    # each source with its own system prompt (the counts above: hh's pairs have it, chat's never)
    assert all(m["role"] != "system" for p in train + evaluation if from_hh(p) for m in p.prompt[1:])
    assert "\"role\": \"system\"" in "".join(keys(train))  # the chat rows' own system turns are kept
    # train and eval are shuffled together, not one source after the other
    flags = [from_hh(p) for p in train]
    assert flags not in (sorted(flags), sorted(flags, reverse=True))

    again_train, again_eval, _ = split_pairs(data_cfg, DpoConfig(), tiny_tokenizer)
    assert keys(again_train) == keys(train) and keys(again_eval) == keys(evaluation)
    tokenized_train, tokenized_eval, _ = build_pair_splits(data_cfg, DpoConfig(), tiny_tokenizer)
    assert tokenize_pairs(train, tiny_tokenizer) == tokenized_train.to_list()  # split_pairs: what is tokenized
    assert tokenize_pairs(evaluation, tiny_tokenizer) == tokenized_eval.to_list()
    other_seed = split_pairs(pair_mix(tmp_path, *data_cfg.sources, max_samples=30, eval_size=6, seed=7),
                             DpoConfig(), tiny_tokenizer)
    assert keys(other_seed[0]) != keys(train)

    # without data.max_samples: the largest mix at 2:1 that repeats no pair (hh's 40 allow 60 + 30)
    _, _, largest = split_pairs(pair_mix(tmp_path, *data_cfg.sources, eval_size=0), DpoConfig(), tiny_tokenizer)
    assert [s["train"] for s in largest.sources.values()] == [60, 30]


def test_pair_sample_counts_and_a_source_keeps_its_pairs_when_another_changes(tmp_path, tiny_tokenizer):
    chat, hh = two_sources(tmp_path, {"samples": 12})
    _, _, report = split_pairs(pair_mix(tmp_path, chat, hh, eval_size=0), DpoConfig(), tiny_tokenizer)
    assert [s["train"] for s in report.sources.values()] == [12, 40]  # hh without samples: all its pairs
    # data.max_samples cuts the mix, each source keeping its share: 52 -> 26 as 12:40, the eval's 4 as 6:20
    _, _, report = split_pairs(pair_mix(tmp_path, chat, hh, eval_size=4, max_samples=26), DpoConfig(),
                               tiny_tokenizer)
    assert [(s["train"], s["eval"]) for s in report.sources.values()] == [(5, 1), (17, 3)]

    fewer = split_pairs(pair_mix(tmp_path, chat, two_sources(tmp_path, hh={"samples": 5})[1], eval_size=0),
                        DpoConfig(), tiny_tokenizer)[0]
    more = split_pairs(pair_mix(tmp_path, chat, two_sources(tmp_path, hh={"samples": 25})[1], eval_size=0),
                       DpoConfig(), tiny_tokenizer)[0]
    assert (len(fewer), len(more)) == (17, 37)
    assert set(keys(fewer)) <= set(keys(more))  # the chat source's 12 stay; hh's first 5 are its first 25's


def test_a_pair_source_short_of_its_share_is_refused_in_one_line(tmp_path, tiny_tokenizer):
    chat, hh = two_sources(tmp_path)
    with pytest.raises(DataError, match=r"^data.sources.1.samples=500 but hh has 40 usable samples$"):
        split_pairs(pair_mix(tmp_path, chat, two_sources(tmp_path, hh={"samples": 500})[1]), DpoConfig(),
                    tiny_tokenizer)
    weighted = pair_mix(tmp_path, *two_sources(tmp_path, {"weight": 1}, {"weight": 1}), max_samples=100)
    # the largest mix at 1:1 is 41 + 40 (the tie to the earlier source)
    with pytest.raises(DataError, match=r"^data.sources.1 \(hh\): data.max_samples=100 at these weights needs 50 "
                                        r"of its samples, it has 40 usable; the largest mix at these weights is 81 "
                                        r"\(unset data.max_samples for it\)$"):
        build_pair_splits(weighted, DpoConfig(), tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"^weights on data.sources.0 but not on data.sources.1: give every source"):
        build_pair_splits(pair_mix(tmp_path, two_sources(tmp_path, {"weight": 1})[0], hh), DpoConfig(),
                          tiny_tokenizer)


def test_bad_pair_rows_in_a_mix_name_their_source(tmp_path, tiny_tokenizer):
    good = preference_rows(5, seed=4)
    broken = write_rows(tmp_path / "broken.jsonl", [
        *good, {"prompt": "Q", "chosen": "same", "rejected": "same"}, "{nope",
        {"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]},
        {"prompt": "Q", "chosen": "word " * 5000, "rejected": "B"}])
    chat, _ = two_sources(tmp_path, {"samples": 10})
    data_cfg = pair_mix(tmp_path, SourceConfig(path=str(broken)), chat, eval_size=0)
    _, _, report = build_pair_splits(data_cfg, DpoConfig(), tiny_tokenizer)
    kinds = {"identical": 1, "invalid_json": 1, "prompt_mismatch": 1, "too_long": 1}
    assert report.bad == kinds and report.sources["broken"]["bad"] == kinds
    assert report.sources["broken"]["rows"] == 9 and report.sources["chat"]["bad"] == {}
    summary = report.summary()
    assert "data: 69 rows, 4 bad skipped (identical=1, invalid_json=1, prompt_mismatch=1, too_long=1); " \
           "15 train / 0 eval samples" in summary
    assert ("data: sources: broken 9 rows, 4 bad (identical=1, invalid_json=1, prompt_mismatch=1, too_long=1), "
            "5 train / 0 eval; chat 60 rows, 0 bad, 10 train / 0 eval") in summary
    assert "identical: broken line 6: chosen and rejected are the same answer" in summary
    assert "invalid_json: broken line 7: not JSON" in summary
    assert "too_long: broken line 9: 25000 characters, more than data.max_seq_len=1024 tokens can hold" in summary
    with pytest.raises(DataError, match=r"^4 bad rows in data.sources \(broken, chat\) \(identical=1, invalid_json=1, "
                                        r"prompt_mismatch=1, too_long=1\); fix them or set data.bad_rows=skip"):
        build_pair_splits(pair_mix(tmp_path, *data_cfg.sources, bad_rows=BadRows.error), DpoConfig(), tiny_tokenizer)


def test_a_single_pair_data_set_is_selected_as_before_mixes(tmp_path, tiny_tokenizer):
    """One data set keeps data.seed's order: its usable pairs shuffled with data.seed, the first
    data.max_samples of them, the eval split first. Equal to what herd selected before mixes (9748351), and a
    data.sources of one entry is data.path."""
    path = SAMPLE_DIR / "preference_sample.jsonl"
    dpo_cfg = DpoConfig(max_prompt_length=60)
    data_cfg = DataConfig(name="p", path=str(path), max_seq_len=200, max_samples=100, eval_size=0.1, seed=3,
                          cache_dir=str(tmp_path / "cache"))
    train, evaluation, report = split_pairs(data_cfg, dpo_cfg, tiny_tokenizer)
    assert (len(train), len(evaluation)) == (90, 10) and report.bad == {"too_long": 197, "prompt_too_long": 25}
    digest = hashlib.sha256(json.dumps([[list(p.prompt), p.chosen, p.rejected] for p in evaluation + train])
                            .encode()).hexdigest()
    assert digest == "6430ae39427402bfc059ee67d432b58199ce3b6cc3df9876d7a8685ed375050e"  # the code before mixes'

    pairs = [row_to_pair(json.loads(line)) for line in path.read_text().splitlines()]
    random.Random(3).shuffle(pairs)
    usable = [p for p, s in zip(pairs, tokenize_pairs(pairs, tiny_tokenizer))
              if len(s["prompt_ids"]) + max(len(s["chosen_ids"]), len(s["rejected_ids"])) <= 200
              and len(s["prompt_ids"]) <= 60][:100]
    assert evaluation == usable[:10] and train == usable[10:]

    listed = DataConfig(name="p", path=None, sources=[SourceConfig(path=str(path))], max_seq_len=200,
                        max_samples=100, eval_size=0.1, seed=3)
    assert split_pairs(listed, dpo_cfg, tiny_tokenizer)[:2] == (train, evaluation)


def test_the_pair_cache_key_covers_every_source_and_the_pair_code(tmp_path, tiny_tokenizer, monkeypatch):
    base = two_sources(tmp_path, {"weight": 2}, {"weight": 1})
    data_cfg = pair_mix(tmp_path, *base, max_samples=30)
    train, _, report = load_pair_splits(data_cfg, DpoConfig(), tiny_tokenizer)
    assert not report.cache_hit
    again, _, report = load_pair_splits(pair_mix(tmp_path, *base, max_samples=30), DpoConfig(), tiny_tokenizer)
    assert report.cache_hit and again.to_list() == train.to_list() and list(report.sources) == ["chat", "hh"]

    key = cache_key(data_cfg, DpoConfig(), tiny_tokenizer)
    changed = [
        pair_mix(tmp_path, *two_sources(tmp_path, {"weight": 3}, {"weight": 1}), max_samples=30),
        pair_mix(tmp_path, *two_sources(tmp_path, {"samples": 20}, {"samples": 10}), max_samples=30),
        pair_mix(tmp_path, *two_sources(tmp_path, {"weight": 2}, {"weight": 1, "system_prompt": "Other."}),
                 max_samples=30),
        pair_mix(tmp_path, *two_sources(tmp_path, {"weight": 2}, {"weight": 1, "name": "anthropic"}), max_samples=30),
    ]
    keys_before = {key, *(cache_key(c, DpoConfig(), tiny_tokenizer) for c in changed)}
    assert len(keys_before) == 5
    hh = Path(base[1].path)
    hh.write_text(hh.read_text() + json.dumps(preference_rows(1, seed=9, layout="hh")[0]) + "\n")  # one file changes
    key = cache_key(data_cfg, DpoConfig(), tiny_tokenizer)
    assert key not in keys_before

    # and the source of the pair code (herd.preference.TOKENIZATION_CODE), not only SFT's
    code = tmp_path / "code"
    code.mkdir()
    for source in preference.TOKENIZATION_CODE:
        shutil.copy(source, code / source.name)
    monkeypatch.setattr(preference, "TOKENIZATION_CODE", tuple(code / s.name for s in preference.TOKENIZATION_CODE))
    assert cache_key(data_cfg, DpoConfig(), tiny_tokenizer) == key  # the same code, the same key
    (code / "preference.py").write_text((code / "preference.py").read_text() + "\n# changed\n")
    assert cache_key(data_cfg, DpoConfig(), tiny_tokenizer) != key


@pytest.mark.parametrize("name, n, seed, layout", [("preference_sample.jsonl", 400, 0, "pairs"),
                                                   ("preference_hh_sample.jsonl", 100, 1, "hh")])
def test_bundled_pairs_match_the_generator(name, n, seed, layout):
    lines = (SAMPLE_DIR / name).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == preference_rows(n, seed, layout)
