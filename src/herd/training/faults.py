"""Fault injection for the tests, off unless its HERD_DEBUG_* environment variable is set."""

from __future__ import annotations

import os
import signal
import time

from transformers import TrainerCallback


def kill_self(reason: str) -> None:
    print(f"herd: debug fault: {reason}; SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class DebugFaults(TrainerCallback):
    """Test hooks, off unless their environment variable is set: SIGKILL after a step (and its checkpoint),
    or raise on one rank."""

    def on_step_end(self, args, state, control, **kwargs):
        if os.environ.get("HERD_DEBUG_RAISE_ON_RANK") == os.environ.get("RANK", "0") and state.global_step >= 2:
            raise RuntimeError(f"herd debug fault: rank {os.environ.get('RANK', '0')} raised at step "
                               f"{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if os.environ.get("HERD_DEBUG_KILL_AFTER_STEP") == str(state.global_step):
            # Optionally die only after a pause: W&B persists what was logged within its flush interval, so
            # a test of what survives a kill must let that interval pass first.
            time.sleep(float(os.environ.get("HERD_DEBUG_KILL_DELAY_S", "0")))
            kill_self(f"killed after step {state.global_step}")
