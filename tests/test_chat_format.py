"""The Llama-2 chat format, its Jinja twin, and the converters from guanaco and Llama-2 text."""

import pytest

from herd.chat_format import (
    LLAMA2_CHAT_TEMPLATE,
    ConversationError,
    format_llama2,
    guanaco_to_messages,
    llama2_to_messages,
    messages_to_guanaco,
)

SYS = {"role": "system", "content": "You are terse."}
ONE = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
THREE = ONE + [
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"},
]

GOLDEN = {
    "one_turn": (ONE, "<s>[INST] Hi? [/INST] Hello. </s>"),
    "one_turn_system": ([SYS, *ONE], "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi? [/INST] Hello. </s>"),
    "three_turns": (
        THREE,
        "<s>[INST] Hi? [/INST] Hello. </s><s>[INST] 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] 6 </s>",
    ),
    "three_turns_system": (
        [SYS, *THREE],
        ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi? [/INST] Hello. </s>"
        "<s>[INST] 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] 6 </s>"),
    ),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_strings(name):
    messages, expected = GOLDEN[name]
    assert format_llama2(messages).text == expected


@pytest.mark.parametrize("name", GOLDEN)
def test_jinja_template_reproduces_the_format(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = raise_exception
    messages, expected = GOLDEN[name]
    assert env.from_string(LLAMA2_CHAT_TEMPLATE).render(messages=messages) == expected


@pytest.mark.parametrize("name", GOLDEN)
def test_tokenizer_chat_template_reproduces_the_format(name, tiny_tokenizer):
    messages, expected = GOLDEN[name]
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_generation_prompt_ends_at_inst():
    prompt = format_llama2([SYS, {"role": "user", "content": "Hi?"}]).text
    assert prompt == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi? [/INST]"


def test_answer_spans_cover_answer_and_eos():
    formatted = format_llama2(THREE)
    assert [formatted.text[a:b] for a, b in formatted.answer_spans] == [" Hello. </s>", " 4 </s>", " 6 </s>"]


@pytest.mark.parametrize("name", GOLDEN)
def test_llama2_text_round_trips(name):
    messages, text = GOLDEN[name]
    assert llama2_to_messages(text) == messages


def test_llama2_text_without_leading_bos_and_eos():
    # The guanaco-llama2-1k rows look like this: no trailing </s> on the last answer.
    assert llama2_to_messages("<s>[INST] Hi? [/INST] Hello.") == ONE


def test_guanaco_multi_turn():
    text = "### Human: Hi? ### Assistant: Hello.### Human: 2+2? ### Assistant: 4"
    assert guanaco_to_messages(text) == ONE + [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    ]
    assert guanaco_to_messages(messages_to_guanaco(THREE)) == THREE


@pytest.mark.parametrize(
    "text, kind",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("### Human: only a question", "no_assistant"),
        ("### Assistant: answer first ### Human: then a question", "roles_out_of_order"),
        ("### Human: a ### Human: b ### Assistant: c", "roles_out_of_order"),
        ("### Human: a ### Assistant:   ", "empty"),
        ("preamble ### Human: a ### Assistant: b", "malformed"),
        ("no markers at all", "malformed"),
    ],
)
def test_malformed_guanaco_rows(text, kind):
    with pytest.raises(ConversationError) as error:
        guanaco_to_messages(text)
    assert error.value.kind == kind


@pytest.mark.parametrize(
    "text, kind",
    [("<s>[INST] question only [/INST]", "no_assistant"), ("plain text", "malformed"), ("", "empty")],
)
def test_malformed_llama2_rows(text, kind):
    with pytest.raises(ConversationError) as error:
        llama2_to_messages(text)
    assert error.value.kind == kind
