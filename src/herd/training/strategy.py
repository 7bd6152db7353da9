"""The distribution strategy, all of it: the checks, the launch environment, what it decides for a run.

Chosen in the Hydra config only and checked before anything loads; handed to the trainer as FSDP / DeepSpeed
settings (no accelerate config file needed). The recipe asks `setup_for` once and reads the answer
(StrategySetup: weight placement, adapter dtype, 4-bit storage, trainer class and arguments). On CPU,
strategy=fsdp is herd's own FSDP2 (fully_shard_model, ShardedSFTTrainer); `distributed_facts` says what ran.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from trl import SFTTrainer

from herd import dist
from herd.config.launch import (
    ACCELERATE_DS_FIELDS,
    check_accelerate_launch,
    deepspeed_file,
    deepspeed_settings,
    herd_deepspeed,
    merge_deepspeed,
    read_deepspeed_file,
)
from herd.config.train import (
    DEEPSPEED,
    SHARDED,
    Quant,
    Strategy,
    TrainJob,
    check_process_count,
)
from herd.errors import ConfigError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, for from_pretrained


def deepspeed_on_cpu(job: TrainJob, device: str) -> bool:
    return device == "cpu" and job.strategy.name in DEEPSPEED


def manual_fsdp2(job: TrainJob, device: str) -> bool:
    """strategy=fsdp on CPU: accelerate would silently run FSDP as DDP there (PLATFORM_NOTES), so herd
    shards the model itself with torch's FSDP2 (`fully_shard`, gloo) and keeps accelerate from wrapping it."""
    return job.strategy.name == Strategy.fsdp and device == "cpu"


# ---------------------------------------------------------------- launch


def prepare_launch(device: str, job: TrainJob) -> None:
    """The launch environment, set before any accelerate state exists: on CPU accelerate's CPU mode
    (dist.prepare_cpu_launch), which train and infer share.

    DeepSpeed on CPU is the exception: accelerate's CPU mode never selects DeepSpeed, so those runs are not
    "CPU" to accelerate at all; they get DeepSpeed's CPU accelerator, a gloo process group and a CPU
    device instead (see start_processes)."""
    if job.strategy.name in (Strategy.fsdp, *DEEPSPEED) and "LOCAL_RANK" not in os.environ:
        # One process without a launcher's ranks (`python -m train`, or `accelerate launch --num_processes 1`,
        # which starts it plainly): FSDP and DeepSpeed need a process group, so a one-process one, as torchrun
        # would make (without it: "environment variable RANK expected" / "fsdp only works in distributed").
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
    if job.strategy.name in DEEPSPEED:
        # The DeepSpeed fields of an accelerate config were checked against the strategy (check_compatibility)
        # and herd's own DeepSpeed config carries them; left listed, accelerate would refuse that config.
        os.environ.pop(ACCELERATE_DS_FIELDS, None)
    if deepspeed_on_cpu(job, device):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed compiles a shared-memory op on first use (~40 s) into a cache that two venvs would keep
        # invalidating for each other (PLATFORM_NOTES): one cache per Python environment.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / (
            "herd-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])))
        os.environ.pop("ACCELERATE_USE_CPU", None)  # accelerate's CPU mode would drop DeepSpeed silently
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    else:
        dist.prepare_cpu_launch(device)


def start_processes(job: TrainJob, device: str) -> PartialState:
    """The launch environment, then accelerate's PartialState, created before the trainer so that the trainer
    reuses it (TrainingArguments accelerator_config use_configured_state). For DeepSpeed on CPU the backend
    must be named: without CUDA accelerate finds none and reports one process while DeepSpeed trains on all."""
    prepare_launch(device, job)
    if deepspeed_on_cpu(job, device):
        return PartialState(backend="gloo")
    return PartialState(cpu=device == "cpu")


# ---------------------------------------------------------------- checks


def check_compatibility(job: TrainJob, world_size: int, dtype: torch.dtype, device: str,
                        env: dict[str, str] | None = None) -> None:
    """The compatibility matrix; each rule refuses in one line naming what to change."""
    env = os.environ if env is None else env
    name = job.strategy.name
    if device == "cpu" and name == Strategy.fsdp and job.strategy.cpu_offload:
        # DeepSpeed's offload runs on CPU (its own CPU Adam); herd's CPU FSDP2 has nothing to offload.
        raise ConfigError("strategy.cpu_offload needs CUDA GPUs (herd's FSDP2 on CPU keeps everything in CPU "
                          "memory already); on CPU use strategy=fsdp without it, or strategy=zero3_offload")
    device_map = job.strategy.device_map
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"strategy.device_map={device_map} is not one of {', '.join(DEVICE_MAPS)} (or null)")
    if device_map is not None and name != Strategy.single:
        raise ConfigError(f"strategy.device_map={device_map} splits one model inside one process: only with "
                          f"strategy=single, got {name.value}; across processes use strategy=fsdp or zero3")
    check_process_count(name, world_size, f"launched with {world_size} processes")
    # accelerate launch --config_file F (or its flags): DeepSpeed / FSDP / mixed precision must agree with the
    # strategy and precision; the user's DeepSpeed JSON (strategy.deepspeed_config or the accelerate config's
    # deepspeed_config_file) must agree with herd's settings.
    bf16 = dtype == torch.bfloat16
    check_accelerate_launch(job, bf16, world_size, env, device)
    if name in DEEPSPEED or job.strategy.deepspeed_config:
        deepspeed_settings(job, bf16, world_size, env)
    if name == Strategy.fsdp and job.peft.quant == Quant.int8:
        raise ConfigError("peft.quant=int8 cannot be sharded by FSDP; use peft.quant=nf4 or strategy=ddp")
    if name in SHARDED and job.peft.quant in (Quant.nf4, Quant.fp4):
        storage, param = quant_storage(job, dtype), str(dtype).removeprefix("torch.")
        if storage != param:
            raise ConfigError(f"strategy={name.value} with 4-bit weights needs peft.quant_storage equal to the "
                              f"param dtype ({param}), got {storage}; set peft.quant_storage={param} or auto")
    if name in DEEPSPEED and job.strategy.zero_stage not in (2, 3):
        raise ConfigError(f"strategy={name.value} needs strategy.zero_stage 2 or 3, got {job.strategy.zero_stage}")


def quant_storage(job: TrainJob, dtype: torch.dtype) -> str:
    """peft.quant_storage resolved: sharded strategies flatten 4-bit weights with the rest, in one dtype."""
    if job.peft.quant_storage != "auto":
        return job.peft.quant_storage
    return str(dtype).removeprefix("torch.") if job.strategy.name in SHARDED else "uint8"


# ---------------------------------------------------------------- the trainer's settings


@dataclass(frozen=True)
class StrategySetup:
    """What the strategy decides for one process of a run: all the recipe asks it, answered once."""

    herd_fsdp2: bool  # strategy=fsdp on CPU: herd shards the model itself (manual_fsdp2)
    placement: str | None  # where the base model loads; None: the strategy places (and shards) the weights
    adapter_dtype: torch.dtype  # the LoRA weights' dtype while training (adapt_trainer)
    quant_storage: str  # peft.quant_storage resolved
    trainer_arguments: dict  # the TrainingArguments the strategy sets: device use, FSDP / DeepSpeed
    # DeepSpeed evaluates before its engine exists only under ZeRO-3: ZeRO-2 runs skip the baseline eval.
    evaluates_before_training: bool

    @property
    def trainer_class(self) -> type[SFTTrainer]:
        return ShardedSFTTrainer if self.herd_fsdp2 else SFTTrainer

    def shard(self, model: torch.nn.Module) -> None:
        """herd's FSDP2, where it runs: after TRL's constructor (which re-assigns the adapters' .data: that must
        not touch FSDP's shards) and before train() builds the optimizer over the sharded parameters."""
        if self.herd_fsdp2:
            fully_shard_model(model)


def setup_for(job: TrainJob, device: str, dtype: torch.dtype, local_rank: int) -> StrategySetup:
    """The strategy's answers for this process (`local_rank`: its index on this node)."""
    herd_fsdp2 = manual_fsdp2(job, device)
    # accelerate's FSDP and ZeRO-3 place the weights themselves and flatten adapters together with them.
    strategy_places = job.strategy.name in SHARDED and not herd_fsdp2
    configured_state = deepspeed_on_cpu(job, device)
    return StrategySetup(
        herd_fsdp2=herd_fsdp2,
        placement=None if strategy_places else (f"cuda:{local_rank}" if device == "cuda" else "cpu"),
        # fp32 (PEFT's own default; autocast still runs the matmuls in the compute dtype), except where a
        # sharded strategy flattens the adapters together with the base weights: that needs its one dtype, the
        # training dtype (bf16 on GPU, fp32 on CPU; herd's CPU FSDP2 and DeepSpeed on CPU are all fp32).
        adapter_dtype=dtype if strategy_places else torch.float32,
        quant_storage=quant_storage(job, dtype),
        trainer_arguments={
            "use_cpu": device == "cpu" and not configured_state,
            # DeepSpeed on CPU needs the PartialState herd set up (start_processes); elsewhere the trainer
            # builds its own, as it always has.
            "accelerator_config": {"use_configured_state": configured_state},
            **trainer_kwargs(job, dtype, device),
        },
        evaluates_before_training=job.strategy.name != Strategy.zero2,
    )


def trainer_kwargs(job: TrainJob, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Extra TrainingArguments for the strategy."""
    name = job.strategy.name
    if manual_fsdp2(job, device):
        return {}  # herd shards the model itself (fully_shard_model); accelerate must not know about FSDP
    if name in DEEPSPEED:
        return {"deepspeed": deepspeed_config(job, dtype)}
    if name == Strategy.fsdp:
        return {
            "fsdp": "full_shard auto_wrap" + (" offload" if job.strategy.cpu_offload else ""),
            "fsdp_config": {
                "version": 2,  # FSDP2 (fully_shard): per-parameter sharding, works with 4-bit bf16 storage
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "cpu_ram_efficient_loading": job.strategy.cpu_ram_efficient_loading,
                "state_dict_type": "FULL_STATE_DICT",  # SHARDED_STATE_DICT made save_model write nothing
                "reshard_after_forward": True,
            },
        }
    return {}


def deepspeed_config(job: TrainJob, dtype: torch.dtype, env: dict[str, str] | None = None) -> dict:
    """The DeepSpeed config the trainer gets: herd's settings over the user's DeepSpeed JSON, if any
    (strategy.deepspeed_config or the accelerate config's deepspeed_config_file; checked in
    check_compatibility)."""
    herds = herd_deepspeed(job, dtype == torch.bfloat16)
    found = deepspeed_file(job, env)
    return merge_deepspeed(read_deepspeed_file(*found) if found else {}, herds)


# ---------------------------------------------------------------- herd's FSDP2 (strategy=fsdp on CPU)


def fully_shard_model(model: torch.nn.Module) -> int:
    """FSDP2 by hand: each decoder layer is one shard group, the root (embeddings, norm, head) another.
    Called after LoRA is attached (its weights are sharded and reduce-scattered with the rest) and before
    the trainer builds its optimizer. Returns the number of sharded parameters (DTensors)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    layer_classes = set(getattr(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError(f"strategy=fsdp: found no decoder layers ({sorted(layer_classes)}) to shard")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    # accelerate's MULTI_CPU prepare would wrap the sharded model in DistributedDataParallel; a model
    # marked as prepared is returned as it is (accelerate 1.15 Accelerator.prepare_model).
    model._is_accelerate_prepared = True
    return sum(isinstance(p, DTensor) for p in model.parameters())


def full_adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights gathered whole: the trained ones and frozen LoRA copies (DPO's reference adapter);
    a collective: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}


def load_full_trainable_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Inverse of full_adapter_state_dict for the trained adapter: each rank keeps its own shard of every full tensor. Keys may
    lack the adapter name (PEFT's saved format: `lora_A.weight` for `lora_A.default.weight`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name if name in full else name.replace(".default.", ".")
        value = full[key].to(p.dtype)
        with torch.no_grad():
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(value, p.device_mesh, p.placements))
            else:
                p.copy_(value)


def local_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with each DTensor replaced by this rank's shard (saved once per rank)."""
    from torch.distributed.tensor import DTensor

    return {**state, "state": {k: {n: (v.to_local() if isinstance(v, DTensor) else v) for n, v in s.items()}
                               for k, s in state["state"].items()}}


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a local_optimizer_state: wrap each shard back into a DTensor like its parameter."""
    from torch.distributed.tensor import DTensor

    for p, s in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for n, v in list(s.items()):
            if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape and v.dim():
                s[n] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


class HerdFsdp2Checkpoints:
    """Checkpoints of a model herd sharded itself with FSDP2 (strategy=fsdp on CPU, where accelerate has no
    FSDP), mixed into a TRL trainer: the adapters are gathered whole on every rank and written by rank 0;
    each rank checkpoints its own optimizer shard."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        state_dict = full_adapter_state_dict(self.model)  # collective: all ranks
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        full = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
        load_full_trainable_state_dict(self.model, full)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        torch.save(local_optimizer_state(self.optimizer.state_dict()),
                   os.path.join(output_dir, f"optimizer-rank{self.args.process_index}.pt"))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        self.optimizer.load_state_dict(torch.load(
            os.path.join(checkpoint, f"optimizer-rank{self.args.process_index}.pt"), weights_only=True))
        reshard_optimizer_state(self.optimizer)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))


class ShardedSFTTrainer(HerdFsdp2Checkpoints, SFTTrainer):
    """SFTTrainer for a model herd sharded itself (herd's FSDP2 checkpoints)."""


# ---------------------------------------------------------------- what really ran


class WrappedModelProbe(TrainerCallback):
    """Records what the model was wrapped in while training (DistributedDataParallel, DeepSpeedEngine,
    FSDP ...): the trainer unwraps it again when training ends."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        trainer.wrapped_model_seen = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.wrapped_model_seen = type(self.trainer.model_wrapped).__name__


def distributed_type(trainer) -> str:
    """accelerate's distributed type of the trainer, by name (MULTI_GPU, FSDP, DEEPSPEED, NO ...)."""
    return str(trainer.accelerator.distributed_type).rpartition(".")[2]


def distributed_facts(trainer, num_processes: int) -> dict:
    """What really ran, for the manifest and the tests: accelerate can fall back silently."""
    accelerator = trainer.accelerator
    facts = {
        "distributed_type": distributed_type(trainer),
        "num_processes": num_processes,
        "wrapped_model": trainer.wrapped_model_seen,
    }
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        facts["zero_stage"] = plugin.zero_stage
        # ZeRO-3 parameters are DeepSpeed-partitioned tensors (ds_id); each rank holds a slice of each.
        facts["partitioned_parameters"] = sum(hasattr(p, "ds_id") for p in trainer.model.parameters())
        engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None:  # what the engine really did, not what herd asked for
            facts["offload_optimizer"] = bool(engine.engine.zero_offload_optimizer())
            facts["offload_params"] = bool(engine.engine.zero_offload_param())
            # tuning a user's DeepSpeed JSON may set (strategy.deepspeed_config): what the engine took
            facts["overlap_comm"] = bool(engine.engine.zero_overlap_comm())
            facts["reduce_bucket_size"] = int(engine.engine.zero_reduce_bucket_size())
    facts["devices"] = sorted({str(p.device) for p in trainer.model.parameters()})
    facts["quantized_linear_layers"] = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                                           for m in trainer.model.modules())
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())
    if facts["distributed_type"] == "FSDP" or sharded:
        facts["sharded_parameters"] = sharded
    if isinstance(trainer, HerdFsdp2Checkpoints):
        facts["fsdp"] = "herd FSDP2 (fully_shard per decoder layer + root)"
    return facts
