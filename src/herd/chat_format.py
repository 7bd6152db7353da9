"""The Llama-2 chat format, and converters into it from the row formats users start from.

One format, written once and used by training, generation, chat and the tokenizer's chat template:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user2} [/INST] {answer2} </s>

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``: an optional
system message first, then user and assistant strictly alternating, starting with the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BOS, EOS = "<s>", "</s>"
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Jinja twin of `format_llama2`, stored in every tokenizer herd saves, so that plain
# `tokenizer.apply_chat_template(messages, tokenize=False)` reproduces the training text exactly.
# With add_generation_prompt and a trailing user turn it ends at "[/INST]", the prompt a model answers.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<s>[INST] ' }}"
    "{% if loop.first and system is not none %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}"
    "{{ ' ' + message['content'] + ' </s>' }}"
    "{% endif %}"
    "{% endfor %}"
)


ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation that cannot be formatted; `kind` is the bad-row category it is counted under."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def validate_messages(messages: list[dict]) -> None:
    """Raise ConversationError unless `messages` is [system?] user, assistant, user, assistant, ..."""
    if not messages:
        raise ConversationError("empty", "conversation has no messages")
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConversationError("unknown_role", f"message {index} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError("not_text", f"message {index} ({role}) content is "
                                    f"{type(content).__name__}, not a string")
        if not content.strip():
            raise ConversationError("empty", f"message {index} ({role}) is empty")
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ConversationError(
                "roles_out_of_order", f"message {index} has role {message['role']!r}, expected {expected!r}"
            )
    if not any(m["role"] == "assistant" for m in turns):
        raise ConversationError("no_assistant", "conversation has no assistant turn")


@dataclass(frozen=True)
class Formatted:
    """A formatted conversation and the character spans that the loss is computed on."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]  # [start, end) of " {answer} </s>" for every assistant turn


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` opened by `system_prompt`, unless it is empty or the conversation has its own."""
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def format_llama2(messages: list[dict], add_generation_prompt: bool = False) -> Formatted:
    """Format a validated conversation; a trailing user turn yields a prompt ending in "[/INST]"."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for index, message in enumerate(turns):
        if message["role"] == "user":
            header = B_SYS + system + E_SYS if index == 0 and system is not None else ""
            piece = f"{BOS}{B_INST} {header}{message['content']} {E_INST}"
        else:
            piece = f" {message['content']} {EOS}"
            spans.append((length, length + len(piece)))
        parts.append(piece)
        length += len(piece)
    return Formatted("".join(parts), tuple(spans))


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to and including its last user turn: what a model is asked to continue."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def guanaco_to_messages(text: str) -> list[dict]:
    """`### Human: ... ### Assistant: ...` (any number of turns) to messages; raises ConversationError."""
    if not isinstance(text, str) or not text.strip():
        raise ConversationError("empty", "text is empty")
    pieces = _GUANACO_TURN.split(text)
    if pieces[0].strip():
        raise ConversationError("malformed", "text before the first '### Human:' marker")
    messages = []
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if marker.lower() == "human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    if not messages:
        raise ConversationError("malformed", "no '### Human:' / '### Assistant:' markers")
    validate_messages(messages)
    return messages


_LLAMA2_TURN = re.compile(
    r"<s>\s*\[INST\]\s*(?:<<SYS>>\n(?P<system>.*?)\n<</SYS>>\n\n)?(?P<user>.*?)\s*\[/INST\]"
    r"(?P<answer>.*?)(?:</s>|(?=<s>)|$)",
    re.DOTALL,
)


def llama2_to_messages(text: str) -> list[dict]:
    """Llama-2 formatted text (e.g. the guanaco-llama2-1k subset) back to messages."""
    if not isinstance(text, str) or not text.strip():
        raise ConversationError("empty", "text is empty")
    stripped = text.strip()
    # The 1k subset often omits the leading <s>; tolerate it.
    if not stripped.startswith(BOS):
        stripped = BOS + stripped
    messages: list[dict] = []
    position = 0
    for match in _LLAMA2_TURN.finditer(stripped):
        if stripped[position : match.start()].strip():
            raise ConversationError("malformed", "text outside [INST] ... [/INST] turns")
        position = match.end()
        if match.group("system") is not None:
            if messages:
                raise ConversationError("roles_out_of_order", "system prompt after the first turn")
            messages.append({"role": "system", "content": match.group("system").strip()})
        messages.append({"role": "user", "content": match.group("user").strip()})
        answer = match.group("answer").strip()
        if answer:
            messages.append({"role": "assistant", "content": answer})
    if not messages or stripped[position:].strip():
        raise ConversationError("malformed", "not in the Llama-2 [INST] format")
    validate_messages(messages)
    return messages


def messages_to_guanaco(messages: list[dict]) -> str:
    """The inverse of guanaco_to_messages (system messages have no guanaco form and are dropped)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return " ".join(f"### {names[m['role']]}: {m['content']}" for m in messages if m["role"] in names)


def alpaca_to_messages(instruction: object, input: object, output: object) -> list[dict]:
    """An Alpaca row as one exchange: the user turn is the instruction, then its input (when there is one)
    after a blank line; the answer is the output. Raises ConversationError."""
    if input is None or (isinstance(input, str) and not input.strip()):
        user = instruction
    elif not isinstance(input, str):
        raise ConversationError("not_text", f"input is {type(input).__name__}, not a string")
    elif isinstance(instruction, str) and instruction.strip():
        user = f"{instruction.strip()}\n\n{input.strip()}"
    else:
        user = instruction  # counted below as empty or not text
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    validate_messages(messages)
    return messages


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def sharegpt_to_messages(turns: object) -> list[dict]:
    """ShareGPT turns `[{"from": "human"|"gpt"|"system", "value": ...}, ...]` to messages; raises
    ConversationError."""
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise ConversationError("malformed", "not a list of {'from': ..., 'value': ...} turns")
    messages = []
    for index, turn in enumerate(turns):
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ConversationError("unknown_role", f"turn {index} is from {speaker!r}; allowed: "
                                    f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    validate_messages(messages)
    return messages


def messages_to_sharegpt(messages: list[dict]) -> list[dict]:
    """The inverse of sharegpt_to_messages."""
    speakers = {role: speaker for speaker, role in SHAREGPT_ROLES.items()}
    return [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]
