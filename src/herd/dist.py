"""Ranks and processes: the one run id every rank and node of a launch agrees on, the SLURM job, the
launch environment train and infer share, the collectives herd runs itself, and closing the process group.
torch is imported only where a collective runs."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class SlurmJob:
    tag: str  # <job id>, or <array job id>_<task id> for a task of a job array
    array_job: str | None  # the array job id, shared by every task of one sweep


def slurm_job(env: Mapping[str, str] | None = None) -> SlurmJob | None:
    """The SLURM job this process runs in, as herd names it everywhere (run ids, W&B names and groups)."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return SlurmJob(f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}", env["SLURM_ARRAY_JOB_ID"])
    if env.get("SLURM_JOB_ID"):
        return SlurmJob(env["SLURM_JOB_ID"], None)
    return None


def _launcher_start_time() -> float | None:
    """Wall-clock start of this process's parent (the `accelerate launch` / torchrun agent): the same for
    every local rank, whatever second each rank itself started in. /proc/PID is created with the process."""
    try:
        return os.stat(f"/proc/{os.getppid()}").st_mtime
    except OSError:
        return None


def launch_run_id(env: Mapping[str, str] | None = None) -> str:
    """SLURM job (array task) id when under SLURM; else the launcher's start time when launched with
    several ranks; else now. Multi-node launches outside SLURM should pass output_dir explicitly."""
    env = os.environ if env is None else env
    job = slurm_job(env)
    if job is not None:
        return f"slurm-{job.tag}"
    started = _launcher_start_time() if "LOCAL_RANK" in env else None
    return datetime.fromtimestamp(started or time.time()).strftime("%Y%m%d-%H%M%S")


def ensure_run_id() -> str:
    """Set HERD_RUN_ID (read by conf/train.yaml's output_dir) unless the user or launcher already did."""
    os.environ.setdefault("HERD_RUN_ID", launch_run_id())
    return os.environ["HERD_RUN_ID"]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def prepare_cpu_launch(device: str) -> None:
    """accelerate falls back silently on CPU: without ACCELERATE_USE_CPU every rank of a multi-process
    launch runs alone (PLATFORM_NOTES). Set before any accelerate state exists, by train and infer alike
    (the Accelerator lm-eval builds reads it too)."""
    if device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def free_port() -> int:
    """A TCP port nothing listens on now (a rendezvous port, instead of a fixed default others may hold)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group_is_up():
    """torch.distributed when a process group is running, else None (without importing torch)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed
    return None


def all_gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order; [value] without a process group. Collective."""
    distributed = _group_is_up()
    if distributed is None:
        return [value]
    gathered: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Element-wise sum over ranks (float64); the values themselves without a process group. Collective."""
    distributed = _group_is_up()
    if distributed is None:
        return list(values)
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    distributed.all_reduce(tensor)
    return tensor.tolist()


def close_process_group() -> None:
    """Wait for every rank, then destroy the default process group, once this rank's work succeeded.

    Without this a finished rank can abort at interpreter exit ("terminate called without an active
    exception", SIGABRT) and the launcher reports the run as failed: seen in CI on the rank of `infer.lm_eval`
    that returns right after its last `all_gather_object` while rank 0 still writes results (2 runs in 10
    here). A gloo worker thread was still releasing that collective's Python-owned tensors when the
    interpreter shut down. destroy_process_group alone does not stop those threads: DeepSpeed, imported
    late by accelerate's unwrap_model, keeps the group alive in default arguments (`TorchBackend.barrier`).
    The barrier gives every worker thread time to let go of the last collective (the wait releases the
    GIL they need) and ends all ranks together. Only after success: a rank that failed must not wait for
    the others (the launcher stops them). torch is not imported here for a run that never started it.
    """
    distributed = _group_is_up()
    if distributed is not None:
        distributed.barrier()
        distributed.destroy_process_group()
