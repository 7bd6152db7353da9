"""What every infer command shares: find the model a config names, load it, plan batches, score, generate.

A config names its model in one of two ways: `run_dir=` (a finished training run: base model, adapter,
tokenizer and data config from its herd_run.json) or `model=<option>` with an optional `adapter=`.

Batches are planned once over ALL inputs (sorted by length, longest first) and dealt to ranks round-robin.
Every batch therefore holds the same samples with the same padding whatever the number of processes, so
1-process and N-process results agree exactly (greedy generation) or to float64 summation order (loss).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from herd import rundir
from herd.config.infer import InferJob, SamplingConfig
from herd.config.train import DataConfig, ModelConfig, PeftConfig, Quant
from herd.dist import prepare_cpu_launch
from herd.errors import ConfigError, DataError
from herd.lm_head import labelled_loss_sum
from herd.modeling import (
    load_adapter,
    load_base_model,
    load_tokenizer,
    model_location,
    resolve_device,
    resolve_precision,
)
from herd.paths import resolve_path

# ---------------------------------------------------------------- what to load


@dataclass
class Source:
    """The resolved answer to "which model": everything needed to load it, nothing loaded yet."""

    model_cfg: ModelConfig
    location: str  # local directory or hub id of the base
    peft_cfg: PeftConfig  # quantization settings to load the base with (quant already resolved)
    adapter: Path | None  # LoRA adapter directory, None for the base alone
    tokenizer_location: str
    run_dir: Path | None
    data_cfg: DataConfig | None

    def describe(self) -> dict:
        return {"base_model": self.location, "adapter": str(self.adapter) if self.adapter else None,
                "quant": self.peft_cfg.quant.value, "run_dir": str(self.run_dir) if self.run_dir else None}


def _structured(schema: type, values: dict) -> Any:
    """A schema dataclass from a plain dict (as stored in herd_run.json), enums and types checked."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))


def resolve_source(job: InferJob) -> Source:
    run_dir, info = None, {}
    if job.run_dir:
        try:
            run_dir = resolve_path(job.run_dir)
            info = rundir.read_run_info(run_dir)
        except FileNotFoundError as error:
            raise ConfigError(f"run_dir={job.run_dir}: {error}") from None
    elif job.model is None:
        raise ConfigError("nothing to load: set run_dir=<training run> or model=<option> (e.g. model=tiny)")

    if job.model is not None:
        model_cfg, location = job.model, model_location(job.model)
    else:
        model_cfg = _structured(ModelConfig, info["model"])
        base = info["base_model"]
        # The run's resolved base, unless the run moved to a machine where that path does not exist.
        location = base if Path(base).exists() else model_location(model_cfg)

    adapter = None
    if job.base_only:
        adapter = None
    elif job.adapter:
        adapter = resolve_path(job.adapter, must_exist=False)
    elif run_dir is not None:
        adapter = run_dir / info.get("adapter", rundir.ADAPTER_DIR)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter} has no adapter_config.json (not a LoRA adapter directory)")

    # The tokenizer the adapter was trained with (saved next to it, chat template included), else the base's.
    candidates = [adapter, run_dir / rundir.ADAPTER_DIR if run_dir else None]
    tokenizer_location = next(
        (str(c) for c in candidates if c is not None and (c / "tokenizer_config.json").is_file()), location
    )

    peft_cfg = _structured(PeftConfig, info["peft"]) if "peft" in info else PeftConfig()
    quant = job.quant if job.quant is not None else (peft_cfg.quant if run_dir else Quant.none)
    # A DPO run from the base records no conversations ("data": null): infer then needs data=... (or prompts)
    data_cfg = job.data if job.data is not None else (_structured(DataConfig, info["data"]) if info.get("data")
                                                       else None)
    return Source(model_cfg, location, replace(peft_cfg, quant=quant), adapter, tokenizer_location,
                  run_dir, data_cfg)


def output_path(given: str | None, key: str, default: str, source: Source) -> Path:
    """The `key` setting's path if given, else `default` under the run directory; refused without either, and
    refused to a sweep job whose path an earlier job of the sweep wrote."""
    if given:
        path = Path(given).expanduser().resolve()
    elif source.run_dir is None:
        raise ConfigError(f"no run_dir to write into; set {key}=<path>")
    else:
        path = source.run_dir / default
    rundir.claim_sweep_output(path, key)
    return path


# ---------------------------------------------------------------- loading


def start_processes(device: str):
    """accelerate's PartialState for this launch and this rank's device (each GPU rank takes its own GPU).

    On CPU PartialState must be told so (cpu=True): only the Accelerator reads ACCELERATE_USE_CPU, and without
    it `accelerate launch --multi_gpu` on a CPU machine would start ranks that each run alone.
    """
    from accelerate import PartialState

    device = resolve_device(device)
    prepare_cpu_launch(device)  # ACCELERATE_USE_CPU too, for the Accelerator that lm-eval builds
    state = PartialState(cpu=device == "cpu")
    if device == "cuda" and state.num_processes > 1:
        device = f"cuda:{state.local_process_index}"
    return state, device


def load_inference_tokenizer(source: Source):
    return load_tokenizer(source.model_cfg, source.tokenizer_location)


def load_for_inference(source: Source, job: InferJob, device: str, tokenizer=None):
    """The model (eval mode; adapter attached, merged if asked) and tokenizer, on `device`."""
    dtype = resolve_precision(job.precision, device.split(":")[0])
    tokenizer = tokenizer or load_inference_tokenizer(source)
    model = load_base_model(source.model_cfg, source.peft_cfg, device, dtype, source.location)
    if source.adapter is not None:
        model = load_adapter(model, source.adapter)
        if job.merge_adapter:
            # On a 4/8-bit base PEFT dequantizes, adds the delta and re-quantizes: lossy, but one matmul less.
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- ranks and batches


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an OOM shows up in the first batch)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def rank_batches(batches: list[list[int]], rank: int, world_size: int) -> list[tuple[int, list[int]]]:
    """(batch number, indices) of the batches this rank runs: every world_size-th, starting at rank."""
    return [(number, batch) for number, batch in enumerate(batches) if number % world_size == rank]


# ---------------------------------------------------------------- scoring


def right_padded(samples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels of `samples` as one right-padded batch (causal attention never
    looks at the padding on the right)."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        ids[row, :length] = torch.tensor(sample["input_ids"])
        labels[row, :length] = torch.tensor(sample["labels"])
        mask[row, :length] = 1
    return ids, mask, labels


def token_loss_sum(model, samples: list[dict], pad_id: int, device: str) -> tuple[float, int]:
    """Sum of next-token cross-entropy over the labelled tokens of `samples`, and their count."""
    ids, mask, labels = right_padded(samples, pad_id)
    return labelled_loss_sum(model, ids.to(device), mask.to(device), labels)


# ---------------------------------------------------------------- generating


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # new tokens up to and including </s>


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: SamplingConfig, seed: int, device: str,
             streamer=None) -> list[Completion]:
    """Complete formatted prompts (they carry their own <s>) as one left-padded batch."""
    tokenizer.padding_side = "left"  # generation appends on the right: the last column must be real tokens
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    options: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if sampling.temperature > 0:
        torch.manual_seed(seed)
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                   "top_k": None}
    output = model.generate(
        **encoded, max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, streamer=streamer, **options,
    )
    new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
    completions = []
    for row, tokens in enumerate(new_tokens):
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        prompt_tokens = int(encoded["attention_mask"][row].sum())
        completions.append(Completion(text, prompt_tokens, len(tokens)))
    return completions


def read_prompts(path: Path, system_prompt: str | None) -> list[tuple[str, list[dict]]]:
    """(id, messages) per line of a prompts JSONL. A line is a JSON string (one user turn), a message
    list, or an object with "prompt" (string) or "messages" (list) and an optional "id"."""
    from herd.chat_format import ConversationError, prompt_messages, validate_messages, with_system_prompt

    prompts, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
        prompt_id: Any = len(prompts)  # 0-based position unless the line names its own id
        if isinstance(value, dict):
            prompt_id = value.get("id", prompt_id)
            value = value.get("messages", value.get("prompt"))
        if isinstance(value, str) and value.strip():
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
        else:
            raise DataError(f"{path}:{number}: expected a prompt string, a message list, or an object "
                            "with 'prompt' or 'messages'")
        try:  # a trailing assistant turn is cut off; what is left must be a valid conversation prefix
            if messages[-1]["role"] == "assistant":
                messages = prompt_messages(messages)
            validate_messages([*messages, {"role": "assistant", "content": "x"}])
        except (ConversationError, ValueError) as error:
            raise DataError(f"{path}:{number}: {error}") from None
        if json.dumps(prompt_id) in seen:
            raise DataError(f"{path}:{number}: duplicate id {prompt_id!r}")
        seen.add(json.dumps(prompt_id))
        messages = with_system_prompt(messages, system_prompt)
        prompts.append((prompt_id, messages))
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
