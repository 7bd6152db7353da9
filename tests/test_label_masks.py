"""Golden label masks, token by token, for every data format: which tokens are training targets.

Each sample goes through the whole data pipeline (read, convert the format, add the system prompt, tokenize,
mask, drop too-long rows) and is written as runs of consecutive tokens that are all targets or all not:
(text of the run, number of tokens, is target). The runs are compared whole against the golden ones, so one
token more or less on either side of an answer (e.g. the next turn's `<s>` becoming a target) fails, as
does a target that is not the input token itself. Decoding with skip_special_tokens would hide exactly
those edges; here every special token is shown.
"""

import json
import re

import pytest

from herd.config.train import DataConfig, DataFormat
from herd.data import build_splits
from herd.errors import DataError

SYSTEM = "Be brief."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]

FIRST_TURN = ("<s>[INST] Hi there [/INST]", 7, False)
FIRST_TURN_SYSTEM = ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]", 23, False)
HELLO = (" Hello friend </s>", 10, True)
BYE = ("<s>[INST] Bye [/INST]", 6, False)
GOODBYE = (" Goodbye </s>", 7, True)

# name: (format, row value, extra data settings, golden runs with assistant-only loss)
CASES = {
    "guanaco": (DataFormat.guanaco, "### Human: Hi there ### Assistant: Hello friend", {}, [FIRST_TURN, HELLO]),
    "guanaco multi-turn + system_prompt": (
        DataFormat.guanaco, "### Human: Hi there ### Assistant: Hello friend ### Human: Bye ### Assistant: Goodbye",
        {"system_prompt": SYSTEM}, [FIRST_TURN_SYSTEM, HELLO, BYE, GOODBYE]),
    "llama2": (DataFormat.llama2, "<s>[INST] Hi there [/INST] Hello friend </s>", {}, [FIRST_TURN, HELLO]),
    # the guanaco-llama2-1k shape: inline system prompt, no </s> after the last answer
    "llama2 multi-turn + inline system": (
        DataFormat.llama2,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello friend </s><s>[INST] Bye [/INST] Goodbye",
        {}, [FIRST_TURN_SYSTEM, HELLO, BYE, GOODBYE]),
    "messages": (DataFormat.messages, MESSAGES[1:3], {}, [FIRST_TURN, HELLO]),
    # the conversation's own system message wins over data.system_prompt
    "messages three turns + own system": (
        DataFormat.messages, MESSAGES, {"system_prompt": "Ignored."},
        [FIRST_TURN_SYSTEM, HELLO, ("<s>[INST] 2+2? [/INST]", 7, False), (" 4 </s>", 3, True), BYE, GOODBYE]),
    "messages + system_prompt": (DataFormat.messages, MESSAGES[1:3], {"system_prompt": SYSTEM},
                                 [FIRST_TURN_SYSTEM, HELLO]),
}

_BYTE = re.compile(r"<0x([0-9A-F]{2})>")


def target_runs(tokenizer, sample: dict) -> list[tuple[str, int, bool]]:
    """The sample as runs of tokens that are all targets or all not: (text, token count, is target)."""
    assert len(sample["labels"]) == len(sample["input_ids"])
    runs: list[tuple[str, int, bool]] = []
    for piece, token, label in zip(tokenizer.convert_ids_to_tokens(sample["input_ids"]), sample["input_ids"],
                                   sample["labels"]):
        assert label in (token, -100), f"label {label} at token {token} ({piece!r}) is neither it nor -100"
        target = label != -100
        text = _BYTE.sub(lambda m: chr(int(m.group(1), 16)), piece).replace("▁", " ")
        if runs and runs[-1][2] == target:
            runs[-1] = (runs[-1][0] + text, runs[-1][1] + 1, target)
        else:
            runs.append((text, 1, target))
    return runs


def samples(tmp_path, tokenizer, fmt, rows, **settings):
    field = "messages" if fmt == DataFormat.messages else "text"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({field: row}) + "\n" for row in rows))
    config = DataConfig(name="t", path=str(path), format=fmt, field=field, eval_size=0,
                        max_seq_len=settings.pop("max_seq_len", 512), cache_dir=str(tmp_path / "cache"), **settings)
    train, evaluation, report = build_splits(config, tokenizer)
    assert evaluation is None
    return list(train), report


@pytest.mark.parametrize("name", CASES)
def test_assistant_only_labels_are_exactly_the_answers_and_their_eos(name, tmp_path, tiny_tokenizer):
    fmt, value, settings, golden = CASES[name]
    [sample, _] = samples(tmp_path, tiny_tokenizer, fmt, [value, value], **settings)[0]
    assert target_runs(tiny_tokenizer, sample) == golden
    # the ids are the tokenizer's own for the formatted text: the runs describe what training sees
    text = "".join(text for text, _, _ in golden)
    assert sample["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", CASES)
def test_full_sequence_labels_are_every_token(name, tmp_path, tiny_tokenizer):
    fmt, value, settings, golden = CASES[name]
    [sample, _] = samples(tmp_path, tiny_tokenizer, fmt, [value, value], assistant_only_loss=False,
                          **settings)[0]
    text = "".join(text for text, _, _ in golden)
    assert target_runs(tiny_tokenizer, sample) == [(text, sum(count for _, count, _ in golden), True)]


def test_an_answer_ending_at_the_sequence_limit_is_kept_whole_and_one_token_over_is_dropped(tmp_path,
                                                                                               tiny_tokenizer):
    """max_seq_len is a limit on whole conversations: a conversation of exactly max_seq_len tokens keeps its
    last answer and </s> as targets up to the last position; one token longer is a bad row, never a sample
    whose answer is cut (a cut answer would train the model to stop without </s>)."""
    long_row = "### Human: Hi there ### Assistant: Hello friend ### Human: Bye ### Assistant: Goodbye"
    short_row = "### Human: Hi there ### Assistant: Hello friend"
    limit = 7 + 10 + 6 + 7
    kept, report = samples(tmp_path, tiny_tokenizer, DataFormat.guanaco, [long_row, short_row, short_row],
                           max_seq_len=limit)
    assert report.bad == {}
    [at_limit] = [s for s in kept if len(s["input_ids"]) == limit]
    assert target_runs(tiny_tokenizer, at_limit) == [FIRST_TURN, HELLO, BYE, GOODBYE]
    assert at_limit["labels"][-1] == tiny_tokenizer.eos_token_id

    kept, report = samples(tmp_path, tiny_tokenizer, DataFormat.guanaco, [long_row, short_row, short_row],
                           max_seq_len=limit - 1)
    assert report.bad == {"too_long": 1}
    assert [target_runs(tiny_tokenizer, s) for s in kept] == [[FIRST_TURN, HELLO]] * 2
    with pytest.raises(DataError, match="only 0 usable samples"):
        samples(tmp_path, tiny_tokenizer, DataFormat.guanaco, [long_row, long_row], max_seq_len=limit - 1)
