"""The memory a LoRA merge needs (infer.merge), from the model's shape alone, and the choice between its two ways.

in memory: the whole base in the output dtype on the device, the adapter (fp32, as PEFT loads it onto a
    half-precision base), PEFT's merge temporaries (one weight's delta in fp32) or the check prompts'
    activations, whichever is larger. The merged model is reloaded for the logits check after it is freed,
    so the peak is one model, not two.
by tensor (merge.low_memory): one weight at a time. On the device: the largest linear weight, its fp32 delta
    and the in-place add's fp32 temporary. In host RAM: the output shard being assembled (merge.max_shard_size,
    or the largest tensor when that is larger), the largest tensor as read (fp32 at most) and cast, and the
    adapter.
On CUDA the device figure adds the CUDA context. Both are estimates (the formulas below), not measurements; a
way fits when its need is at most HEADROOM of what is free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from herd.errors import ConfigError
from herd.memory.model import CUDA_CONTEXT, GB
from herd.memory.shape import ModelShape

HEADROOM = 0.9  # a plan fits when it needs at most this share of the free memory
CHECK_TOKENS = 128  # the check prompts are shorter (infer.recipes.merge.CHECK_CONVERSATIONS)
FP32 = 4
IN_MEMORY, BY_TENSOR = "in memory", "by tensor"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size as transformers' save_pretrained takes it: 5000000, "500MB", "5GB" (10^9), "5GiB"."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if not found or unit not in _UNITS or float(found.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a size; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(found.group(1)) * _UNITS[unit])


def shard_size_rule(value: str) -> str | None:
    try:
        parse_size(value)
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class MergePlan:
    model_bytes: int  # the merged model in the output dtype: what is written
    in_memory: int  # device bytes of the in-memory merge
    by_tensor_device: int  # device bytes of the by-tensor merge
    largest_tensor: int  # bytes of the largest tensor in the output dtype: a shard is never smaller
    by_tensor_reads: int  # host RAM of the by-tensor merge besides its shard: a tensor read and cast, the adapter
    shard_bytes: int  # merge.max_shard_size

    def by_tensor_host(self, device: str, shard_bytes: int | None = None) -> int:
        """Host RAM of the by-tensor merge; on CPU the device is host RAM, so its part adds in."""
        shard = max(self.shard_bytes if shard_bytes is None else shard_bytes, self.largest_tensor)
        return shard + self.by_tensor_reads + (self.by_tensor_device if device == "cpu" else 0)


def merge_plan(shape: ModelShape, dtype_bytes: int, lora_bytes: int, shard_bytes: int, device: str) -> MergePlan:
    counts = shape.param_counts()
    largest_linear = max(a * b for a, b in shape.linears().values())
    largest = max(largest_linear, counts["embed_tokens"])
    context = CUDA_CONTEXT if device == "cuda" else 0
    lora_fp32 = lora_bytes * FP32 // dtype_bytes if dtype_bytes < FP32 else lora_bytes
    merge_temporaries = 2 * largest_linear * FP32
    check_activations = 2 * CHECK_TOKENS * shape.vocab_size * FP32
    return MergePlan(
        model_bytes=counts["total"] * dtype_bytes,
        in_memory=counts["total"] * dtype_bytes + lora_fp32 + max(merge_temporaries, check_activations) + context,
        by_tensor_device=largest_linear * (dtype_bytes + 2 * FP32) + context,
        largest_tensor=largest * dtype_bytes,
        by_tensor_reads=largest * (FP32 + dtype_bytes) + lora_bytes,
        shard_bytes=shard_bytes,
    )


def _gb(n: float) -> str:
    """GB (2^30 bytes) as the planner prints them; MB below 1 GB."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 2**20:.1f} MB"


def choose_way(plan: MergePlan, device: str, device_free: int, host_free: int, low_memory: bool | None,
               shard_setting: str) -> tuple[str, str]:
    """(IN_MEMORY or BY_TENSOR, the plan as one line). merge.low_memory: None picks the in-memory merge when it
    fits, else by tensor; True / False force one. Refused in one line, naming the cheapest change that fits,
    when the chosen way does not fit."""
    memory = "RAM" if device == "cpu" else device

    def by_tensor_fits(shard_bytes: int | None = None) -> bool:
        return plan.by_tensor_host(device, shard_bytes) <= HEADROOM * host_free and (
            device == "cpu" or plan.by_tensor_device <= HEADROOM * device_free)

    in_memory_fits = plan.in_memory <= HEADROOM * device_free
    if low_memory is None:
        way = IN_MEMORY if in_memory_fits else BY_TENSOR
    else:
        way = BY_TENSOR if low_memory else IN_MEMORY
    on_device = "" if device == "cpu" else f"{_gb(plan.by_tensor_device)} of {device} + "
    line = (f"merge plan: in memory {_gb(plan.in_memory)} of {memory} ({_gb(device_free)} free); by tensor "
            f"{on_device}{_gb(plan.by_tensor_host(device))} of RAM ({_gb(host_free)} free); output "
            f"{_gb(plan.model_bytes)} in shards of at most {shard_setting}")
    if in_memory_fits if way == IN_MEMORY else by_tensor_fits():
        return way, f"{line} -> {way}"
    if way == IN_MEMORY and by_tensor_fits():
        hint = "merge.low_memory=true fits (one weight at a time)"
    elif plan.shard_bytes > GB and by_tensor_fits(GB):
        hint = "merge.low_memory=true merge.max_shard_size=1GiB fits"
    else:
        hint = "no setting fits: free memory, or merge on a larger machine"
    raise ConfigError(f"{line}: {way} does not fit; {hint}")


def check_disk(output_bytes: int, free: int, where: str) -> None:
    """Refuse a merge whose files would not fit on the output's disk (a staging copy is written first)."""
    if output_bytes > free:
        raise ConfigError(f"merge: the merged model needs {_gb(output_bytes)} at {where}, which has {_gb(free)} "
                          "free; give merge.output on a larger disk")
