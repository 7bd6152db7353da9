"""The tiny Llama model: deterministic build, atomic caching, and a tokenizer that behaves like Llama-2's."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from herd.chat_format import format_llama2
from herd.fixtures import tiny
from herd.fixtures.sample_data import generate_guanaco_rows, generate_llama2_rows

# Before anything imports huggingface_hub: the build and every load must work without the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "How do I make pancakes?"},
    {"role": "assistant", "content": "Here is a simple recipe for pancakes."},
    {"role": "user", "content": "And guacamole?"},
    {"role": "assistant", "content": "Mash the avocados with lime juice."},
    {"role": "user", "content": "Thanks! What is DNA?"},
    {"role": "assistant", "content": "In short, DNA is the molecule that carries genetic instructions."},
]
UNICODE_TEXT = "Crème brûlée, 日本の寿司 and 🍣 — naïve café\ttabs\nnewlines"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return tiny.ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_byte_identical(tiny_path, tmp_path):
    again = tiny.build_tiny_model(tmp_path / "again")
    names = sorted(p.name for p in tiny_path.iterdir())
    assert {"model.safetensors", "tokenizer.json", "config.json", tiny.COMPLETE_MARKER} <= set(names)
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert sha256(tiny_path / name) == sha256(again / name), name


def test_ensure_reuses_a_complete_build(tiny_path):
    before = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(tiny_path) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in tiny_path.parent.iterdir() if ".building-" in p.name]  # staging cleaned up


def test_ensure_fills_an_empty_dir_and_refuses_foreign_content(tmp_path):
    (tmp_path / "empty").mkdir()
    assert tiny.is_complete(tiny.ensure_tiny_model(tmp_path / "empty"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        tiny.ensure_tiny_model(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "not a model"  # never deleted
    # A build made by other code is rebuilt in its place, not reused.
    shutil.copytree(tmp_path / "empty", tmp_path / "stale")
    (tmp_path / "stale" / tiny.COMPLETE_MARKER).write_text('{"build": "made by other code"}')
    (tmp_path / "stale" / "tokenizer.json").write_text("{}")
    assert tiny.is_stale(tmp_path / "stale") and not tiny.is_complete(tmp_path / "stale")
    assert tiny.ensure_tiny_model(tmp_path / "stale") == (tmp_path / "stale").resolve()
    assert tiny.is_complete(tmp_path / "stale")
    assert sha256(tmp_path / "stale" / "tokenizer.json") == sha256(tmp_path / "empty" / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "stale"]  # nothing left behind


def test_changed_build_code_rebuilds_the_cached_model(tiny_path, tmp_path, monkeypatch):
    """The build is keyed by the source of the code that makes it (tiny.BUILD_CODE), not by a version someone
    has to bump: here the chat template's source changes, and the cached model is rebuilt with it."""
    cached = tmp_path / "tiny"
    shutil.copytree(tiny_path, cached)
    assert tiny.ensure_tiny_model(cached) == cached and tiny.is_complete(cached)
    changed = tmp_path / "code"
    changed.mkdir()
    for source in tiny.BUILD_CODE:
        shutil.copy(source, changed / source.name)
    chat_source = changed / "chat_format.py"
    chat_source.write_text(chat_source.read_text().replace("' [/INST]'", "' [/INST2]'"))
    assert "' [/INST2]'" in chat_source.read_text()
    monkeypatch.setattr(tiny, "BUILD_CODE", tuple(changed / source.name for source in tiny.BUILD_CODE))
    monkeypatch.setattr(tiny, "LLAMA2_CHAT_TEMPLATE", tiny.LLAMA2_CHAT_TEMPLATE.replace("' [/INST]'", "' [/INST2]'"))
    assert not tiny.is_complete(cached) and tiny.is_stale(cached)
    tiny.ensure_tiny_model(cached)
    assert tiny.is_complete(cached)
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(cached).chat_template
    assert "' [/INST2]'" in template  # the rebuilt tokenizer carries the changed template


def test_losing_a_race_uses_the_winners_build(tiny_path, tmp_path, monkeypatch):
    target = tmp_path / "tiny"
    real_build = tiny.build_tiny_model

    def build_while_another_process_wins(staging):
        shutil.copytree(tiny_path, target)  # the winner renames its build into place first
        (target / "winner").write_text("")
        return real_build(staging)

    monkeypatch.setattr(tiny, "build_tiny_model", build_while_another_process_wins)
    assert tiny.ensure_tiny_model(target) == target.resolve()
    assert (target / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # the loser's staging dir is gone


def test_special_tokens_and_vocab(tokenizer):
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert len(tokenizer) == tiny.VOCAB_SIZE
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids(["<0x00>", "<0x0A>", "<0xFF>"]) == [3, 13, 258]
    # Plain encode prepends <s> as Llama-2 does; already formatted text keeps exactly its own <s>.
    assert tokenizer("hello").input_ids[0] == 1
    ids = tokenizer("<s>[INST] hi [/INST]", add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 1


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n_turns", [1, 3])
def test_chat_template_matches_format_llama2(tokenizer, system, n_turns):
    messages = ([SYSTEM] if system else []) + TURNS[: 2 * n_turns]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == format_llama2(messages).text
    prompt = messages[:-1]  # ends with a user turn: the prompt a model is asked to answer
    expected = format_llama2(prompt, add_generation_prompt=True).text
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == expected
    assert expected.endswith("[/INST]")


def test_offsets_map_tokens_back_to_the_text(tokenizer):
    messages = [SYSTEM, *TURNS]
    formatted = format_llama2(messages)
    encoding = tokenizer(formatted.text, add_special_tokens=False, return_offsets_mapping=True)
    previous_end = 0
    for token, (start, end) in zip(
        tokenizer.convert_ids_to_tokens(encoding.input_ids), encoding.offset_mapping, strict=True
    ):
        assert previous_end <= start < end <= len(formatted.text)
        if not token.startswith("<0x"):  # byte pieces of one character share that character's offsets
            assert formatted.text[start:end] == token.replace("▁", " ")
        previous_end = start
    # What herd's loss masking relies on: every answer span starts and ends on token boundaries.
    starts = {start for start, _ in encoding.offset_mapping}
    ends = {end for _, end in encoding.offset_mapping}
    for span_start, span_end in formatted.answer_spans:
        assert span_start in starts and span_end in ends


def test_sample_data_round_trips_without_unk(tokenizer):
    texts = [row["text"] for row in generate_guanaco_rows()] + [row["text"] for row in generate_llama2_rows()]
    texts.append(UNICODE_TEXT)  # characters the tokenizer never saw: byte fallback, not <unk>
    encodings = tokenizer(texts, add_special_tokens=False).input_ids
    for text, ids in zip(texts, encodings, strict=True):
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(UNICODE_TEXT).input_ids, skip_special_tokens=True) == UNICODE_TEXT
    # The learned merges compress the in-domain text well (few bytes per character would mean no merges).
    assert sum(map(len, encodings[:400])) < 0.4 * sum(map(len, texts[:400]))


def test_model_loads_and_learns_the_sample_in_20_steps(tiny_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (
        2,
        176,
        len(tokenizer),
    )
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.rope_parameters["rope_theta"] == 10000.0 and not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)

    texts = [row["text"] for row in generate_llama2_rows(200)]
    train, held_out = texts[:160], texts[160:176]

    def batch(rows):
        encoded = tokenizer(rows, add_special_tokens=False, padding=True, truncation=True, max_length=128)
        encoded = {key: torch.tensor(value) for key, value in encoded.items()}
        encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return encoded

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch(held_out)).loss.item()

    before = held_out_loss()
    assert before == pytest.approx(torch.log(torch.tensor(float(len(tokenizer)))).item(), abs=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(20):
        model(**batch(train[8 * step : 8 * step + 8])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert held_out_loss() < before - 1.0
