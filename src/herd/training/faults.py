"""Fault injection for the tests, off unless its HERD_DEBUG_* environment variable is set.

- HERD_DEBUG_KILL_AFTER_STEP=N: SIGKILL every rank right after checkpoint-N is complete. With
  HERD_DEBUG_KILL_AFTER_WANDB=1, rank 0 first waits until W&B's offline file holds step N (W&B writes its file
  on its own schedule: a test of what survives a kill must not race it with a sleep).
- HERD_DEBUG_RAISE_ON_RANK=R: rank R raises from step 2 on.
- HERD_DEBUG_HOLD_AT_STEP=N: every rank stops after step N until it receives SIGUSR1 (herd.training.preempt),
  so a preemption test's signal arrives mid-training however fast or slow the steps are.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

WAIT_LIMIT_S = 300.0  # a hook that waits longer than this gives up loudly: the test then fails on what it checks


def kill_self(reason: str) -> None:
    print(f"herd: debug fault: {reason}; SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def wandb_has_step(run_dir: Path, step: int) -> bool:
    """True once the newest offline W&B run of run_dir has a history row at `step` in its file."""
    # A test hook: the .wandb reader lives with the tests (its only users); runs started by the tests run from
    # the repository root, where `tests` imports.
    from herd.training.tracking.wandb import offline_run_dirs
    from tests.wandb_reader import read_wandb_run

    dirs = offline_run_dirs(run_dir)
    if not dirs:
        return False
    try:
        history = read_wandb_run(dirs[-1]).history
    except Exception:  # noqa: BLE001  (not written yet, or caught mid-write: look again)
        return False
    return any(row.get("train/global_step") == step for row in history)


def wait_until(condition, what: str) -> bool:
    """Poll `condition` until it holds (True) or WAIT_LIMIT_S pass (False, with a line saying what)."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            print(f"herd: debug fault: gave up waiting for {what} after {WAIT_LIMIT_S:.0f} s", flush=True)
            return False
        time.sleep(0.05)
    return True


class DebugFaults(TrainerCallback):
    """Test hooks, off unless their environment variable is set (module docstring)."""

    def on_step_end(self, args, state, control, **kwargs):
        if os.environ.get("HERD_DEBUG_RAISE_ON_RANK") == os.environ.get("RANK", "0") and state.global_step >= 2:
            raise RuntimeError(f"herd debug fault: rank {os.environ.get('RANK', '0')} raised at step "
                               f"{state.global_step}")
        if os.environ.get("HERD_DEBUG_HOLD_AT_STEP") == str(state.global_step):
            from herd.training.preempt import signal_received

            print(f"herd: debug fault: rank {os.environ.get('RANK', '0')} holds after step {state.global_step} "
                  "until SIGUSR1", flush=True)
            wait_until(signal_received, "SIGUSR1")

    def on_save(self, args, state, control, **kwargs):
        if os.environ.get("HERD_DEBUG_KILL_AFTER_STEP") == str(state.global_step):
            if os.environ.get("HERD_DEBUG_KILL_AFTER_WANDB") and state.is_world_process_zero:
                wait_until(lambda: wandb_has_step(Path(args.output_dir), state.global_step),
                           f"step {state.global_step} in the W&B file")
            kill_self(f"killed after step {state.global_step}")
