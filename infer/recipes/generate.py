"""Batch generation: prompts -> length-planned batches dealt to ranks -> part files -> one JSONL in order.

Resumable: each rank appends the records of every finished batch to its own part file (fsynced); a re-run
with the same settings skips the ids already there. Rank 0 writes the final file atomically once all ranks
are done, so a killed run never leaves a partial final file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from herd import jsonl_parts
from herd.chat_format import format_llama2, prompt_messages
from herd.config.infer import InferJob, Split
from herd.data import split_conversations
from herd.dist import all_gather_objects, all_reduce_sum
from herd.errors import ConfigError, DataError
from herd.inference import (
    Source,
    fingerprint,
    generate,
    load_for_inference,
    load_inference_tokenizer,
    output_path,
    plan_batches,
    rank_batches,
    read_prompts,
    resolve_source,
    start_processes,
)
from herd.paths import user_file


def collect_prompts(job: InferJob, source: Source, tokenizer) -> tuple[str, list, list[list[dict]], list]:
    """(name, ids, prompt conversations, reference answers) from generate.prompts or a data split."""
    g = job.generate
    if g.prompts:
        path = user_file(g.prompts, "generate.prompts", text=True)
        pairs = read_prompts(path, g.system_prompt)
        return path.stem, [i for i, _ in pairs], [m for _, m in pairs], [None] * len(pairs)
    if source.data_cfg is None:
        raise ConfigError("no prompts: set run_dir=<training run>, data=<option> or generate.prompts=<jsonl>")
    train, evaluation, _ = split_conversations(source.data_cfg, tokenizer)
    conversations = {Split.eval: evaluation, Split.train: train, Split.all: evaluation + train}[g.split]
    if not conversations:
        raise DataError(f"the {g.split.value} split of {source.data_cfg.name} is empty")
    prompts, references = [], []
    for conversation in conversations:
        prompt = prompt_messages(conversation)
        if g.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": g.system_prompt}, *prompt]
        prompts.append(prompt)
        following = conversation[len(prompt_messages(conversation)) :]
        references.append(following[0]["content"] if following else None)
    name = g.split.value if job.data is None else f"{source.data_cfg.name}-{g.split.value}"
    return name, list(range(len(prompts))), prompts, references


def generate_missing(model, tokenizer, g, state, device, writer, done: set, rows: tuple[list, list, list],
                     lengths: list[int]) -> tuple[int, int]:
    """Generate this rank's batches that hold a record not yet done, appending each batch's records to the
    rank's part file. Returns (completion tokens, records) written now."""
    ids, prompts, references = rows
    new_tokens, written, batches_run = 0, 0, 0
    # Test hook, like train's HERD_DEBUG_*: rank 0 dies abruptly after this many batches.
    crash_after = int(os.environ.get("HERD_DEBUG_EXIT_AFTER_BATCHES", "0")) or float("inf")
    for number, batch in rank_batches(plan_batches(lengths, g.batch_size), state.process_index,
                                      state.num_processes):
        todo = [i for i in batch if jsonl_parts.record_key(ids[i]) not in done]
        if not todo:
            continue
        # The whole batch is regenerated even when part of it is done: same padding, same outputs.
        batch_started = time.perf_counter()
        completions = generate(model, tokenizer, [prompts[i] for i in batch], g, g.seed + number, device)
        seconds = time.perf_counter() - batch_started
        records = [
            {"id": ids[i], "prompt": prompts[i], "response": c.text, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": c.completion_tokens, "seconds": round(seconds, 4),
             "reference": references[i]}
            for i, c in zip(batch, completions) if i in todo
        ]
        writer.write(records)
        new_tokens += sum(r["completion_tokens"] for r in records)
        written += len(records)
        batches_run += 1
        if state.is_main_process and batches_run >= crash_after:
            os._exit(17)  # simulated crash: no cleanup, no barrier, nothing flushed beyond the part file
    return new_tokens, written


def check_context(source: Source, tokenizer, ids: list, lengths: list[int], max_new_tokens: int) -> None:
    """Every prompt and its answer fit the model's context window, or the run is refused before it loads."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.location, revision=source.model_cfg.revision,
                                        trust_remote_code=source.model_cfg.trust_remote_code)
    context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    too_long = [(i, n) for i, n in zip(ids, lengths) if n + max_new_tokens > context]
    if too_long:
        first_id, first_length = too_long[0]
        raise DataError(f"{len(too_long)} prompt(s) do not fit the model's context of {context} tokens with "
                        f"generate.max_new_tokens={max_new_tokens} (first: id {first_id!r}, {first_length} prompt "
                        "tokens); shorten them or lower generate.max_new_tokens")


def run(cfg: DictConfig) -> Path:
    job: InferJob = OmegaConf.to_object(cfg)
    g = job.generate
    state, device = start_processes(job.device)
    source = resolve_source(job)
    tokenizer = load_inference_tokenizer(source)

    name, ids, conversations, references = collect_prompts(job, source, tokenizer)
    prompts = [format_llama2(messages, add_generation_prompt=True).text for messages in conversations]
    lengths = [len(ids_) for ids_ in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    check_context(source, tokenizer, ids, lengths, g.max_new_tokens)
    final = output_path(g.output, "generate.output", f"generations/{name}.jsonl", source)
    settings = {
        **source.describe(), "precision": job.precision.value, "merged": job.merge_adapter,
        "batch_size": g.batch_size, "max_new_tokens": g.max_new_tokens, "temperature": g.temperature,
        "top_p": g.top_p, "seed": g.seed, "prompts": fingerprint(list(zip(map(str, ids), prompts))),
    }
    key = fingerprint(settings)

    complete = jsonl_parts.begin(final, key, g.overwrite) if state.is_main_process else None
    if all_gather_objects(complete)[0]:
        if state.is_main_process:
            print(f"generate: {final} is already complete for these settings", flush=True)
        return final
    writer = jsonl_parts.PartWriter(final, state.process_index)
    state.wait_for_everyone()  # every torn tail is cut before anyone reads the parts
    done = jsonl_parts.read_done(final)

    model, tokenizer = load_for_inference(source, job, device, tokenizer)
    started = time.perf_counter()
    new_tokens, written = generate_missing(model, tokenizer, g, state, device, writer, done,
                                           (ids, prompts, references), lengths)
    writer.close()
    elapsed = time.perf_counter() - started
    new_tokens, written = all_reduce_sum([new_tokens, written], device)
    elapsed_max = max(all_gather_objects(elapsed))  # the slowest rank is the run's wall time
    state.wait_for_everyone()
    if state.is_main_process:
        rate = new_tokens / elapsed_max if elapsed_max > 0 else 0.0
        count = jsonl_parts.finalize(final, ids, {
            "fingerprint": key, "settings": settings, "records": len(ids), "generated_this_run": int(written),
            "completion_tokens_this_run": int(new_tokens), "seconds": elapsed_max, "tokens_per_s": rate,
            "world_size": state.num_processes,
        })
        print(f"generate: {count} records ({int(written)} generated now, {len(ids) - int(written)} resumed) "
              f"-> {final}; {int(new_tokens)} new tokens in {elapsed_max:.1f} s = {rate:.1f} tok/s "
              f"over {state.num_processes} process(es)", flush=True)
    return final
