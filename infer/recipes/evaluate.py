"""Eval loss and perplexity, exact: every sample scored once, token losses summed per rank, all-reduced.

No sampler padding (which would score the last samples twice) and no per-batch averaging (which would
weight short batches like long ones): loss = sum of token losses / number of labelled tokens, over all.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from herd import rundir
from herd.config.infer import InferJob, Split
from herd.data import load_splits
from herd.dist import all_gather_objects, all_reduce_sum
from herd.errors import ConfigError, DataError
from herd.inference import (
    load_for_inference,
    load_inference_tokenizer,
    output_path,
    plan_batches,
    rank_batches,
    resolve_source,
    start_processes,
    token_loss_sum,
)


def run(cfg: DictConfig) -> dict:
    job: InferJob = OmegaConf.to_object(cfg)
    state, device = start_processes(job.device)
    source = resolve_source(job)
    if source.data_cfg is None:
        raise ConfigError("no data to evaluate on: set run_dir=<training run> or data=<option>")
    output = output_path(job.evaluate.output, "evaluate.output", "eval/metrics.json", source)

    tokenizer = load_inference_tokenizer(source)
    with state.main_process_first():  # rank 0 tokenizes and caches; the others read its cache
        train, evaluation, report = load_splits(source.data_cfg, tokenizer)
    split = job.evaluate.split
    if split == Split.eval and evaluation is None:
        raise DataError(f"{source.data_cfg.name} has no eval split (data.eval_size=0); "
                        "use evaluate.split=train or evaluate.split=all")
    parts = {Split.eval: [evaluation], Split.train: [train], Split.all: [evaluation, train]}[split]
    samples = [sample for part in parts if part is not None for sample in part.to_list()]

    model, tokenizer = load_for_inference(source, job, device, tokenizer)
    started = time.perf_counter()
    loss_sum, tokens, scored = 0.0, 0, 0
    batches = plan_batches([len(s["input_ids"]) for s in samples], job.evaluate.batch_size)
    for _, batch in rank_batches(batches, state.process_index, state.num_processes):
        batch_loss, batch_tokens = token_loss_sum(model, [samples[i] for i in batch], tokenizer.pad_token_id,
                                                  device)
        loss_sum += batch_loss  # a Python float: float64 accumulation
        tokens += batch_tokens
        scored += len(batch)
    seconds = time.perf_counter() - started
    per_rank = all_gather_objects(scored)
    loss_sum, tokens, seconds = all_reduce_sum([loss_sum, tokens, seconds], device)
    if tokens == 0:
        raise DataError(f"no labelled tokens in the {split.value} split of {source.data_cfg.name}")

    loss = loss_sum / tokens
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "tokens": int(tokens),
        "samples": sum(per_rank),
        "samples_per_rank": per_rank,
        "world_size": state.num_processes,
        "split": split.value,
        "data": source.data_cfg.name,
        "data_report": report.summary(),
        "precision": job.precision.value,
        "merged": job.merge_adapter,
        "tokens_per_s": tokens / max(seconds / state.num_processes, 1e-9),
        **source.describe(),
    }
    if state.is_main_process:
        rundir.write_json(Path(output), metrics)
        print(f"evaluate ({split.value} split): loss {loss:.6f}  ppl {metrics['perplexity']:.3f}  "
              f"({metrics['samples']} samples, {int(tokens)} tokens, {state.num_processes} process(es)) "
              f"-> {output}", flush=True)
    return metrics
