"""Checkpoints that count only once complete, and finding the one to resume from.

The trainer writes `checkpoint-<step>/` in the run directory; herd writes a marker file into it last, after
every rank has finished its part. A directory without the marker (a kill mid-write) is never loaded.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)

COMPLETE = "herd-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are reported and skipped."""
    for step, path in reversed(checkpoints(run_dir)):
        if (path / COMPLETE).exists():
            return path
        log.warning("skipping incomplete checkpoint %s (no %s marker: interrupted while saving)", path, COMPLETE)
        print(f"herd: skipping incomplete checkpoint {path.name} (interrupted while saving)", flush=True)
    return None


def _kill_self(reason: str) -> None:
    print(f"herd: debug fault: {reason}; SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint complete once all ranks have saved it (on_save runs after the trainer's save)."""

    def __init__(self, run_dir: Path, state) -> None:
        self.run_dir, self.state = Path(run_dir), state

    def on_save(self, args, state, control, **kwargs):
        self.state.wait_for_everyone()
        checkpoint = self.run_dir / f"checkpoint-{state.global_step}"
        # Fault injection for the tests: die after the files but before the marker.
        if os.environ.get("HERD_DEBUG_KILL_IN_SAVE") == str(state.global_step) and self.state.is_main_process:
            _kill_self(f"killed while saving checkpoint {state.global_step}")
        if self.state.is_main_process and checkpoint.is_dir():
            (checkpoint / COMPLETE).write_text(f"{state.global_step}\n")
        self.state.wait_for_everyone()


class DebugFaults(TrainerCallback):
    """Test hooks, off unless their environment variable is set: SIGKILL after a step (and its checkpoint),
    or raise on one rank."""

    def on_step_end(self, args, state, control, **kwargs):
        if os.environ.get("HERD_DEBUG_RAISE_ON_RANK") == os.environ.get("RANK", "0") and state.global_step >= 2:
            raise RuntimeError(f"herd debug fault: rank {os.environ.get('RANK', '0')} raised at step "
                               f"{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if os.environ.get("HERD_DEBUG_KILL_AFTER_STEP") == str(state.global_step):
            _kill_self(f"killed after step {state.global_step}")
