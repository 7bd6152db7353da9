"""Rank helpers, the one run id every rank and node of a launch agrees on, and closing the process group."""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import datetime


def _launcher_start_time() -> float | None:
    """Wall-clock start of this process's parent (the `accelerate launch` / torchrun agent): the same for
    every local rank, whatever second each rank itself started in. /proc/PID is created with the process."""
    try:
        return os.stat(f"/proc/{os.getppid()}").st_mtime
    except OSError:
        return None


def launch_run_id(env: dict[str, str] | None = None) -> str:
    """SLURM job (array task) id when under SLURM; else the launcher's start time when launched with
    several ranks; else now. Multi-node launches outside SLURM should pass output_dir explicitly."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
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


def free_port() -> int:
    """A TCP port nothing listens on now (a rendezvous port, instead of a fixed default others may hold)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
