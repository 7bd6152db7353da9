"""What a training run prints (herd.console, herd.training.tracking.progress): one herd line per logging step,
progress bars only on a terminal, the ML stack's known noise filtered unless HERD_VERBOSE=1.

Real `python -m train` runs of the tiny model: with stdout and stderr pipes (as under SLURM), the same with
HERD_VERBOSE=1, and on a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import re
import select
import struct
import subprocess
import sys

import pytest

from herd.training.tracking.progress import format_duration, step_line
from tests.conftest import FAST_TRAIN, OFFLINE_ENV, REPO, run_module

STEP_LINE = re.compile(
    r"train step (\d+)/(\d+): loss \d+\.\d{4}  lr \d\.\d\de[+-]\d\d  grad norm \d+\.\d{3}  \d+ tok/s  "
    r"MFU (-|\d+\.\d%)  peak mem \d+\.\d\d GiB  ETA \d+:\d\d:\d\d")
# Printed by the stack on every such run (measured on this tiny CPU run), each from a different mechanism:
NOISE = {
    "Setting accelerator to CPU": "DeepSpeed's logger, to stdout, when accelerate imports it",
    "Running in WANDB offline mode": "transformers' print at import when WANDB_MODE=offline",
    "FutureWarning": "a transformers deprecation through warnings.warn",
}
RUN = [*FAST_TRAIN, "train.max_steps=6", "train.logging_steps=2", "train.eval_steps=4", "train.save_steps=100"]


def herd_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("train step ")]


def assert_one_line_per_logging_step(text: str) -> None:
    lines = herd_lines(text)
    assert [STEP_LINE.fullmatch(line) is not None for line in lines] == [True] * 3, lines
    assert [int(STEP_LINE.fullmatch(line).group(1)) for line in lines] == [2, 4, 6]
    assert "{'loss'" not in text and "'eval_loss'" not in text and "'train_runtime'" not in text  # no TRL dicts


def test_step_line_fields_and_fallbacks():
    metrics = {"train/loss": 1.23456, "train/learning_rate": 2e-4, "train/grad_norm": 0.5, "train/tokens_per_s":
               1234.4, "train/mfu": 0.4123, "memory/peak_gib_rank0": 11.5, "memory/peak_gib_rank1": 12.04}
    assert step_line(10, 20, metrics, 65.4) == (
        "train step 10/20: loss 1.2346  lr 2.00e-04  grad norm 0.500  1234 tok/s  MFU 41.2%  peak mem 12.04 GiB  "
        "ETA 0:01:05")
    assert step_line(1, 2, {}, None) == ("train step 1/2: loss -  lr -  grad norm -  - tok/s  MFU -  peak mem - GiB  "
                                         "ETA -")
    assert [format_duration(s) for s in (0, 59.6, 3600 * 30 + 61, float("nan"), -1)] == [
        "0:00:00", "0:01:00", "30:01:01", "-", "-"]


def test_non_tty_run_prints_one_herd_line_per_logging_step_and_no_noise(tmp_path):
    result = run_module("train", *RUN, f"output_dir={tmp_path / 'run'}", env={"HERD_VERBOSE": "0"})
    output = result.stdout + result.stderr
    assert "\r" not in output  # no progress bar: tqdm's carriage returns would pile up in a SLURM file
    assert_one_line_per_logging_step(result.stdout)
    assert "it/s" not in output and "Loading weights" not in output
    assert [noise for noise in NOISE if noise in output] == []
    assert result.stderr == ""  # nothing else either: every warning the stack printed here is filtered


@pytest.mark.slow  # make test-all; its fast siblings run by default
def test_verbose_brings_the_noise_back(tmp_path):
    result = run_module("train", *RUN, f"output_dir={tmp_path / 'run'}", env={"HERD_VERBOSE": "1"})
    output = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise not in output] == []
    assert "\r" not in output  # bars follow the terminal, not the verbosity
    assert_one_line_per_logging_step(result.stdout)


def test_noise_of_other_runs_is_filtered_unless_verbose():
    """Noise this CPU run does not print, raised as its sources raise it, in a process that imported train:
    bitsandbytes' missing-`kernels` warning (CPUs with AVX512-BF16), the compiler command lines and the "built
    successfully" print of DeepSpeed's ops (zero2/zero3 launches). The root logger gets an stderr handler at
    DEBUG, as setuptools configures it while DeepSpeed builds an op."""
    code = """
import logging, sys, train
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, format="%(message)s")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named kernels. "
    "Please make sure you already `pip install kernels` and the kernels >= 0.11.1")
logging.getLogger("compilers.C.base").info("gcc -Wsign-compare -O3 -fPIC -c /tmp/x/test.c -o /tmp/x/test.o")
import deepspeed.comm.torch
module_print = vars(sys.modules["deepspeed.comm.torch"]).get("print", print)  # what its `print(...)` calls
module_print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=sys.stderr)
module_print("any other line", file=sys.stderr)
logging.getLogger("bitsandbytes").error("a real bitsandbytes error")
"""
    shown = {}
    for verbose in ("0", "1"):
        env = {**os.environ, **OFFLINE_ENV, "HERD_VERBOSE": verbose, "DS_ACCELERATOR": "cpu"}
        shown[verbose] = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                                        text=True, timeout=300, check=True).stderr
    assert shown["0"] == "any other line\na real bitsandbytes error\n"  # other prints and errors still show
    for noise in ("Failed to load CPU gemm_4bit_forward", "gcc -Wsign-compare", "built successfully"):
        assert noise in shown["1"], noise


def read_terminal(command: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run `command` with stdout and stderr on a 40x160 pseudo-terminal; (exit status, what it showed)."""
    import fcntl
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=secondary,
                               stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks = []
    try:
        while select.select([primary], [], [], timeout)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # make test-all; its fast siblings run by default
def test_terminal_run_draws_bars_and_the_same_herd_lines(tmp_path):
    env = {**os.environ, **OFFLINE_ENV, "HERD_VERBOSE": "0"}
    status, shown = read_terminal([sys.executable, "-m", "train", *RUN, f"output_dir={tmp_path / 'run'}"], env)
    assert status == 0, shown[-3000:]
    assert re.search(r"\| 6/6 \[", shown) and "it/s" in shown  # the Trainer's bar, to its end
    assert_one_line_per_logging_step(shown.replace("\r\n", "\n").replace("\r", "\n"))
    assert [noise for noise in NOISE if noise in shown] == []


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_verbose_switch_values(value, expected, monkeypatch):
    from herd.console import verbose

    monkeypatch.setenv("HERD_VERBOSE", value)
    assert verbose() is expected
