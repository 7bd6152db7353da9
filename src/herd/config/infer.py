"""The typed schema of `python -m infer.*` (conf/infer.yaml), registered with Hydra's ConfigStore.

One primary config serves every infer command: the top level says WHAT to load (a training run directory,
or a model group + optional adapter) and HOW (quantization, precision, merged or not); each command reads
its own section (evaluate / generate / merge / chat / lm_eval). As for train, unknown keys, wrong types and
values outside an Enum are refused when Hydra composes the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore

from herd.config.checks import checked
from herd.config.train import DataConfig, ModelConfig, Precision, Quant
from herd.memory.merge import shard_size_rule


class Split(str, Enum):
    eval = "eval"  # the held-out split training evaluated on
    train = "train"
    all = "all"  # every usable sample of the data set (eval split first)


@dataclass
class SamplingConfig:
    max_new_tokens: int = checked(256, at_least=1)
    temperature: float = checked(0.0, at_least=0)  # 0 = greedy (deterministic); > 0 samples, seeded per batch
    top_p: float = checked(1.0, above=0, at_most=1)  # nucleus sampling; only used when temperature > 0
    seed: int = checked(0, at_least=0)  # sampling seed; each batch uses seed + batch index, so results do not depend on ranks


@dataclass
class EvaluateConfig:
    split: Split = Split.eval
    batch_size: int = checked(8, at_least=1)  # sequences per forward, per process
    output: str | None = None  # metrics JSON; default <run_dir>/eval/metrics.json


@dataclass
class GenerateConfig(SamplingConfig):
    # JSONL, one prompt per line: a JSON string, a message list, or {"id"?, "prompt" | "messages"}
    prompts: str | None = None
    split: Split = Split.eval  # with prompts from a data set: which split's user turns
    system_prompt: str | None = None  # added to prompts that have no system message
    batch_size: int = checked(8, at_least=1)  # prompts per generate call; batches are made once, over all prompts, by length
    output: str | None = None  # JSONL; default <run_dir>/generations/<source>.jsonl
    overwrite: bool = False  # replace an existing output (and discard unfinished parts)


@dataclass
class MergeConfig:
    output: str | None = None  # directory; default <run_dir>/merged
    tolerance: float | None = checked(None, above=0)  # max |logit difference| allowed; default 1e-3 (fp32), 0.25 (bf16)
    overwrite: bool = False
    # safetensors files of at most this size, with model.safetensors.index.json when there are several (the hub
    # convention; save_pretrained's max_shard_size): bytes, or 500MB, 5GB (10^9), 2GiB (2^30)
    max_shard_size: str = checked("5GB", rule=shard_size_rule)
    # null (auto): the whole base in memory when the memory planner says it fits (herd.memory.merge), else one
    # weight at a time (a base larger than the device or RAM; the check then reads the files, not logits);
    # true / false force one way
    low_memory: bool | None = None
    # GB the merge may use on its device (GPU memory, or RAM with device=cpu); null: what is free there now
    memory_gb: float | None = checked(None, above=0)


@dataclass
class ChatConfig(SamplingConfig):
    system_prompt: str | None = None
    echo_prompt: bool = False  # print the exact prompt string the model sees (JSON-quoted) to stderr


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)  # lm-eval task names, e.g. [hellaswag, arc_easy]
    include_path: str | None = None  # a directory of extra task YAMLs (local tasks)
    include_defaults: bool = True  # index lm-eval's built-in task YAMLs (takes seconds); false: local only
    num_fewshot: int | None = checked(None, at_least=0)
    limit: float | None = checked(None, above=0)  # docs per task (>= 1) or a fraction; for smoke runs only
    batch_size: int = checked(8, at_least=1)
    apply_chat_template: bool = False  # wrap lm-eval prompts in the tokenizer's Llama-2 chat template
    output: str | None = None  # directory; default <run_dir>/lm_eval


@dataclass
class InferJob:
    run_dir: str | None = None  # a finished training run: base model, adapter, tokenizer and data from it
    model: ModelConfig | None = None  # model=<group option>: base model; overrides the run's base
    adapter: str | None = None  # adapter directory; default <run_dir>/adapter
    base_only: bool = False  # ignore the adapter: the base model alone
    data: DataConfig | None = None  # data=<group option>; default: the run's data config
    quant: Quant | None = None  # nf4 | fp4 | int8 | none; default: the run's peft.quant, else none
    precision: Precision = Precision.auto  # unquantized weights and compute: bf16 on GPU, fp32 on CPU
    merge_adapter: bool = False  # merge the adapter into the loaded weights (lossy on a 4/8-bit base)
    device: str = checked("auto", one_of=("auto", "cpu", "cuda"))  # under accelerate each rank takes its own GPU
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


def register_infer_schema() -> None:
    """Make the infer schema available to conf/infer.yaml; call before Hydra composes."""
    ConfigStore.instance().store(name="infer_schema", node=InferJob)
