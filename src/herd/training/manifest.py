"""The run manifest: what ran, where, with what, launched how. Written by rank 0 into the run directory."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from herd.paths import REPO_ROOT
from herd.redaction import SECRET_ENV, is_secret_key, redact

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed",
            "hydra-core", "wandb")
# Environment knobs that change how a run behaves; anything secret-looking is never recorded.
ENV_PREFIXES = ("SLURM_", "ACCELERATE_", "CUDA_", "NCCL_", "TORCH_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NAME", "OMP_NUM_THREADS", "MASTER_", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                "RANK", "LOCAL_RANK", "GROUP_RANK", "DS_", "HERD_", "PYTORCH_", "FSDP_")
_SECRET_NAME = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _hardware() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": gpus[0] if gpus else None, "gpu_count": len(gpus), "host": platform.node()}


def launch_command() -> list[str]:
    """This rank's command line and, when started by a launcher (accelerate / torchrun), the launcher's."""
    commands = [" ".join([Path(sys.executable).name, "-m", *sys.argv])]
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
        text = " ".join(part.decode(errors="replace") for part in parent if part)
        if "accelerate" in text or "torch.distributed" in text or "torchrun" in text:
            commands.insert(0, text)
    except OSError:
        pass
    return [redact(command) for command in commands]


def environment_knobs() -> dict[str, str]:
    return {
        k: redact(v) for k, v in sorted(os.environ.items())
        if k.startswith(ENV_PREFIXES) and not any(s in k for s in _SECRET_NAME) and k not in SECRET_ENV
        and not is_secret_key(k)
    }


def build_manifest(resolved_config: dict, world_size: int, strategy: str, distributed_type: str) -> dict:
    sha = _git("rev-parse", "HEAD")
    return {
        "created": datetime.now(UTC).isoformat(),
        "config": resolved_config,
        "git": {"sha": sha, "dirty": bool(_git("status", "--porcelain")) if sha else None},
        "packages": _versions(),
        "python": sys.version.split()[0],
        "hardware": _hardware(),
        "world_size": world_size,
        "strategy": strategy,
        "distributed_type": distributed_type,
        "launch_command": launch_command(),
        "environment": environment_knobs(),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }
