"""Preemption and time limits: SIGUSR1 -> a complete checkpoint at the next optimizer step -> exit 124.

SLURM (slurm/train.sbatch) sends SIGUSR1 to every rank some minutes before the time limit or on preemption.
The handler only sets a flag; at the end of each optimizer step the ranks agree (an all-reduce of the flag:
each rank may see the signal before a different step) to save a checkpoint and stop together. The recipe then
exits with PREEMPTED_EXIT, the batch script requeues the job, and the requeued job resumes from that
checkpoint (same run directory).
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from herd.dist import close_process_group, rank

PREEMPTED_EXIT = 124  # the batch script requeues on this status (or whenever it forwarded a USR1)
_received = False  # any Preemption handler of this process got its signal


def signal_received() -> bool:
    """True once this process received the preemption signal (for herd.training.faults' hold)."""
    return _received


class Preemption(TrainerCallback):
    """Create it before loading the model, so that a signal arriving during loading is not lost."""

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.requested = False  # this rank got the signal
        self.stopped = False  # training stopped for it, after a checkpoint
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        global _received
        self.requested = _received = True  # only flags: the handler may run between any two bytecodes

    def _any_rank_requested(self, device) -> bool:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)  # on the GPU for NCCL, on CPU for gloo
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopped and self._any_rank_requested(args.device):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"herd: preemption signal: saving checkpoint-{state.global_step} and stopping", flush=True)
        return control

    def exit_if_stopped(self) -> None:
        """After trainer.train(): once every rank has finished saving, exit with PREEMPTED_EXIT."""
        if not self.stopped:
            return
        close_process_group()  # waits until every rank has saved; a clean end, as after a finished run
        if rank() == 0:
            print(f"herd: checkpoint saved after the preemption signal; exiting with {PREEMPTED_EXIT} for the job "
                  "to be requeued", flush=True)
        sys.exit(PREEMPTED_EXIT)
