"""What training prints per logging step: herd's one line, and the progress bar only on a terminal.

The Trainer's own printing is replaced (`use_herd_console`): its PrinterCallback (the logs dict, printed when
tqdm is off) and its ProgressCallback (the bar, which also writes the logs dict under it) go; on a terminal
a bar without the dict comes back. herd's line (HerdTracker prints it on rank 0, through `step_line`) reads:

    train step 10/20: loss 6.8790  lr 1.50e-03  grad norm 0.360  2367 tok/s  MFU 41.2%  peak mem 12.04 GiB  ETA 0:01:05

tok/s: non-padding tokens per second of training over the interval since the last line, all processes;
MFU: as herd.training.tracking.metrics defines it ("-" where the device's peak FLOP/s is unknown, e.g. CPU);
peak mem: the largest peak over the processes (CUDA: allocated; CPU: resident set); ETA: the remaining
steps at the pace since training (re)started, evaluations and saves included.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from transformers import PrinterCallback, ProgressCallback
from transformers.trainer_callback import tqdm  # the tqdm the Trainer draws its bars with

from herd.console import interactive


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def step_line(step: int, max_steps: int, metrics: dict[str, Any], eta_s: float | None) -> str:
    """herd's line for one logging step, from the tracker's metrics (herd's names)."""
    peaks = [v for k, v in metrics.items() if k.startswith("memory/peak_gib_rank")]
    mfu = metrics.get("train/mfu")
    return (
        f"train step {step}/{max_steps}: loss {_number(metrics.get('train/loss'), '.4f')}  "
        f"lr {_number(metrics.get('train/learning_rate'), '.2e')}  "
        f"grad norm {_number(metrics.get('train/grad_norm'), '.3f')}  "
        f"{_number(metrics.get('train/tokens_per_s'), '.0f')} tok/s  "
        f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}  "
        f"peak mem {_number(max(peaks) if peaks else None, '.2f')} GiB  "
        f"ETA {format_duration(eta_s)}"
        + (f"  reward margin {metrics['train/rewards/margins']:.4f}" if "train/rewards/margins" in metrics else "")
    )


def print_line(line: str) -> None:
    """A line on stdout that leaves a progress bar drawn below it intact, flushed (a pipe buffers)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class ProgressBar(ProgressCallback):
    """The Trainer's progress bars (training, evaluation) without the logs dict it writes under them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def use_herd_console(trainer) -> None:
    """Replace the Trainer's printing callbacks: no logs dict printed; the bar only on a terminal (herd's
    line per logging step comes from HerdTracker). The arguments' `disable_tqdm` should be
    `not interactive()`, to match."""
    for kind in (PrinterCallback, ProgressCallback):
        while any(isinstance(c, kind) for c in trainer.callback_handler.callbacks):
            trainer.remove_callback(kind)
    for callback in list(trainer.callback_handler.callbacks):  # in a notebook: its own progress widget
        if type(callback).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(callback)
    if interactive():
        trainer.add_callback(ProgressBar())
