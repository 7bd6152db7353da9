"""Interactive multi-turn chat in the Llama-2 format, answers streamed as they are generated.

Typed lines are user turns; `/reset` forgets the conversation, `/exit` (or end of input) quits. With stdin
piped, each line is one user turn. The whole conversation is re-formatted every turn with
herd.chat.format_llama2 (what training used); `chat.echo_prompt=true` prints that exact string to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf
from transformers import TextStreamer

from herd.chat_format import format_llama2
from herd.config.infer import InferJob
from herd.errors import ConfigError, InputError
from herd.inference import generate, load_for_inference, resolve_source, start_processes


def chat_prompt(system_prompt: str | None, history: list[dict], user: str) -> str:
    """The exact text the model is asked to continue: system, earlier turns, the new user turn."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = [*system, *history, {"role": "user", "content": user}]
    return format_llama2(messages, add_generation_prompt=True).text


def user_lines(interactive: bool) -> Iterator[str]:
    if not interactive:
        for number, raw in enumerate(sys.stdin.buffer, 1):
            try:
                yield raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError as error:
                raise InputError(f"chat: standard input line {number} is not UTF-8 text ({error.reason}); "
                                 "pipe text lines, one message each") from None
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print()
            return


def run(cfg: DictConfig) -> list[dict]:
    job: InferJob = OmegaConf.to_object(cfg)
    c = job.chat
    state, device = start_processes(job.device)
    if state.num_processes > 1:
        raise ConfigError("chat runs in one process: python -m infer.chat ... (not under accelerate launch)")
    source = resolve_source(job)
    model, tokenizer = load_for_inference(source, job, device)
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    interactive = sys.stdin.isatty()
    if interactive:
        adapter = f" + {source.adapter}" if source.adapter else ""
        print(f"chat with {source.location}{adapter}; /reset forgets, /exit quits", flush=True)

    history: list[dict] = []
    for turn, line in enumerate(user_lines(interactive)):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", flush=True)
            continue
        prompt = chat_prompt(c.system_prompt, history, text)
        # Forget the oldest exchanges while the prompt and the answer would not fit the context window.
        while len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + c.max_new_tokens > context:
            if not history:
                print(f"(message too long for the {context}-token context; not sent)", file=sys.stderr)
                break
            history = history[2:]
            prompt = chat_prompt(c.system_prompt, history, text)
        else:
            if c.echo_prompt:
                print(f"prompt: {json.dumps(prompt, ensure_ascii=False)}", file=sys.stderr, flush=True)
            if interactive:
                print("assistant> ", end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = generate(model, tokenizer, [prompt], c, c.seed + turn, device, streamer=streamer)[0].text
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return history
