"""The distribution strategy: chosen in the Hydra config only, checked before anything loads, and handed
to the trainer as FSDP / DeepSpeed settings (no accelerate config file needed)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from herd import dist
from herd.config.train import Quant, Strategy, TrainJob
from herd.errors import ConfigError

SHARDED = (Strategy.fsdp, Strategy.zero3, Strategy.zero3_offload)
DEEPSPEED = (Strategy.zero2, Strategy.zero3, Strategy.zero3_offload)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, for from_pretrained


def deepspeed_on_cpu(job: TrainJob, device: str) -> bool:
    return device == "cpu" and job.strategy.name in DEEPSPEED


def prepare_launch(device: str, job: TrainJob | None = None) -> None:
    """accelerate falls back silently on CPU: without ACCELERATE_USE_CPU every rank of a multi-process
    launch trains alone (PLATFORM_NOTES). Set what it needs before any accelerate state exists.

    DeepSpeed on CPU is the exception: accelerate's CPU mode never selects DeepSpeed, so those runs are not
    "CPU" to accelerate at all; they get DeepSpeed's CPU accelerator, a gloo process group and a CPU
    device instead (see distributed_state)."""
    if job is not None and job.strategy.name in (Strategy.fsdp, *DEEPSPEED) and "LOCAL_RANK" not in os.environ:
        # One process without a launcher's ranks (`python -m train`, or `accelerate launch --num_processes 1`,
        # which starts it plainly): FSDP and DeepSpeed need a process group, so a one-process one, as torchrun
        # would make (without it: "environment variable RANK expected" / "fsdp only works in distributed").
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
    if device != "cpu":
        return
    if job is not None and deepspeed_on_cpu(job, device):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed compiles a shared-memory op on first use (~40 s) into a cache that two venvs would keep
        # invalidating for each other (PLATFORM_NOTES): one cache per Python environment.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / (
            "herd-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])))
        os.environ.pop("ACCELERATE_USE_CPU", None)  # accelerate's CPU mode would drop DeepSpeed silently
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    else:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def distributed_state(job: TrainJob, device: str):
    """accelerate's PartialState, created before the trainer so that the trainer reuses it
    (TrainingArguments accelerator_config use_configured_state). For DeepSpeed on CPU the backend must be
    named: without CUDA accelerate finds none and reports one process while DeepSpeed trains on all."""
    from accelerate import PartialState

    if deepspeed_on_cpu(job, device):
        return PartialState(backend="gloo")
    return PartialState(cpu=device == "cpu")


def quant_storage(job: TrainJob, dtype: torch.dtype) -> str:
    if job.peft.quant_storage != "auto":
        return job.peft.quant_storage
    return str(dtype).removeprefix("torch.") if job.strategy.name in SHARDED else "uint8"


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


def manual_fsdp2(job: TrainJob, device: str) -> bool:
    """strategy=fsdp on CPU: accelerate would silently run FSDP as DDP there (PLATFORM_NOTES), so herd
    shards the model itself with torch's FSDP2 (`fully_shard`, gloo) and keeps accelerate from wrapping it."""
    return job.strategy.name == Strategy.fsdp and device == "cpu"


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


def full_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) weights gathered whole; a collective: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def load_full_trainable_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Inverse of full_trainable_state_dict: each rank keeps its own shard of every full tensor. Keys may
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
