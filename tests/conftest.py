"""Shared fixtures: an offline, CPU-only environment and the tiny model built once per session."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The GPUs as the suite found them: the CPU suite hides them (below); gpu-marked tests hand them back.
_ORIGINAL_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")

# Before any HF import: nothing in the suite may reach the network or a GPU.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}
os.environ.update(OFFLINE_ENV)


@functools.cache
def _gpu_count() -> int:
    """CUDA devices visible with the environment the suite started in, counted in a child process (this
    one runs with CUDA hidden)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if _ORIGINAL_CUDA_VISIBLE_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = _ORIGINAL_CUDA_VISIBLE_DEVICES
    result = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                            env=env, capture_output=True, text=True, timeout=120)
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def gpu_env() -> dict[str, str]:
    """Environment for a gpu-marked test's subprocesses: offline as always, with the GPUs visible."""
    return {**OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": _ORIGINAL_CUDA_VISIBLE_DEVICES
            or ",".join(str(i) for i in range(_gpu_count()))}


def pytest_collection_modifyitems(config, items):
    # The full CPU rehearsal of the GPU round (~7 min here) runs only when asked for: pytest -m rehearsal.
    if "rehearsal" not in (config.option.markexpr or ""):
        for item in items:
            if item.get_closest_marker("rehearsal"):
                item.add_marker(pytest.mark.skip(reason="the full CPU rehearsal of the GPU round: pytest -m rehearsal"))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    found = _gpu_count()
    for item in gpu_items:
        needed = (item.get_closest_marker("gpu").args or (1,))[0]
        if found < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPU(s), found {found}"))


@pytest.fixture(autouse=True)
def _environment_restored():
    """os.environ as it was before the test: in-process launch code (prepare_launch, start_processes) writes
    ranks and a rendezvous port there, and a later test's training process would inherit them (under
    pytest-xdist that port may meanwhile belong to the other worker's processes: EADDRINUSE)."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """herd's deterministic tiny Llama, in the repo's .herd cache (built on first use, then reused)."""
    from herd.fixtures.tiny import ensure_tiny_model

    return ensure_tiny_model(REPO / ".herd" / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from herd.config.train import ModelConfig
    from herd.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny", path=str(tiny_model_dir)), str(tiny_model_dir))


def run_module(module: str, *args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, from the repo root, offline."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


# Small, fast training settings shared by the tests that train (2 CPU cores).
FAST_TRAIN = [
    "model=tiny", "data=sample", "peft=qlora", "train.global_batch_size=4", "train.micro_batch_size=4",
    "train.learning_rate=3e-3", "train.warmup_ratio=0", "data.max_seq_len=256", "train.logging_steps=5",
    # on, as auto picks for large models on GPUs (on CPU auto turns it off): the suite keeps covering it
    "train.gradient_checkpointing=true",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny QLoRA training run (20 steps), shared by the tests that read a run directory."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_module("train", *FAST_TRAIN, "train.max_steps=20", "train.eval_steps=10", "train.save_steps=10",
               f"output_dir={run_dir}")
    return run_dir
