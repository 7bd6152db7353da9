"""The distribution strategy: chosen in the Hydra config only, checked before anything loads, and handed
to the trainer as FSDP / DeepSpeed settings (no accelerate config file needed)."""

from __future__ import annotations

import os

import torch

from herd.config import ConfigError, Quant, Strategy, TrainJob

SHARDED = (Strategy.fsdp, Strategy.zero3, Strategy.zero3_offload)
DEEPSPEED = (Strategy.zero2, Strategy.zero3, Strategy.zero3_offload)


def prepare_launch(device: str) -> None:
    """accelerate falls back silently on CPU: without ACCELERATE_USE_CPU every rank of a multi-process
    launch trains alone (PLATFORM_NOTES). Set what it needs before any accelerate state exists."""
    if device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def quant_storage(job: TrainJob, dtype: torch.dtype) -> str:
    if job.peft.quant_storage != "auto":
        return job.peft.quant_storage
    return str(dtype).removeprefix("torch.") if job.strategy.name in SHARDED else "uint8"


def check_compatibility(job: TrainJob, world_size: int, dtype: torch.dtype, device: str,
                        env: dict[str, str] | None = None) -> None:
    """The compatibility matrix; each rule refuses in one line naming what to change."""
    env = os.environ if env is None else env
    name = job.strategy.name
    if device == "cpu" and name not in (Strategy.single, Strategy.ddp):
        # accelerate's CPU mode (MULTI_CPU over gloo) would run FSDP as plain DDP and excludes DeepSpeed
        # altogether; refusing beats a run that is silently something else.
        raise ConfigError(f"strategy={name.value} needs CUDA GPUs (on CPU accelerate would silently run "
                          "something else); on CPU use strategy=single or strategy=ddp")
    if name == Strategy.single and world_size > 1:
        raise ConfigError(f"strategy=single but launched with {world_size} processes; "
                          "use strategy=ddp, fsdp, zero2 or zero3")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and name not in DEEPSPEED:
        raise ConfigError(f"the launch environment enables DeepSpeed (accelerate config) but strategy={name.value}; "
                          "drop the DeepSpeed accelerate config or use strategy=zero2/zero3")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and name != Strategy.fsdp:
        raise ConfigError(f"the launch environment enables FSDP (accelerate config) but strategy={name.value}; "
                          "drop the FSDP accelerate config or use strategy=fsdp")
    if name == Strategy.fsdp and job.peft.quant == Quant.int8:
        raise ConfigError("peft.quant=int8 cannot be sharded by FSDP; use peft.quant=nf4 or strategy=ddp")
    if name in SHARDED and job.peft.quant in (Quant.nf4, Quant.fp4):
        storage, param = quant_storage(job, dtype), str(dtype).removeprefix("torch.")
        if storage != param:
            raise ConfigError(f"strategy={name.value} with 4-bit weights needs peft.quant_storage equal to the "
                              f"param dtype ({param}), got {storage}; set peft.quant_storage={param} or auto")
    if name in DEEPSPEED and job.strategy.zero_stage not in (2, 3):
        raise ConfigError(f"strategy={name.value} needs strategy.zero_stage 2 or 3, got {job.strategy.zero_stage}")


def deepspeed_config(job: TrainJob, dtype: torch.dtype) -> dict:
    s = job.strategy
    zero: dict = {"stage": s.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if s.zero_stage == 3:
        # Gather full weights at save time so the adapter is written as ordinary safetensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def trainer_kwargs(job: TrainJob, dtype: torch.dtype) -> dict:
    """Extra TrainingArguments for the strategy."""
    name = job.strategy.name
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
