"""Where rows come from and how several data sets mix: per-format default fields, Alpaca and ShareGPT rows,
CSV files, hub arguments (config name, revision, data_files), weighted and counted mixes with their eval
split, every source in the tokenization cache and under the bad-row policy, and the README's data commands."""

from __future__ import annotations

import csv
import json
import re
import shlex

import pytest
from omegaconf import OmegaConf

from herd.config.train import BadRows, DataConfig, DataFormat, SourceConfig, register_train_schema
from herd.data import (
    DataReport,
    apportion,
    build_splits,
    check_source,
    data_sources,
    largest_mix,
    load_splits,
    read_rows,
    row_to_messages,
    select_samples,
    split_conversations,
)
from herd.errors import ConfigError, DataError
from tests.conftest import REPO

SAMPLES = {  # the bundled sample of each format (src/herd/fixtures/sample_data.py): rows, all usable at 1024
    DataFormat.guanaco: ("data/sample/guanaco_sample.jsonl", 400),
    DataFormat.llama2: ("data/sample/llama2_sample.jsonl", 200),
    DataFormat.alpaca: ("data/sample/alpaca_sample.csv", 200),
    DataFormat.sharegpt: ("data/sample/sharegpt_sample.jsonl", 200),
}
GOOD = "### Human: What is a loop? ### Assistant: A loop repeats a block of code."


def single(path, tmp_path, **overrides) -> DataConfig:
    settings = {"name": "t", "path": str(path), "eval_size": 2, "max_seq_len": 1024,
                "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**settings, **overrides})


def mix(tmp_path, *sources: SourceConfig, **overrides) -> DataConfig:
    settings = {"name": "mix", "sources": list(sources), "eval_size": 0.1, "max_seq_len": 1024,
                "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**settings, **overrides})


def sample_source(fmt: DataFormat, **settings) -> SourceConfig:
    return SourceConfig(path=SAMPLES[fmt][0], format=fmt, **settings)


def ids(pairs) -> list[tuple[int, ...]]:
    return [tuple(sample["input_ids"]) for _, sample in pairs]


# ---------------------------------------------------------------- formats and their default fields


@pytest.mark.parametrize("fmt", list(SAMPLES), ids=lambda f: f.value)
def test_every_format_reads_its_default_field(fmt, tmp_path, tiny_tokenizer):
    path, rows = SAMPLES[fmt]
    train, evaluation, report = build_splits(single(path, tmp_path, format=fmt), tiny_tokenizer)
    assert report.bad == {} and report.rows == rows and len(train) + len(evaluation) == rows


def test_format_guanaco_alone_works_with_the_jsonl_preset(tmp_path, tiny_tokenizer):
    """The issue's case: `data=jsonl data.path=x.jsonl data.format=guanaco` used to keep the preset's
    field=messages, and every row was missing_field."""
    from herd.cli import check_config

    register_train_schema()
    cfg = check_config("train", ["data=jsonl", "data.path=data/sample/guanaco_sample.jsonl", "data.format=guanaco",
                                 f"data.cache_dir={tmp_path / 'cache'}"])
    data_cfg = OmegaConf.to_object(cfg.data)
    assert data_cfg.field is None and data_sources(data_cfg)[0].field == "text"
    _, _, report = build_splits(data_cfg, tiny_tokenizer)
    assert "missing_field" not in report.bad and report.train > 300


def test_a_wrong_field_names_the_key_and_the_row_fields(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": GOOD}) + "\n" for _ in range(3)))
    with pytest.raises(DataError) as error:
        build_splits(single(path, tmp_path, format=DataFormat.guanaco, field="messages"), tiny_tokenizer)
    assert str(error.value).endswith("only 0 usable samples after dropping bad rows (missing_field=3). First bad rows: "
                                     "missing_field: line 1: row has no 'messages' field (data.field); its fields: "
                                     "text | line 2: row has no 'messages' field (data.field); its fields: text | "
                                     "line 3: row has no 'messages' field (data.field); its fields: text")


ALPACA = DataConfig(name="a", path="a.jsonl", format=DataFormat.alpaca)


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Say hi.", "input": "", "output": "Hi!"},
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    ({"instruction": "Translate to English.", "input": " Hallo ", "output": "Hello"},
     [{"role": "user", "content": "Translate to English.\n\nHallo"}, {"role": "assistant", "content": "Hello"}]),
    ({"instruction": "Say hi.", "output": "Hi!"},  # no input column at all
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    ({"instruction": "Say hi.", "input": None, "output": "Hi!"},  # a null cell (parquet, load_dataset's csv)
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
])
def test_alpaca_rows(row, expected):
    [source] = data_sources(ALPACA)
    assert row_to_messages(row, source) == expected


@pytest.mark.parametrize("row, kind, words", [
    ({"instruction": "Say hi.", "input": ""}, "missing_field", "row has no 'output' field (data.field)"),
    ({"input": "x", "output": "y"}, "missing_field", "row has no 'instruction' field"),
    ({"instruction": "Say hi.", "input": "", "output": "  "}, "empty", "message 1 (assistant) is empty"),
    ({"instruction": "", "input": "Hallo", "output": "Hello"}, "empty", "message 0 (user) is empty"),
    ({"instruction": "Say hi.", "input": 3, "output": "Hi"}, "not_text", "input is int, not a string"),
    ({"instruction": ["Say hi."], "input": "", "output": "Hi"}, "not_text", "message 0 (user) content is list"),
])
def test_bad_alpaca_rows_are_counted_by_kind(row, kind, words):
    from herd.chat_format import ConversationError

    [source] = data_sources(ALPACA)
    with pytest.raises(ConversationError) as error:
        row_to_messages(row, source)
    assert error.value.kind == kind and words in str(error.value)


def test_alpaca_columns_can_be_renamed_and_must_be_three():
    dolly = DataConfig(name="d", path="d.jsonl", format=DataFormat.alpaca, field="instruction, context, response")
    [source] = data_sources(dolly)
    row = {"instruction": "Summarize.", "context": "A long text.", "response": "Short."}
    assert row_to_messages(row, source)[0]["content"] == "Summarize.\n\nA long text."
    with pytest.raises(ConfigError, match=r"data.field=instruction,output: the alpaca format reads three columns"):
        data_sources(DataConfig(name="d", path="d.jsonl", format=DataFormat.alpaca, field="instruction,output"))


SHAREGPT = DataConfig(name="s", path="s.jsonl", format=DataFormat.sharegpt)


def test_sharegpt_rows():
    [source] = data_sources(SHAREGPT)
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    assert row_to_messages({"conversations": turns}, source) == expected
    assert row_to_messages({"conversations": json.dumps(turns)}, source) == expected  # a CSV cell: JSON text


@pytest.mark.parametrize("turns, kind, words", [
    ([{"from": "human", "value": "Hi"}, {"from": "function", "value": "{}"}], "unknown_role",
     "turn 1 is from 'function'; allowed: human, gpt, system"),
    ([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hello"}], "roles_out_of_order",
     "message 0 has role 'assistant', expected 'user'"),
    ([{"from": "human", "value": "Hi"}], "no_assistant", "no assistant turn"),
    ("[not json", "malformed", "'conversations' is text, not a list of turns"),
    ([["human", "Hi"]], "malformed", "not a list of {'from': ..., 'value': ...} turns"),
])
def test_bad_sharegpt_rows_are_counted_by_kind(turns, kind, words):
    from herd.chat_format import ConversationError

    [source] = data_sources(SHAREGPT)
    with pytest.raises(ConversationError) as error:
        row_to_messages({"conversations": turns}, source)
    assert error.value.kind == kind and words in str(error.value)


# ---------------------------------------------------------------- CSV


def test_csv_rows_bad_records_by_line_and_the_bad_row_policy(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as handle:  # with a byte order mark, as Excel writes
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["text", "source"])
        writer.writerows([[GOOD, "a"]] * 3)
        writer.writerow(["### Human: two\nlines ### Assistant: spanning a quoted field", "b"])  # lines 5-6
        handle.write("\n")  # blank line: skipped, not a row
        writer.writerow([GOOD, "c", "one field too many"])  # line 8
        writer.writerow(["### Human: no answer"])  # line 9: one field short
        writer.writerow(["### Human: no answer ### Assistant: ", "d"])  # line 10
        writer.writerows([[GOOD, "e"]] * 2)
    [source] = data_sources(single(path, tmp_path, format=DataFormat.guanaco))
    report = DataReport()
    rows = read_rows(source, report)
    assert [where for where, _ in rows] == ["line 2", "line 3", "line 4", "line 5", "line 10", "line 11", "line 12"]
    assert rows[3][1] == {"text": "### Human: two\nlines ### Assistant: spanning a quoted field", "source": "b"}
    assert report.bad_examples["invalid_csv"] == ["line 8: 3 fields, the header has 2",
                                                  "line 9: 1 fields, the header has 2"]

    train, evaluation, report = build_splits(single(path, tmp_path, format=DataFormat.guanaco), tiny_tokenizer)
    assert report.bad == {"invalid_csv": 2, "empty": 1} and report.rows == 9
    assert len(train) + len(evaluation) == 6
    assert "3 bad skipped (empty=1, invalid_csv=2)" in report.summary()
    with pytest.raises(DataError, match=r"3 bad rows in .*rows.csv \(empty=1, invalid_csv=2\); fix them or set "
                                        r"data.bad_rows=skip. First bad rows: empty: line 10: message 1"):
        build_splits(single(path, tmp_path, format=DataFormat.guanaco, bad_rows=BadRows.error), tiny_tokenizer)


# ---------------------------------------------------------------- hub data sets and file builders


def test_hub_arguments_reach_load_dataset(tmp_path, tiny_tokenizer, monkeypatch):
    """config_name, revision, data_files and split are passed to datasets.load_dataset as they are (hub
    data_files name files inside the repo and are not resolved locally); a failed load is one line."""
    from datasets import Dataset

    import herd.data
    from herd.fixtures.sample_data import generate_guanaco_rows

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if path == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub or cannot be accessed.")
        return Dataset.from_list(generate_guanaco_rows(20, seed=len(calls)))

    monkeypatch.setattr(herd.data, "load_dataset", fake_load_dataset)
    data_cfg = single("org/chats", tmp_path, format=DataFormat.guanaco, config_name="en", revision="0123abc",
                      data_files=["train/part-0.jsonl"], split="train[:80%]")
    train, evaluation, report = build_splits(data_cfg, tiny_tokenizer)
    assert calls[0] == ("org/chats", {"name": "en", "revision": "0123abc", "data_files": ["train/part-0.jsonl"],
                                      "split": "train[:80%]"})
    assert len(train) + len(evaluation) == 20 and report.bad == {}

    calls.clear()
    load_splits(data_cfg, tiny_tokenizer)  # the fingerprint and the rows: the same arguments both times
    assert [kwargs["revision"] for _, kwargs in calls] == ["0123abc", "0123abc"]

    in_mix = mix(tmp_path, SourceConfig(path="org/chats", revision="v2", data_files=["a.jsonl"]),
                 SourceConfig(path="org/other", config_name="de"), format=DataFormat.guanaco)
    calls.clear()
    select_samples(in_mix, tiny_tokenizer)
    assert calls == [("org/chats", {"name": None, "revision": "v2", "data_files": ["a.jsonl"], "split": "train"}),
                     ("org/other", {"name": "de", "revision": None, "data_files": None, "split": "train"})]
    assert [s.name for s in data_sources(in_mix)] == ["org/chats", "org/other/de"]

    with pytest.raises(DataError, match=r"^data.path=org/missing: cannot load it \(FileNotFoundError: Dataset "
                                        r"'org/missing' doesn't exist on the Hub or cannot be accessed.\)$"):
        build_splits(single("org/missing", tmp_path), tiny_tokenizer)


@pytest.mark.parametrize("builder, fmt", [("csv", DataFormat.alpaca), ("json", DataFormat.sharegpt)])
def test_file_builders_read_local_data_files_through_load_dataset(builder, fmt, tmp_path, tiny_tokenizer):
    """`data.path=csv data.data_files=[...]`: the real datasets.load_dataset with local files (what a hub
    data set's data_files go through too), giving the same conversations as reading the file directly."""
    path, rows = SAMPLES[fmt]
    through_builder = single(builder, tmp_path, format=fmt, data_files=[path])
    check_source(through_builder)
    train, evaluation, report = split_conversations(through_builder, tiny_tokenizer)
    direct = split_conversations(single(path, tmp_path, format=fmt, name=through_builder.name), tiny_tokenizer)
    assert report.rows == rows and report.bad == {}
    assert (train, evaluation) == direct[:2]

    with pytest.raises(ConfigError, match=f"data.path={builder} reads local files: set data.data_files="):
        check_source(single(builder, tmp_path, format=fmt))
    with pytest.raises(Exception, match=r"data.data_files=nothere.csv: no such file"):
        check_source(single(builder, tmp_path, format=fmt, data_files=["nothere.csv"]))


# ---------------------------------------------------------------- mixing


def test_apportion_and_largest_mix():
    assert apportion(10, [2, 1, 1]) == [5, 3, 2]  # the remainders tie: the earlier source first
    assert apportion(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # quotas 3.5, 1.75, 1.75: the largest remainders win
    assert apportion(5, [100, 1]) == [5, 0]
    assert sum(apportion(1001, [3, 7, 11, 13])) == 1001
    assert largest_mix([400, 200, 200], [2, 1, 1]) == 800
    assert largest_mix([400, 50, 200], [2, 1, 1]) == 201  # the 50-row source runs out first: 101 + 50 + 50
    assert apportion(200, [2, 1, 1]) == [100, 50, 50]


def test_a_weighted_mix_keeps_its_proportions_in_train_and_eval(tmp_path, tiny_tokenizer):
    data_cfg = mix(tmp_path, sample_source(DataFormat.guanaco, weight=2), sample_source(DataFormat.alpaca, weight=1),
                   sample_source(DataFormat.sharegpt, weight=1), max_samples=40, eval_size=8)
    selection = select_samples(data_cfg, tiny_tokenizer)
    sources = selection.report.sources
    assert {name: (s["train"], s["eval"]) for name, s in sources.items()} == {
        "guanaco_sample": (16, 4), "alpaca_sample": (8, 2), "sharegpt_sample": (8, 2)}
    assert (len(selection.train), len(selection.eval)) == (32, 8)
    assert not set(ids(selection.train)) & set(ids(selection.eval))
    # the alpaca samples are one exchange each, the guanaco and sharegpt ones up to three
    assert selection.report.train == 32 and selection.report.rows == 800

    again = select_samples(data_cfg, tiny_tokenizer)
    assert ids(again.train) == ids(selection.train) and ids(again.eval) == ids(selection.eval)
    other_seed = select_samples(mix(tmp_path, *data_cfg.sources, max_samples=40, eval_size=8, seed=7), tiny_tokenizer)
    assert ids(other_seed.train) != ids(selection.train)

    # without data.max_samples: the largest mix at 2:1:1 that repeats no row (alpaca and sharegpt run out)
    largest = select_samples(mix(tmp_path, *data_cfg.sources, eval_size=0), tiny_tokenizer)
    assert [s["train"] for s in largest.report.sources.values()] == [400, 200, 200]
    assert len(largest.train) == 800 and largest.eval == []


def test_a_source_keeps_its_samples_when_another_changes(tmp_path, tiny_tokenizer):
    """Each source has its own seeded order (data.seed and its name): changing one source's share leaves which
    rows the others give alone, so an experiment on the mix changes one thing."""
    guanaco, alpaca = sample_source(DataFormat.guanaco, samples=30), sample_source(DataFormat.alpaca, samples=10)
    before = split_conversations(mix(tmp_path, guanaco, alpaca, eval_size=0), tiny_tokenizer)[0]
    after = split_conversations(mix(tmp_path, guanaco, sample_source(DataFormat.alpaca, samples=25), eval_size=0),
                                tiny_tokenizer)[0]
    assert len(before) == 40 and len(after) == 55

    assert {json.dumps(c) for c in before} <= {json.dumps(c) for c in after}  # alpaca's first 10 are its first 25's


def test_sample_counts_all_rows_and_max_samples(tmp_path, tiny_tokenizer):
    guanaco, alpaca, sharegpt = (sample_source(DataFormat.guanaco, samples=30), sample_source(DataFormat.alpaca),
                                 sample_source(DataFormat.sharegpt, samples=20))
    report = select_samples(mix(tmp_path, guanaco, alpaca, sharegpt, eval_size=0), tiny_tokenizer).report
    assert [s["train"] for s in report.sources.values()] == [30, 200, 20]
    # data.max_samples cuts the mix, each source keeping its share: 250 -> 100 as 30:200:20
    report = select_samples(mix(tmp_path, guanaco, alpaca, sharegpt, eval_size=10, max_samples=100),
                            tiny_tokenizer).report
    assert [(s["train"], s["eval"]) for s in report.sources.values()] == [(11, 1), (72, 8), (7, 1)]


def test_each_source_has_its_own_format_field_and_system_prompt_or_data_s(tmp_path, tiny_tokenizer):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"dialog": [{"role": "user", "content": f"q{i}"},
                                                    {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(4)))
    data_cfg = mix(tmp_path, SourceConfig(path=str(chats), field="dialog"),  # format and prompt: data.*'s
                   sample_source(DataFormat.alpaca, samples=4, system_prompt="Follow the instruction."),
                   sample_source(DataFormat.sharegpt, samples=4),  # its own format: its own default field
                   format=DataFormat.messages, system_prompt="You are herd.", eval_size=0)
    resolved = data_sources(data_cfg)
    assert [(s.name, s.format.value, s.field, s.system_prompt) for s in resolved] == [
        ("chats", "messages", "dialog", "You are herd."),
        ("alpaca_sample", "alpaca", "instruction,input,output", "Follow the instruction."),
        ("sharegpt_sample", "sharegpt", "conversations", "You are herd.")]
    train, _, report = split_conversations(data_cfg, tiny_tokenizer)
    assert report.bad == {} and len(train) == 12 and all(c[0]["role"] == "system" for c in train)
    firsts = [c[0]["content"] for c in train]
    assert firsts.count("Follow the instruction.") == 4  # the alpaca rows: their own prompt
    assert firsts.count("You are herd.") >= 4  # the chats, and the sharegpt rows without a system turn of their own
    # a data.field set for data.format does not leak into a source of another format
    assert data_sources(mix(tmp_path, *data_cfg.sources, field="dialog"))[2].field == "conversations"


def test_bad_rows_in_a_mix_name_their_source_under_one_policy(tmp_path, tiny_tokenizer):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([json.dumps({"text": GOOD})] * 5 + ["{nope", json.dumps({"other": 1})]) + "\n")
    data_cfg = mix(tmp_path, SourceConfig(path=str(broken), format=DataFormat.guanaco),
                   sample_source(DataFormat.alpaca, samples=10), eval_size=0)
    report = select_samples(data_cfg, tiny_tokenizer).report
    assert report.bad == {"invalid_json": 1, "missing_field": 1}
    assert report.sources["broken"]["bad"] == {"invalid_json": 1, "missing_field": 1}
    assert report.sources["broken"]["rows"] == 7 and report.sources["alpaca_sample"]["bad"] == {}
    summary = report.summary()
    assert "data: 207 rows, 2 bad skipped (invalid_json=1, missing_field=1); 15 train / 0 eval samples" in summary
    assert ("data: sources: broken 7 rows, 2 bad (invalid_json=1, missing_field=1), 5 train / 0 eval; "
            "alpaca_sample 200 rows, 0 bad, 10 train / 0 eval") in summary
    assert "invalid_json: broken line 6: not JSON" in summary
    assert "missing_field: broken line 7: row has no 'text' field (data.sources.0.field)" in summary
    with pytest.raises(DataError, match=r"^2 bad rows in data.sources \(broken, alpaca_sample\) \(invalid_json=1, "
                                        r"missing_field=1\); fix them or set data.bad_rows=skip"):
        select_samples(mix(tmp_path, *data_cfg.sources, bad_rows=BadRows.error), tiny_tokenizer)


@pytest.mark.parametrize("settings, error, words", [
    ({"sources": [SourceConfig(path="a.jsonl", weight=1), SourceConfig(path="b.jsonl")]}, ConfigError,
     "weights on data.sources.0 but not on data.sources.1: give every source a weight, or none"),
    ({"sources": [SourceConfig(path="a.jsonl", weight=1, samples=5)]}, ConfigError,
     "data.sources.0: weight=1 and samples=5 are both set; give one"),
    ({"path": "c.jsonl", "sources": [SourceConfig(path="a.jsonl")]}, ConfigError,
     "data.path=c.jsonl and data.sources are both set"),
    ({"sources": [SourceConfig(path="x/a.jsonl"), SourceConfig(path="y/a.jsonl")]}, ConfigError,
     "data.sources.1 and data.sources.0 are both named 'a'; set data.sources.1.name"),
    ({"sources": [SourceConfig()]}, ConfigError, "data.sources.0.path is not set"),
    ({"path": None}, ConfigError, "data.path is not set"),
])
def test_mix_configs_refused_in_one_line(settings, error, words):
    with pytest.raises(error) as raised:
        check_source(DataConfig(name="m", **settings))
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_a_source_short_of_its_count_is_refused_naming_what_it_has(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"^data.sources.1.samples=500 but alpaca_sample has 200 usable samples$"):
        select_samples(mix(tmp_path, sample_source(DataFormat.guanaco), sample_source(DataFormat.alpaca, samples=500)),
                       tiny_tokenizer)
    weighted = mix(tmp_path, sample_source(DataFormat.guanaco, weight=1), sample_source(DataFormat.alpaca, weight=1),
                   max_samples=600, max_seq_len=512)  # 391 guanaco samples fit in 512 tokens: 201 + 200 at most
    with pytest.raises(DataError, match=r"^data.sources.1 \(alpaca_sample\): data.max_samples=600 at these weights "
                                        r"needs 300 of its samples, it has 200 usable; the largest mix at these "
                                        r"weights is 401 \(unset data.max_samples for it\)$"):
        select_samples(weighted, tiny_tokenizer)


def test_a_mix_of_one_source_is_the_single_data_set(tmp_path, tiny_tokenizer):
    path = SAMPLES[DataFormat.guanaco][0]
    alone = select_samples(single(path, tmp_path, format=DataFormat.guanaco, max_samples=50, name="guanaco_sample"),
                           tiny_tokenizer)
    listed = select_samples(mix(tmp_path, sample_source(DataFormat.guanaco), max_samples=50, eval_size=2),
                            tiny_tokenizer)
    assert ids(alone.train) == ids(listed.train) and ids(alone.eval) == ids(listed.eval)


# ---------------------------------------------------------------- the cache


def test_the_cache_key_covers_every_source(tmp_path, tiny_tokenizer):
    guanaco = tmp_path / "guanaco.jsonl"
    guanaco.write_text((REPO / SAMPLES[DataFormat.guanaco][0]).read_text())
    base = [SourceConfig(path=str(guanaco), format=DataFormat.guanaco, samples=20),
            sample_source(DataFormat.alpaca, samples=10)]
    data_cfg = mix(tmp_path, *base)
    train, _, report = load_splits(data_cfg, tiny_tokenizer)
    assert not report.cache_hit
    again, _, report = load_splits(mix(tmp_path, *base), tiny_tokenizer)
    assert report.cache_hit and again["input_ids"] == train["input_ids"]
    assert list(report.sources) == ["guanaco", "alpaca_sample"] and report.sources["alpaca_sample"]["train"] == 9
    assert "data: sources: guanaco" in report.summary()

    changed = [
        mix(tmp_path, base[0], sample_source(DataFormat.alpaca, samples=11)),
        mix(tmp_path, base[0], sample_source(DataFormat.alpaca, samples=10, system_prompt="Be brief.")),
        mix(tmp_path, base[0], sample_source(DataFormat.alpaca, samples=10, name="alpaca")),
        mix(tmp_path, SourceConfig(path=str(guanaco), format=DataFormat.guanaco, samples=20, revision="x"), base[1]),
    ]
    for data_cfg in changed:
        assert not load_splits(data_cfg, tiny_tokenizer)[2].cache_hit
    guanaco.write_text(guanaco.read_text() + json.dumps({"text": GOOD}) + "\n")  # one source's file changes
    assert not load_splits(mix(tmp_path, *base), tiny_tokenizer)[2].cache_hit
    assert len(list((tmp_path / "cache").iterdir())) == 6


# ---------------------------------------------------------------- Hydra and the README


def test_mixes_from_the_command_line():
    from herd.cli import check_config

    register_train_schema()
    cfg = OmegaConf.to_object(check_config("train", ["data=mix", "data.sources.1.weight=3", "data.max_samples=100"]))
    assert [s.weight for s in cfg.data.sources] == [2, 3, 1] and cfg.data.path is None
    cfg = OmegaConf.to_object(check_config("train", [
        "data=mix", ("data.sources=[{path: data/sample/alpaca_sample.csv, format: alpaca, samples: 150}, "
                    "{path: data/sample/sharegpt_sample.jsonl, format: sharegpt}]")]))
    assert [(s.format, s.samples) for s in cfg.data.sources] == [(DataFormat.alpaca, 150), (DataFormat.sharegpt, None)]
    # infer reads a run's data config back from herd_run.json (plain JSON): the sources come back typed
    from herd.inference import _structured

    stored = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg.data), enum_to_str=True)))
    assert _structured(DataConfig, stored) == cfg.data
    for override, words in [("data.sources.1.weight=-1", "data.sources.1.weight=-1.0: must be > 0"),
                            ("data.sources.2.samples=0", "data.sources.2.samples=0: must be >= 1"),
                            ("data.sources.0.format=csv", "expected one of [messages, guanaco, llama2, alpaca, sharegpt]"),
                            ("data.sources.0.wieght=1", "unknown key 'data.sources[0].wieght'")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            check_config("train", ["data=mix", override])


def test_the_readme_data_commands_compose_and_their_files_exist(tmp_path, tiny_tokenizer):
    """Every `python -m train ...` line of the README's Data section composes, and names data that is there
    (a hub line with a placeholder only composes); the summary it shows for data=mix is the one printed."""
    from herd.cli import check_config

    register_train_schema()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Data\n"):readme.index("### The run directory")]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("python -m train")]
    assert len(commands) >= 7
    for command in commands:
        overrides = shlex.split(command)[3:]
        cfg = OmegaConf.to_object(check_config("train", [o for o in overrides if "<" not in o]))
        if "<" not in command:
            check_source(cfg.data)
    assert (REPO / "conf" / "data" / "mix.yaml").read_text().count("- path: data/sample/") == 3
    data_cfg = OmegaConf.to_object(check_config("train", ["data=mix", f"data.cache_dir={tmp_path}"])).data
    shown = section.split("```\ndata: ", 1)[1].split("```", 1)[0]
    printed = select_samples(data_cfg, tiny_tokenizer).report.summary()
    assert ("data: " + shown).splitlines()[:2] == printed.splitlines()[:2]
    assert printed.splitlines()[2].startswith(("data: " + shown).splitlines()[2].removesuffix("| ..."))


def test_the_mix_trains_in_a_real_process(tmp_path, tiny_model_dir):
    """`python -m train data=mix`: the sources checked, mixed, tokenized and trained on, each source's share
    printed; the run's config keeps the sources."""
    from tests.conftest import FAST_TRAIN, run_module

    args = [a for a in FAST_TRAIN if a != "data=sample"]
    result = run_module("train", *args, "data=mix", "data.max_samples=60", "data.eval_size=6",
                        "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", f"data.cache_dir={tmp_path / 'cache'}",
                        f"output_dir={tmp_path / 'run'}")
    # 60 samples at 2:1:1 are 30 + 15 + 15; the 6 eval samples 3 + 1.5 + 1.5, the tie to the earlier source
    assert "data: 800 rows, " in result.stdout and "; 54 train / 6 eval samples" in result.stdout
    assert re.search(r"data: sources: guanaco_sample 400 rows, \d+ bad \(too_long=\d+\), 27 train / 3 eval; "
                     r"alpaca_sample 200 rows, \d+ bad \(too_long=\d+\), 13 train / 2 eval; "
                     r"sharegpt_sample 200 rows, \d+ bad \(too_long=\d+\), 14 train / 1 eval", result.stdout)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert [s.format for s in saved.data.sources] == ["guanaco", "alpaca", "sharegpt"]
