"""The typed schema of every herd config, registered with Hydra's ConfigStore.

YAML files under conf/ hold values; these dataclasses hold the types, defaults and the one explanation of
each knob. Because the primary configs start from these schemas (struct mode), an unknown key, a wrong type
or a value outside an Enum is refused when Hydra composes the config, before anything loads. The rules that
read the schema alone live here too, for every module that needs them without torch: the strategy vocabulary
(which strategies shard, use DeepSpeed, take several processes) and the batch split.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from herd.config.checks import checked, eval_size_rule
from herd.config.dpo import DpoConfig, Method
from herd.errors import ConfigError


def max_steps_rule(value: int) -> str | None:
    return None if value == -1 or value >= 1 else "must be >= 1, or -1 to train `epochs` epochs"


class Quant(str, Enum):
    nf4 = "nf4"  # 4-bit NormalFloat: the QLoRA paper's choice for normally distributed weights
    fp4 = "fp4"
    int8 = "int8"  # LLM.int8(); not usable with FSDP
    none = "none"  # plain LoRA on a bf16/fp32 base


class Strategy(str, Enum):
    single = "single"  # one process, one device
    ddp = "ddp"  # data parallel: a full (4-bit) replica per device
    fsdp = "fsdp"  # FSDP full shard: weights, LoRA grads and optimizer states sharded over devices
    zero2 = "zero2"  # DeepSpeed ZeRO-2: optimizer states and gradients sharded
    zero3 = "zero3"  # DeepSpeed ZeRO-3: weights sharded too
    zero3_offload = "zero3_offload"  # ZeRO-3 with optimizer states and weights offloaded to CPU RAM


# The strategy vocabulary, once: the memory model, the launch checks and every message that lists
# strategies read these.
SHARDED = (Strategy.fsdp, Strategy.zero3, Strategy.zero3_offload)  # weights and LoRA states split over ranks
DEEPSPEED = (Strategy.zero2, Strategy.zero3, Strategy.zero3_offload)
MULTI_PROCESS = tuple(s for s in Strategy if s != Strategy.single)


def strategy_list(strategies: tuple[Strategy, ...]) -> str:
    """Strategies as a message names them: 'ddp, fsdp or zero2'."""
    names = [s.value for s in strategies]
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]


def check_process_count(strategy: Strategy | str, processes: int, launched: str) -> None:
    """strategy=single is one process: refused with several, in one line naming the strategies that take
    them. `launched` says where the count comes from ("launched with 2 processes")."""
    if Strategy(strategy) == Strategy.single and processes > 1:
        raise ConfigError(f"strategy=single but {launched}; use strategy={strategy_list(MULTI_PROCESS)}")


class DataFormat(str, Enum):
    messages = "messages"  # a column of [{"role", "content"}, ...]
    guanaco = "guanaco"  # "### Human: ... ### Assistant: ..." text
    llama2 = "llama2"  # "<s>[INST] ... [/INST] ... </s>" text (the guanaco-llama2-1k subset)
    alpaca = "alpaca"  # instruction / input / output columns: one user turn (instruction, then input), one answer
    sharegpt = "sharegpt"  # a column of [{"from": "human"|"gpt"|"system", "value"}, ...]


# The column(s) each format reads when `field` is left null. alpaca names its three columns, comma-separated
# (instruction,input,output; a row may lack the input column): `field` may rename them, e.g. for Dolly's
# instruction,context,response.
FORMAT_FIELDS = {
    DataFormat.messages: "messages",
    DataFormat.guanaco: "text",
    DataFormat.llama2: "text",
    DataFormat.alpaca: "instruction,input,output",
    DataFormat.sharegpt: "conversations",
}


class BadRows(str, Enum):
    skip = "skip"  # drop them, print one summary line with counts by kind
    error = "error"  # stop before training, naming the counts by kind


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device supports it, else fp32 (CPU)
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class ModelConfig:
    name: str = MISSING  # short name, used in run names and W&B
    path: str = MISSING  # hub id (meta-llama/Llama-2-7b-hf) or a local directory
    revision: str | None = None  # hub revision (branch, tag or commit) to pin the weights
    build_tiny: bool = False  # build herd's deterministic tiny Llama at `path` when it is absent
    trust_remote_code: bool = False  # runs code from the model repo: off unless you trust it
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    chat_template: bool = True  # give the tokenizer herd's Llama-2 chat template when it has none
    # Build the base from its config.json alone, weights drawn from random_init_seed: no weights download, for
    # benchmarks and plan checks of any size (llama2-70b included). Quantized to 4-bit one decoder layer at a
    # time on the device (peft.quant=nf4|fp4; none builds it unquantized; int8 refused); strategy single or
    # ddp. The tokenizer is model.path's when it is a local directory with one, else herd's tiny one.
    # herd.random_init has the details.
    random_init: bool = False
    random_init_seed: int = 0  # same seed, same device type (cpu / cuda): same weights (train, evaluate, generate)


@dataclass
class PeftConfig:
    quant: Quant = Quant.nf4
    double_quant: bool = True  # quantizes the quantization constants too: ~0.4 bit/param saved
    # dtype the 4-bit weights are dequantized to for matmuls; auto = the run's precision (bf16 on GPU,
    # fp32 on CPU, where bf16 matmuls are emulated and slower without avx512_bf16)
    compute_dtype: str = checked("auto", one_of=("auto", "bfloat16", "float16", "float32"))
    # Storage dtype of packed 4-bit weights. FSDP/ZeRO-3 shard flat tensors of one dtype, so there it must
    # equal the param dtype; auto = the param dtype under fsdp/zero3, uint8 otherwise.
    quant_storage: str = checked("auto", one_of=("auto", "uint8", "bfloat16", "float16", "float32"))
    r: int = checked(16, at_least=1)  # LoRA rank: higher adds capacity and memory
    alpha: int = checked(32, at_least=1)  # LoRA scale is alpha / r
    dropout: float = checked(0.05, at_least=0, below=1)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # QLoRA: every linear layer


@dataclass
class SourceConfig:
    """One data set of a mix (data.sources). A key left null takes the value of the same data.* key (format,
    field, split, system_prompt, config_name, revision, data_files); path is the source's own."""

    path: str = MISSING  # hub data set id, a packaged builder (json, csv, parquet) with data_files, or a local file
    name: str | None = None  # in the report and bad-row lines; null = the file's stem or the hub id
    format: DataFormat | None = None
    field: str | None = None  # null: data.field, else the format's default column(s) (FORMAT_FIELDS)
    split: str | None = None
    config_name: str | None = None  # hub data set configuration (load_dataset's `name`), e.g. "wikitext-2-raw-v1"
    revision: str | None = None  # hub branch, tag or commit to pin the data
    data_files: list[str] | None = None  # load_dataset's data_files: files inside a hub repo, or local files
    system_prompt: str | None = None
    # How much of the mix this source makes up: a weight (every source then needs one; the mix keeps these
    # proportions) or an exact count of samples; neither = all of its usable rows. herd.data.mix_counts.
    weight: float | None = checked(None, above=0)
    samples: int | None = checked(None, at_least=1)


@dataclass
class DataConfig:
    name: str = MISSING
    # One data set: a hub id, a packaged builder (json, csv, parquet) with data_files, or a local .jsonl /
    # .json / .csv / .parquet file. null with data.sources (several data sets, mixed).
    path: str | None = MISSING
    format: DataFormat = DataFormat.messages
    # Column holding the text (guanaco, llama2), the message list (messages, sharegpt), or alpaca's three
    # columns "instruction,input,output"; null = the format's default (FORMAT_FIELDS).
    field: str | None = None
    split: str = "train"  # split of a hub data set to read
    config_name: str | None = None  # hub data set configuration (load_dataset's `name`)
    revision: str | None = None  # hub branch, tag or commit to pin the data
    data_files: list[str] | None = None  # load_dataset's data_files: files inside a hub repo, or local files
    system_prompt: str | None = None  # added to conversations that have none
    # Several data sets in one run, each with its own path, format, field, ...: the keys above are then the
    # defaults of every source, data.path stays null. Mixed by weights or sample counts (SourceConfig).
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    # Seeded subset taken before the split (1000, 10000, ...); with sources, the size of the mix.
    max_samples: int | None = checked(None, at_least=1)
    eval_size: float = checked(0.05, rule=eval_size_rule)  # fraction (<1) or count (>=1) of samples held out for evaluation
    max_seq_len: int = checked(1024, at_least=8)  # tokens; longer conversations are bad rows ("too_long")
    assistant_only_loss: bool = True  # loss on assistant tokens only; False trains on the whole text
    bad_rows: BadRows = BadRows.skip
    seed: int = checked(42, at_least=0)  # for the subset, the mix and the split
    cache_dir: str = ".herd/cache/tokenized"  # tokenized data, keyed by a fingerprint of inputs


@dataclass
class TrainConfig:
    max_steps: int = checked(-1, rule=max_steps_rule)  # optimizer steps; -1 runs `epochs` epochs
    epochs: float = checked(1.0, above=0)  # used when max_steps is -1
    global_batch_size: int = checked(16, at_least=1)  # sequences per optimizer step, over all processes
    micro_batch_size: int = checked(4, at_least=1)  # sequences per device per forward; accumulation is derived
    learning_rate: float = checked(2e-4, above=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = checked(0.03, at_least=0, below=1)  # of the total steps
    weight_decay: float = checked(0.0, at_least=0)
    max_grad_norm: float = checked(0.3, at_least=0)  # QLoRA paper's value
    optimizer: str = "adamw_torch"  # any transformers optim name, e.g. paged_adamw_8bit on GPU
    # Recomputes each layer's forward in backward to keep only its input: less activation memory, more compute.
    # null (auto): off when the memory plan without it fits in 90% of the device (measured 1.2-1.3x faster
    # on CPU, benchmarks/), on otherwise; on with offloading strategies (the plan under-predicts their peak);
    # off on CPU without device_memory_gb. true/false force it.
    gradient_checkpointing: bool | None = None
    # Pack conversations into max_seq_len rows without padding (best-fit decreasing; position ids keep the
    # attention inside each conversation): no compute spent on pad tokens.
    packing: bool = False
    precision: Precision = Precision.auto
    logging_steps: int = checked(5, at_least=1)
    eval_steps: int = checked(50, at_least=1)
    save_steps: int = checked(50, at_least=1)
    save_total_limit: int = checked(3, at_least=1)  # checkpoints kept
    eval_before_train: bool = True  # a baseline eval loss to compare against
    seed: int = checked(42, at_least=0)
    dataloader_num_workers: int = checked(0, at_least=0)


def deepspeed_file_rule(path: str) -> str | None:
    """A DeepSpeed config file that cannot be read as a JSON object (checked before anything imports)."""
    try:
        config = json.loads(Path(path).expanduser().read_text())
    except OSError as error:
        return f"cannot read it ({error.strerror or error})"
    except ValueError as error:
        return f"not valid JSON ({error})"
    return None if isinstance(config, dict) else "a DeepSpeed config is a JSON object"


@dataclass
class StrategyConfig:
    name: Strategy = Strategy.single
    cpu_offload: bool = False  # fsdp: parameters and optimizer states in CPU RAM between uses
    # fsdp: only rank 0 reads the checkpoint, the others receive shards (70B would need 8x CPU RAM otherwise)
    cpu_ram_efficient_loading: bool = True
    zero_stage: int = checked(0, one_of=("0", "2", "3"))  # DeepSpeed ZeRO stage (2 or 3) for zero2/zero3/zero3_offload, else 0
    offload_optimizer: bool = False  # DeepSpeed: optimizer states to CPU
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters to CPU
    # zero2/zero3/zero3_offload: your DeepSpeed JSON, merged under herd's settings. It supplies what herd leaves
    # open (bucket sizes, overlap_comm, stage-3 tuning ...); what herd decides (ZeRO stage, offload, bf16, batch
    # sizes, clipping, optimizer, scheduler) it must leave out, set to "auto" or agree with, else the run is
    # refused in one line (herd.config.launch). accelerate's deepspeed_config_file is read the same way.
    deepspeed_config: str | None = checked(None, rule=deepspeed_file_rule)
    # single only: "auto" (or balanced, balanced_low_0, sequential) spreads the layers of one model over all
    # GPUs this process sees (naive model parallel: one GPU computes at a time); null = one device
    device_map: str | None = None


class TrackingBackend(str, Enum):
    wandb = "wandb"  # online when a key and the network are there, else offline with a note
    wandb_offline = "wandb_offline"  # always offline: compute nodes without network; `wandb sync` later
    none = "none"  # no W&B; metrics.jsonl and loss.png are written in the run directory anyway


def tags_rule(tags: list[str]) -> str | None:
    long = [str(tag) for tag in tags if not 1 <= len(str(tag)) <= 64]
    return f"W&B tags are 1 to 64 characters, got '{long[0][:20]}'" if long else None


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.none
    # Keys left unset (None, no tags) take W&B's environment variable (WANDB_PROJECT, WANDB_ENTITY,
    # WANDB_RUN_GROUP, WANDB_TAGS comma-separated, WANDB_NAME), else herd's default; the manifest records which.
    project: str | None = None  # None = $WANDB_PROJECT, else "herd"
    entity: str | None = None  # W&B team or user; None = $WANDB_ENTITY, else the key's default entity
    group: str | None = None  # None = $WANDB_RUN_GROUP, else the experiment (or model) name + SLURM array job id
    tags: list[str] = checked(factory=list, rule=tags_rule)  # noqa: RUF009 (a field()) empty = $WANDB_TAGS
    name: str | None = None  # None = $WANDB_NAME, else <experiment>-<SLURM job id>, or the run directory's name
    log_adapter_artifact: bool = False  # upload the final adapter as a W&B model artifact (~160 MB on 7B r=16)
    sync_at_end: bool = False  # offline runs: `wandb sync` at the end when the network is reachable


@dataclass
class TrainJob:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    peft: PeftConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    strategy: StrategyConfig = MISSING
    output_dir: str = MISSING  # the run directory: adapter, tokenizer, config, checkpoints, metrics
    device: str = checked("auto", one_of=("auto", "cpu", "cuda"))
    plan: bool = False  # print the per-GPU memory plan and the launch commands, then exit (loads no weights)
    # GB per GPU to plan for; None reads it from the GPU. Set it to plan for a cluster's GPUs from a laptop.
    device_memory_gb: float | None = checked(None, above=0)
    force: bool = False  # launch even when the plan says the job does not fit
    method: Method = Method.sft  # set by the method/ group: sft (conversations) or dpo (preference pairs)
    dpo: DpoConfig = field(default_factory=DpoConfig)  # method=dpo only (herd.config.dpo)


def gradient_accumulation(global_batch_size: int, micro_batch_size: int, processes: int) -> int:
    """The user sets the global batch and the micro batch; accumulation follows, or the batch is refused."""
    per_step = micro_batch_size * processes
    if global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} is not divisible by "
            f"train.micro_batch_size x processes = {micro_batch_size} x {processes}; use a multiple of {per_step}"
        )
    return global_batch_size // per_step


def register_train_schema() -> None:
    """Make the schemas available to conf/*.yaml defaults lists; call before Hydra composes."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainJob)
