"""Merge the LoRA adapter into the unquantized base and save a model plain transformers loads.

First the memory plan (herd.memory.merge): what each way needs against what the device, the host and the
output's disk have; it picks the way (merge.low_memory=null) or refuses in one line with the cheapest change
that fits. Both ways write safetensors in shards of at most merge.max_shard_size with
model.safetensors.index.json when there are several, into a temporary sibling directory that is renamed into
place only once checked; a failed merge leaves no output directory behind.

in memory: load base unquantized (bf16 / fp32) + adapter -> reference logits (unmerged) -> merge_and_unload ->
    save -> reload with plain AutoModelForCausalLM -> compare logits within merge.tolerance.
by tensor (herd.tensor_merge): one weight at a time, for bases larger than the device or RAM; the check reads
    the written files (every weight, shape, dtype, the index; merged weights finite), not logits.

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
from herd.inference import (
    Source,
    load_for_inference,
    load_inference_tokenizer,
    output_path,
    resolve_source,
    start_processes,
)
from herd.memory import GB, load_model_shape
from herd.memory.merge import BY_TENSOR, IN_MEMORY, check_disk, choose_way, merge_plan, parse_size
from herd.modeling import resolve_precision
from herd.paths import share_per_umask
from herd.tensor_merge import ADAPTER_FILE, merge_by_tensor

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
    shard_bytes = parse_size(job.merge.max_shard_size)
    way = plan_merge(job, source, device, dtype, shard_bytes, output)

    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if way == IN_MEMORY:
            facts = merge_in_memory(source, job, device, dtype, shard_bytes, tolerance, staging, output)
        else:
            facts = merge_by_tensor(source.location, source.adapter, staging, dtype, device, shard_bytes)
            print(f"merge check (by tensor): {facts['lora_layers_merged']} LoRA layers merged, {facts['tensors']} "
                  f"tensors in {facts['shards']} file(s); {facts['check']}; logits not compared (the model is "
                  "never loaded whole)", flush=True)
            load_inference_tokenizer(source).save_pretrained(staging)
        (staging / MERGE_RECORD).write_text(json.dumps({
            **source.describe(), "dtype": str(dtype), "way": way, "max_shard_size": job.merge.max_shard_size,
            "max_logit_difference": None, "tolerance": tolerance if way == IN_MEMORY else None, **facts,
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


def merge_in_memory(source: Source, job: InferJob, device: str, dtype: torch.dtype, shard_bytes: int,
                    tolerance: float, staging: Path, output: Path) -> dict:
    """The whole base on the device: merge_and_unload, save in shards, reload with plain transformers and
    compare its logits with base+adapter's. Returns the check's figures."""
    model, tokenizer = load_for_inference(source, job, device)
    reference = prompt_logits(model, tokenizer, device)  # base + adapter, unmerged, same dtype
    merged = model.merge_and_unload()
    merged.save_pretrained(staging, max_shard_size=shard_bytes)
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
    shards = len(list(staging.glob("*.safetensors")))
    return {"max_logit_difference": difference, "shards": shards}


def plan_merge(job: InferJob, source: Source, device: str, dtype: torch.dtype, shard_bytes: int,
               output: Path) -> str:
    """The memory plan, printed in one line; the way it picks, or a one-line refusal (memory or disk)."""
    try:
        shape = load_model_shape(source.location)
    except Exception as error:  # noqa: BLE001 -- hub unreachable, gated without HF_TOKEN, no such directory ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot read the config.json of the base {source.location}: {first_line}") from None
    adapter_file = source.adapter / ADAPTER_FILE
    lora_bytes = adapter_file.stat().st_size if adapter_file.is_file() else 0
    dtype_bytes = torch.finfo(dtype).bits // 8
    plan = merge_plan(shape, dtype_bytes, lora_bytes, shard_bytes, device)
    host = available_ram()
    if job.merge.memory_gb is not None:
        device_free = int(job.merge.memory_gb * GB)
        host = device_free if device == "cpu" else host
    elif device == "cuda":
        device_free = torch.cuda.mem_get_info()[0]
    else:
        device_free = host
    way, line = choose_way(plan, device, device_free, host, job.merge.low_memory, job.merge.max_shard_size)
    print(line, flush=True)
    disk = output.parent
    while not disk.exists():
        disk = disk.parent
    check_disk(plan.model_bytes, shutil.disk_usage(disk).free, str(disk))
    return BY_TENSOR if way == BY_TENSOR else IN_MEMORY


def available_ram() -> int:
    """Bytes of RAM this process can still use: the kernel's MemAvailable, capped by the cgroup's limit (a
    SLURM job's memory) where there is one."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)
