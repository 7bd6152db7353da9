"""The memory plan of a training job: run before every launch, printed with `plan=true`.

Bridges the typed TrainJob to herd.memory (pure arithmetic on the model's config.json; no weights load)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace

from herd.config.dpo import Method, Reference
from herd.config.train import Quant, Strategy, TrainJob
from herd.errors import ConfigError
from herd.memory import GB, MemoryPlan, ModelShape, Settings, estimate_settings, load_model_shape, suggest

# train.gradient_checkpointing=null turns it off only when the plan without it leaves this share of the
# device free: the plan was within -3%..+17% of measured peaks (benchmarks/results/gpu_h100_memory_calibration.json)
AUTO_CHECKPOINTING_FREE_SHARE = 0.10


def job_settings(job: TrainJob, world_size: int) -> Settings:
    targets = list(job.peft.target_modules)
    strategy = job.strategy.name.value
    return Settings(
        seq_len=job.data.max_seq_len,
        micro_batch=job.train.micro_batch_size,
        world_size=world_size,
        strategy=strategy,
        quant=job.peft.quant.value if job.peft.quant != Quant.fp4 else "nf4",  # same bytes as nf4
        double_quant=job.peft.double_quant,
        lora_r=job.peft.r,
        lora_targets="all-linear" if targets == ["all-linear"] else tuple(targets),
        lora_dropout=job.peft.dropout,
        gradient_checkpointing=job.train.gradient_checkpointing is not False,  # auto is decided in plan_job
        optimizer="paged_adamw_8bit" if "8bit" in job.train.optimizer else "adamw",
        cpu_offload=job.strategy.cpu_offload or job.strategy.offload_optimizer,
        grad_accum=max(1, job.train.global_batch_size // (job.train.micro_batch_size * world_size)),
        **preference_settings(job),
    )


def preference_settings(job: TrainJob) -> dict:
    """DPO: two sequences per pair, and the reference policy the job keeps (herd.training.dpo)."""
    if job.method != Method.dpo:
        return {}
    from_sft = bool(job.dpo.sft_run)
    if job.dpo.reference == Reference.separate:
        reference = "separate_adapter" if from_sft else "separate"
    else:
        reference = "adapter_copy" if from_sft else "adapter_off"
    return {"sequences_per_sample": 2, "reference": reference}


def plan_job(job: TrainJob, world_size: int, location: str,
             device_bytes: int | None = None) -> tuple[Settings, MemoryPlan]:
    """The job's memory plan; with train.gradient_checkpointing=null its settings carry the decision
    (auto_checkpointing)."""
    try:
        shape = load_model_shape(location)
    except Exception as error:  # noqa: BLE001 -- hub unreachable, gated without HF_TOKEN, no such directory ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot read the config.json of model.path={location}: {first_line}") from None
    settings = job_settings(job, world_size)
    if job.train.gradient_checkpointing is None:
        settings = replace(settings, gradient_checkpointing=auto_checkpointing(job, shape, settings, device_bytes))
    return settings, estimate_settings(shape, settings)


def auto_checkpointing(job: TrainJob, shape: ModelShape, settings: Settings, device_bytes: int | None) -> bool:
    """Gradient checkpointing for train.gradient_checkpointing=null: on only where the memory needs it."""
    offloading = (job.strategy.name == Strategy.zero3_offload or job.strategy.cpu_offload
                  or job.strategy.offload_optimizer or job.strategy.offload_params)
    if offloading:  # the plan under-predicts offloading runs (PEFT's 70B FSDP offload: 19.6 GB, planned 13.1)
        return True
    if device_bytes is None:  # CPU without device_memory_gb: no device memory to plan against
        return False
    without = estimate_settings(shape, replace(settings, gradient_checkpointing=False))
    return without.total_per_gpu_bytes > (1 - AUTO_CHECKPOINTING_FREE_SHARE) * device_bytes


def launch_commands(world_size: int) -> list[str]:
    """The commands that would run this job: accelerate on this machine, sbatch on a cluster."""
    overrides = " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("plan=true", "plan=True"))
    if world_size > 1:
        local = f"accelerate launch --multi_gpu --num_processes {world_size} -m train {overrides}"
    else:
        local = f"python -m train {overrides}"
    return [local, f"python -m herd.slurm submit {overrides}"]


def check_fits(job: TrainJob, settings: Settings, plan: MemoryPlan, location: str,
               device_bytes: int | None) -> None:
    """Refuse, in one line with the cheapest change that fits, a job whose estimate exceeds the device."""
    if device_bytes is None or plan.fits(device_bytes) or job.force:
        return
    hint = suggest(load_model_shape(location), settings, device_bytes)
    raise ConfigError(
        f"the plan needs {plan.total_per_gpu_bytes / GB:.1f} GB per GPU but the device has "
        f"{device_bytes / GB:.1f} GB; {hint or 'nothing tried fits'}; "
        f"see plan=true for the breakdown, or set force=true to launch anyway"
    )


def device_memory_bytes(job: TrainJob, device: str) -> int | None:
    """Memory the plan must fit in: one GPU's, or with strategy.device_map every GPU this process sees
    (the layers are spread over them; the estimate is then for the whole model)."""
    if device == "cuda":
        import torch

        per_gpu = (int(job.device_memory_gb * GB) if job.device_memory_gb is not None
                   else torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        return per_gpu * (torch.cuda.device_count() if job.strategy.device_map else 1)
    if job.device_memory_gb is not None:
        return int(job.device_memory_gb * GB)
    return None  # CPU: the plan is GPU memory; nothing to check against
