"""Checkpoints that count only once complete, and finding the one to resume from.

The trainer writes `checkpoint-<step>/` in the run directory; herd writes a marker file into it last, after
every rank has finished its part. A directory without the marker (a kill mid-write) is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from herd.errors import HerdError
from herd.paths import share_per_umask
from herd.rundir import ADAPTER_DIR, METRICS
from herd.training.faults import kill_self

log = logging.getLogger(__name__)

COMPLETE = "herd-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are reported and skipped."""
    for step, path in reversed(checkpoints(run_dir)):
        if not (path / COMPLETE).exists():
            log.warning("skipping incomplete checkpoint %s (no %s marker: interrupted while saving)", path, COMPLETE)
            print(f"herd: skipping incomplete checkpoint {path.name} (interrupted while saving)", flush=True)
            continue
        problem = unreadable(path)
        if problem is None:
            return path
        print(f"herd: skipping checkpoint {path.name}: {problem}; falling back to an older one", flush=True)
    return None


def unreadable(checkpoint: Path) -> str | None:
    """Why a complete-marked checkpoint cannot be loaded (a disk error or an edit after saving), or None.
    Reads headers only: trainer_state.json, each safetensors header, each torch zip archive's directory."""
    try:
        checkpoint_steps(checkpoint)
    except (OSError, ValueError, KeyError) as error:
        return f"trainer_state.json unreadable ({type(error).__name__})"
    from safetensors import safe_open

    for path in sorted(checkpoint.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix in (".pt", ".bin", ".pth") and path.is_file():
                with zipfile.ZipFile(path):
                    pass
        except Exception as error:  # noqa: BLE001 - any failure to read a header means "cannot load"
            return f"{path.relative_to(checkpoint)} unreadable ({type(error).__name__})"
    return None


def checkpoint_steps(checkpoint: Path) -> tuple[int, int]:
    """(global_step, max_steps) recorded by the trainer in the checkpoint."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"], state["max_steps"]


def is_final(checkpoint: Path, max_steps: int) -> bool:
    """Whether training was over at this checkpoint (max_steps <= 0: the step count the run itself derived
    from its epochs)."""
    step, recorded_max = checkpoint_steps(checkpoint)
    return step >= (max_steps if max_steps > 0 else recorded_max)


def resume_point(run_dir: Path, max_steps: int) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from, and the final checkpoints passed over to get there.

    The newest complete checkpoint, unless training was already over there: the trainer always runs one
    more step after resuming, even from the last step (transformers 5.23: max_steps 8 resumed from
    checkpoint-8 ends at step 9). A final checkpoint is passed over for the newest complete one before it;
    resume is exact, so replaying the last steps gives the same result. The passed-over checkpoints are set
    aside (set_aside), never deleted, until the replay saves a newer complete one. Checkpoints past
    max_steps are refused: resuming would have to throw their steps away."""
    past = [path for step, path in checkpoints(run_dir) if max_steps > 0 and step > max_steps
            and (path / COMPLETE).exists()]
    if past:
        raise HerdError(f"{run_dir} has checkpoints past train.max_steps={max_steps} (newest: {past[-1].name}); "
                        f"resuming would discard them: set train.max_steps >= {checkpoints_step(past[-1])} "
                        "or give a new output_dir")
    resume = last_complete_checkpoint(run_dir)
    if resume is None or not is_final(resume, max_steps):
        return resume, []
    complete = [path for _, path in checkpoints(run_dir) if (path / COMPLETE).exists()]
    final = [path for path in complete if is_final(path, max_steps)]
    earlier = [path for path in complete if path not in final]
    resume = earlier[-1] if earlier else None
    print(f"herd: {final[-1].name} is at the last step but the run did not finish; replaying from "
          f"{resume.name if resume else 'the start'}", flush=True)
    return resume, final


def checkpoints_step(path: Path) -> int:
    return int(_CHECKPOINT.match(path.name).group(1))


SUPERSEDED = "superseded-step-"  # not "checkpoint-*": the trainer's checkpoint rotation must not see it


def set_aside(paths: list[Path]) -> None:
    """Move passed-over checkpoints out of the trainer's way (it would rewrite them in place, under their old
    complete marker); they are deleted only once a newer complete checkpoint supersedes them."""
    for path in paths:
        path.rename(path.with_name(f"{SUPERSEDED}{checkpoints_step(path)}"))


def discard_superseded(run_dir: Path, up_to_step: int) -> None:
    """Delete set-aside checkpoints of steps <= up_to_step: a complete checkpoint at that step now exists."""
    for path in Path(run_dir).glob(f"{SUPERSEDED}*"):
        if path.name.removeprefix(SUPERSEDED).isdigit() and int(path.name.removeprefix(SUPERSEDED)) <= up_to_step:
            shutil.rmtree(path, ignore_errors=True)


def finished_run(run_dir: Path, max_steps: int) -> dict | None:
    """The metrics of a run that already finished (its final metrics and adapter are written) at or past
    the step target; None when there is training left to do."""
    metrics_path = run_dir / METRICS
    if not metrics_path.exists() or not (run_dir / ADAPTER_DIR).is_dir():
        return None
    metrics = json.loads(metrics_path.read_text())
    target = max_steps if max_steps > 0 else metrics.get("max_steps")
    return metrics if target is not None and metrics.get("global_step", -1) >= target else None


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint complete once all ranks have saved it (on_save runs after the trainer's save)."""

    def __init__(self, run_dir: Path, state) -> None:
        self.run_dir, self.state = Path(run_dir), state

    def on_save(self, args, state, control, **kwargs):
        self.state.wait_for_everyone()
        checkpoint = self.run_dir / f"checkpoint-{state.global_step}"
        # Fault injection for the tests: die after the files but before the marker.
        if os.environ.get("HERD_DEBUG_KILL_IN_SAVE") == str(state.global_step) and self.state.is_main_process:
            kill_self(f"killed while saving checkpoint {state.global_step}")
        if self.state.is_main_process and checkpoint.is_dir():
            share_per_umask(checkpoint)
            (checkpoint / COMPLETE).write_text(f"{state.global_step}\n")
            discard_superseded(self.run_dir, state.global_step)
        self.state.wait_for_everyone()
