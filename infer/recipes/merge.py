"""Merge the LoRA adapter into the unquantized base and save a model plain transformers loads.

load base unquantized (bf16 / fp32) + adapter -> reference logits (unmerged) -> merge_and_unload -> save to a
temporary sibling directory -> reload it with plain AutoModelForCausalLM -> compare logits -> rename into
place only if the max difference is within tolerance. A failed check leaves no output directory behind.

Note: a QLoRA adapter was trained against the 4-bit base; the merged model uses the original weights, so
it differs from what training saw by the 4-bit quantization error (as every QLoRA merge does).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from herd.chat_format import format_llama2
from herd.config.infer import InferJob
from herd.config.train import Quant
from herd.errors import ConfigError, HerdError
from herd.inference import load_for_inference, output_path, resolve_source, start_processes
from herd.modeling import resolve_precision
from herd.paths import share_per_umask

# Fixed prompts for the numeric check: different lengths, a system prompt and a second turn.
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a volcano?"}],
    [{"role": "user", "content": "Give me a recipe for pancakes."}, {"role": "assistant", "content": "Sure."},
     {"role": "user", "content": "Now make it vegan, and explain each step in detail please."}],
    [{"role": "user", "content": "Write a short poem about the sea in autumn."}],
]
MERGE_RECORD = "herd_merge.json"  # what was merged and how well it checked; marks herd's own output
DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}  # max |logit difference|


@torch.no_grad()
def prompt_logits(model, tokenizer, device: str) -> list[torch.Tensor]:
    """Logits (float32, CPU) of each check prompt, one unpadded forward per prompt."""
    logits = []
    for conversation in CHECK_CONVERSATIONS:
        text = format_llama2(conversation, add_generation_prompt=True).text
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        logits.append(model(input_ids=ids).logits[0].float().cpu())
    return logits


def run(cfg: DictConfig) -> Path:
    job: InferJob = OmegaConf.to_object(cfg)
    state, device = start_processes(job.device)
    if state.num_processes > 1:
        raise ConfigError("merge runs in one process: python -m infer.merge ..., not under accelerate launch")
    if job.quant not in (None, Quant.none):
        raise ConfigError(f"merge loads the base unquantized (precision=bf16|fp32); "
                          f"drop quant={job.quant.value}")
    source = resolve_source(job)
    if source.adapter is None:
        raise ConfigError("nothing to merge: set run_dir=<training run> or adapter=<dir> (and not base_only)")
    source = replace(source, peft_cfg=replace(source.peft_cfg, quant=Quant.none))
    job = replace(job, merge_adapter=False)
    output = output_path(job.merge.output, "merge.output", "merged", source)
    if output.exists() and not job.merge.overwrite:
        raise ConfigError(f"{output} exists; set merge.overwrite=true or another merge.output")
    if output.exists() and not (output / MERGE_RECORD).is_file():
        raise ConfigError(f"merge.overwrite: {output} is not a model herd merged (no {MERGE_RECORD}) and is left "
                          "as it is; give another merge.output")
    dtype = resolve_precision(job.precision, device)
    tolerance = job.merge.tolerance if job.merge.tolerance is not None else DEFAULT_TOLERANCE[dtype]

    model, tokenizer = load_for_inference(source, job, device)
    reference = prompt_logits(model, tokenizer, device)  # base + adapter, unmerged, same dtype
    merged = model.merge_and_unload()
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model, merged
        gc.collect()
        # Check what was written, as a user will load it: plain transformers, no PEFT, no herd.
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype, device_map={"": device})
        merged_logits = prompt_logits(reloaded, tokenizer, device)
        difference = max(float((a - b).abs().max()) for a, b in zip(merged_logits, reference))
        print(f"merge check: max |logit difference| merged vs base+adapter = {difference:.3g} "
              f"(tolerance {tolerance:g}, {str(dtype).removeprefix('torch.')}, "
              f"{len(CHECK_CONVERSATIONS)} prompts)", flush=True)
        if not difference <= tolerance:  # NaN fails too
            raise HerdError(f"merge check failed: max |logit difference| {difference:.3g} > merge.tolerance "
                            f"{tolerance:g}; nothing written to {output}")
        (staging / MERGE_RECORD).write_text(json.dumps({
            **source.describe(), "dtype": str(dtype), "max_logit_difference": difference,
            "tolerance": tolerance,
        }, indent=2) + "\n")
        share_per_umask(staging)  # a merged model is for sharing
        if output.exists():  # merge.overwrite: swap, then drop the old one
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged model: {output}", flush=True)
    return output
