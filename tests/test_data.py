"""Bad rows by kind, seeded subsets and splits, assistant-only labels, and the tokenization cache."""

import json

import pytest

from herd.config.train import BadRows, DataConfig, DataFormat
from herd.data import build_splits, load_splits, tokenize_conversations
from herd.errors import DataError, InputError

GOOD = "### Human: What is a loop? ### Assistant: A loop repeats a block of code."


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def config(path, tmp_path, **overrides):
    settings = {"name": "t", "path": str(path), "format": DataFormat.guanaco, "field": "text", "eval_size": 2,
                    "max_seq_len": 128, "cache_dir": str(tmp_path / "cache")}
    settings.update(overrides)
    return DataConfig(**settings)


@pytest.fixture
def messy_file(tmp_path):
    rows = [{"text": GOOD} for _ in range(10)] + [
        "{not json",
        {"text": "### Human: no answer here"},
        {"text": ""},
        {"text": "### Assistant: first ### Human: second"},
        {"text": "### Human: long ### Assistant: " + "word " * 400},
        {"other": "field"},
    ]
    return write_jsonl(tmp_path / "messy.jsonl", rows)


def test_bad_rows_are_counted_by_kind_and_skipped(messy_file, tmp_path, tiny_tokenizer):
    train, evaluation, report = build_splits(config(messy_file, tmp_path), tiny_tokenizer)
    assert report.bad == {"invalid_json": 1, "no_assistant": 1, "empty": 1, "roles_out_of_order": 1,
                          "too_long": 1, "missing_field": 1}
    assert report.rows == 16
    assert (len(train), len(evaluation)) == (8, 2)
    assert "6 bad skipped (empty=1, invalid_json=1, missing_field=1" in report.summary()


def test_bad_rows_policy_error(messy_file, tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"6 bad rows in .*messy.jsonl \(empty=1, invalid_json=1"):
        build_splits(config(messy_file, tmp_path, bad_rows=BadRows.error), tiny_tokenizer)


def test_labels_cover_only_assistant_answers_and_eos(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    [sample] = tokenize_conversations([messages], tiny_tokenizer, assistant_only_loss=True)
    assert sample["input_ids"] == tiny_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    kept = [t for t in sample["labels"] if t != -100]
    assert kept.count(tiny_tokenizer.eos_token_id) == 2
    assert tiny_tokenizer.decode(kept, skip_special_tokens=True).split() == ["Hello", "friend", "Goodbye"]
    [full] = tokenize_conversations([messages], tiny_tokenizer, assistant_only_loss=False)
    assert full["labels"] == full["input_ids"]


def test_max_samples_is_a_seeded_subset_and_split(tmp_path, tiny_tokenizer):
    from herd.fixtures.sample_data import generate_guanaco_rows

    path = write_jsonl(tmp_path / "rows.jsonl", generate_guanaco_rows(60))
    first = build_splits(config(path, tmp_path, max_samples=20, eval_size=0.25), tiny_tokenizer)
    again = build_splits(config(path, tmp_path, max_samples=20, eval_size=0.25), tiny_tokenizer)
    other = build_splits(config(path, tmp_path, max_samples=20, eval_size=0.25, seed=7), tiny_tokenizer)
    assert (len(first[0]), len(first[1])) == (15, 5)
    assert first[0]["input_ids"] == again[0]["input_ids"] and first[1]["input_ids"] == again[1]["input_ids"]
    assert first[0]["input_ids"] != other[0]["input_ids"]
    assert not {tuple(x) for x in first[0]["input_ids"]} & {tuple(x) for x in first[1]["input_ids"]}


@pytest.mark.parametrize("fmt, filename", [(DataFormat.guanaco, "guanaco_sample.jsonl"),
                                           (DataFormat.llama2, "llama2_sample.jsonl")])
def test_bundled_formats_load_cleanly(fmt, filename, tmp_path, tiny_tokenizer):
    data = config(f"data/sample/{filename}", tmp_path, format=fmt, max_seq_len=1024, eval_size=0.1)
    train, evaluation, report = build_splits(data, tiny_tokenizer)
    assert report.bad == {} and len(train) + len(evaluation) == report.rows


def test_messages_format_and_parquet(tmp_path, tiny_tokenizer):
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    data = config(tmp_path / "rows.parquet", tmp_path, format=DataFormat.messages, field="messages")
    train, evaluation, report = build_splits(data, tiny_tokenizer)
    assert (len(train), len(evaluation), report.bad) == (4, 2, {})


def test_unknown_suffix_is_refused(tmp_path, tiny_tokenizer):
    (tmp_path / "rows.tsv").write_text("text\n")
    with pytest.raises(InputError, match="suffix '.tsv'; allowed: .jsonl, .json, .csv, .parquet"):
        build_splits(config(tmp_path / "rows.tsv", tmp_path), tiny_tokenizer)


def test_tokenization_is_cached_and_reused(messy_file, tmp_path, tiny_tokenizer, monkeypatch):
    data = config(messy_file, tmp_path)
    train, _, report = load_splits(data, tiny_tokenizer)
    assert not report.cache_hit
    [cache] = [p for p in (tmp_path / "cache").iterdir()]

    import herd.data

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("the second load tokenized again instead of reusing the cache")

    monkeypatch.setattr(herd.data, "build_splits", must_not_tokenize)
    again, _, report = load_splits(data, tiny_tokenizer)
    assert report.cache_hit and report.bad == {"invalid_json": 1, "no_assistant": 1, "empty": 1,
                                                 "roles_out_of_order": 1, "too_long": 1, "missing_field": 1}
    assert again["input_ids"] == train["input_ids"]
    assert [p for p in (tmp_path / "cache").iterdir()] == [cache]

    # A setting that changes the tokens, or a changed file, gets a new cache entry.
    monkeypatch.undo()
    load_splits(config(messy_file, tmp_path, max_seq_len=64), tiny_tokenizer)
    messy_file.write_text(messy_file.read_text() + json.dumps({"text": GOOD}) + "\n")
    load_splits(data, tiny_tokenizer)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_a_warm_cache_does_not_let_bad_rows_pass_under_the_error_policy(messy_file, tmp_path, tiny_tokenizer):
    _, _, report = load_splits(config(messy_file, tmp_path), tiny_tokenizer)  # skip: cached with 6 bad rows
    assert not report.cache_hit and sum(report.bad.values()) == 6
    with pytest.raises(DataError, match="6 bad rows"):
        load_splits(config(messy_file, tmp_path, bad_rows=BadRows.error), tiny_tokenizer)


def test_changed_tokenization_code_is_a_new_cache_entry(messy_file, tmp_path, tiny_tokenizer, monkeypatch):
    """The cache is keyed by the source of the code that tokenized (herd.data.TOKENIZATION_CODE), not by a
    version someone has to bump: here the chat format's source changes ([/INST] -> [/INST2]), and the data is
    tokenized again in the new format instead of the old samples being reused."""
    import shutil

    import herd.chat_format
    import herd.data

    data = config(messy_file, tmp_path)
    original, _, _ = load_splits(data, tiny_tokenizer)
    changed = tmp_path / "changed"
    changed.mkdir()
    for source in herd.data.TOKENIZATION_CODE:
        shutil.copy(source, changed / source.name)
    assert herd.paths.code_fingerprint(changed / s.name for s in herd.data.TOKENIZATION_CODE) == \
        herd.paths.code_fingerprint(herd.data.TOKENIZATION_CODE)  # the same code, the same key
    chat_source = changed / "chat_format.py"
    chat_source.write_text(chat_source.read_text().replace('E_INST = "[INST]", "[/INST]"',
                                                           'E_INST = "[INST]", "[/INST2]"'))
    assert '"[/INST2]"' in chat_source.read_text()
    # what that source would do once imported: the formatter uses the new closing tag
    monkeypatch.setattr(herd.data, "TOKENIZATION_CODE", tuple(changed / s.name for s in herd.data.TOKENIZATION_CODE))
    monkeypatch.setattr(herd.chat_format, "E_INST", "[/INST2]")
    again, _, report = load_splits(data, tiny_tokenizer)
    assert not report.cache_hit and len(list((tmp_path / "cache").iterdir())) == 2
    assert again["input_ids"] != original["input_ids"]
    assert "[/INST2]" in tiny_tokenizer.decode(again["input_ids"][0])
    monkeypatch.undo()  # the original code again: its own cache entry, still there
    reused, _, report = load_splits(data, tiny_tokenizer)
    assert report.cache_hit and reused["input_ids"] == original["input_ids"]


def test_a_damaged_cache_is_rebuilt_not_a_traceback(messy_file, tmp_path, tiny_tokenizer, capsys):
    data = config(messy_file, tmp_path)
    first = list(load_splits(data, tiny_tokenizer)[0]["input_ids"])  # read now: the dataset maps the cache files
    [cache] = [p for p in (tmp_path / "cache").iterdir() if (p / "report.json").exists()]
    for arrow in (cache / "train").glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    again, _, report = load_splits(data, tiny_tokenizer)
    assert "is damaged" in capsys.readouterr().out and not report.cache_hit
    assert list(again["input_ids"]) == list(first)


@pytest.mark.parametrize("content, kind", [(None, "not_text"), (7, "not_text"), ("  ", "empty")])
def test_a_system_message_that_is_not_text_is_a_bad_row(content, kind):
    from herd.chat_format import ConversationError, validate_messages

    messages = [{"role": "system", "content": content}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ConversationError) as error:
        validate_messages(messages)
    assert error.value.kind == kind


def test_an_unknown_role_is_its_own_kind():
    from herd.chat_format import ConversationError, validate_messages

    with pytest.raises(ConversationError, match="role 'bot'; allowed: system, user, assistant") as error:
        validate_messages([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}])
    assert error.value.kind == "unknown_role"
