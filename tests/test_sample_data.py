"""The synthetic samples: deterministic, well-formed in every format, and the bundled files match the generator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from herd.chat_format import (
    alpaca_to_messages,
    format_llama2,
    guanaco_to_messages,
    llama2_to_messages,
    sharegpt_to_messages,
)
from herd.fixtures.sample_data import (
    MAX_WORDS,
    MIN_WORDS,
    generate_alpaca_rows,
    generate_conversations,
    generate_guanaco_rows,
    generate_llama2_rows,
    generate_sharegpt_rows,
    main,
    write_sample,
)

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_deterministic_and_seed_dependent():
    assert generate_guanaco_rows(50, seed=3) == generate_guanaco_rows(50, seed=3)
    assert generate_guanaco_rows(50, seed=3) != generate_guanaco_rows(50, seed=4)
    # A shorter run is a prefix of a longer one: n only says where to stop.
    assert generate_guanaco_rows(400)[:50] == generate_guanaco_rows(50)


def test_guanaco_rows_parse_with_realistic_shape():
    rows = generate_guanaco_rows()
    assert len(rows) == 400 and all(set(row) == {"text"} for row in rows)
    turn_counts, answer_words = set(), []
    for row in rows:
        assert row["text"].startswith("### Human: ")
        messages = guanaco_to_messages(row["text"])
        turn_counts.add(len(messages) // 2)
        answer_words += [len(m["content"].split()) for m in messages if m["role"] == "assistant"]
    assert turn_counts == {1, 2, 3}
    assert MIN_WORDS <= min(answer_words) and max(answer_words) <= MAX_WORDS
    # Varied lengths, not one fixed size: both short and long answers are common.
    assert sum(w < 30 for w in answer_words) > 50 and sum(w > 90 for w in answer_words) > 50
    assert len({row["text"] for row in rows}) == len(rows)


def test_llama2_rows_are_the_same_conversations():
    conversations = generate_conversations(200)
    rows = generate_llama2_rows(200)
    with_system = 0
    for messages, row in zip(conversations, rows, strict=True):
        parsed = llama2_to_messages(row["text"])
        if parsed[0]["role"] == "system":
            with_system += 1
        assert format_llama2(parsed).text == row["text"]
        assert [m for m in parsed if m["role"] != "system"] == messages
    assert 20 < with_system < 120


def test_alpaca_rows_are_single_exchanges_some_with_input():
    rows = generate_alpaca_rows(200, seed=1)
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)
    assert generate_alpaca_rows(50, seed=1) == rows[:50] and generate_alpaca_rows(50, seed=2) != rows[:50]
    with_input = [row for row in rows if row["input"]]
    assert 40 < len(with_input) < 120
    for row in rows:
        [user, answer] = alpaca_to_messages(row["instruction"], row["input"], row["output"])
        assert answer["content"] == row["output"] and user["content"].endswith(row["input"])
    assert len({(row["instruction"], row["input"], row["output"]) for row in rows}) == len(rows)


def test_sharegpt_rows_are_the_conversations_with_some_system_turns():
    rows = generate_sharegpt_rows(200, seed=2)
    with_system = 0
    for messages, row in zip(generate_conversations(200, seed=2), rows, strict=True):
        parsed = sharegpt_to_messages(row["conversations"])
        with_system += parsed[0]["role"] == "system"
        assert [m for m in parsed if m["role"] != "system"] == messages
    assert 20 < with_system < 120


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_bundled_files_match_the_generator():
    # Regenerate with the commands in src/herd/fixtures/sample_data.py's docstring
    assert read_jsonl(SAMPLE_DIR / "guanaco_sample.jsonl") == generate_guanaco_rows(400, seed=0)
    assert read_jsonl(SAMPLE_DIR / "llama2_sample.jsonl") == generate_llama2_rows(200, seed=0)
    assert read_csv(SAMPLE_DIR / "alpaca_sample.csv") == generate_alpaca_rows(200, seed=1)
    assert read_jsonl(SAMPLE_DIR / "sharegpt_sample.jsonl") == generate_sharegpt_rows(200, seed=2)
    commands = (SAMPLE_DIR.parents[1] / "src/herd/fixtures/sample_data.py").read_text()
    for path in SAMPLE_DIR.iterdir():
        assert f"python -m herd.fixtures.sample_data data/sample/{path.name} " in commands, path.name


def test_write_sample_and_cli(tmp_path, capsys):
    path = write_sample(tmp_path / "sub" / "rows.jsonl", n=7, seed=1)
    assert read_jsonl(path) == generate_guanaco_rows(7, seed=1)
    main([str(tmp_path / "cli.jsonl"), "--n", "5", "--seed", "2", "--format", "llama2"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.jsonl")
    assert read_jsonl(tmp_path / "cli.jsonl") == generate_llama2_rows(5, seed=2)
    main([str(tmp_path / "cli.csv"), "--n", "4", "--seed", "3", "--format", "sharegpt"])  # lists as JSON text
    assert [{"conversations": json.loads(row["conversations"])} for row in read_csv(tmp_path / "cli.csv")] == \
        generate_sharegpt_rows(4, seed=3)
