"""Preemption, time limits and interrupts: a signal -> a complete checkpoint at the next optimizer step -> exit.

SLURM (slurm/train.sbatch) sends SIGUSR1 to every rank some minutes before the time limit or on preemption;
SIGTERM (a plain scancel, a node draining, `kill`) and SIGINT (Ctrl-C) are treated alike, so a run stopped any
of these ways resumes from the step it reached. A second SIGINT stops at once (Python's KeyboardInterrupt).
SIGTERM also means "stop now" (a launcher whose other rank failed sends it, and the rank it reaches may be
blocked in a collective that will never complete): SIGTERM_GRACE_S after it, a process still running ends as
SIGTERM would have ended it (exit -15), checkpoint or not; SLURM's KillWait and torch's launcher (30 s each)
send SIGKILL soon after anyway.
The handler only sets a flag; at the end of each optimizer step the ranks agree (an all-reduce of the flag:
each rank may see the signal before a different step) to save a checkpoint and stop together. The recipe then
exits with PREEMPTED_EXIT, the batch script requeues the job, and the requeued job resumes from that
checkpoint (same run directory).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from herd.dist import close_process_group, rank

PREEMPTED_EXIT = 124  # the batch script requeues on this status (or whenever it forwarded a USR1)
INTERRUPTED_EXIT = 130  # Ctrl-C: the shell's status for SIGINT; not requeued
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def sigterm_grace_s() -> float:
    return float(os.environ.get("HERD_SIGTERM_GRACE_S", "20"))


def _watch_for_sigterm(grace_s: float) -> None:
    """End this process as SIGTERM would have, grace_s after one arrives. Python runs signal handlers in the
    main thread between bytecodes only, so a rank blocked inside a collective never runs its handler; the
    signal's number reaches this thread at once through signal.set_wakeup_fd. The grace is read when the
    watch starts: read after the signal, it would depend on when this thread happens to run."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read_end, 64):
            pass
        time.sleep(grace_s)
        ctypes.CDLL(None).signal(signal.SIGTERM, 0)  # SIG_DFL at the C level: signal.signal is main-thread only
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="herd-sigterm-grace", daemon=True).start()


_received = False  # any Preemption handler of this process got its signal


def signal_received() -> bool:
    """True once this process received the stop signal (for herd.training.faults' hold)."""
    return _received


class Preemption(TrainerCallback):
    """Create it before loading the model, so that a signal arriving during loading is not lost."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.requested = False  # this rank got a signal
        self.interrupted = False  # ... and it was Ctrl-C
        self.stopped = False  # training stopped for it, after a checkpoint
        for signum in signals:
            signal.signal(signum, self._on_signal)
        if signal.SIGTERM in signals:
            _watch_for_sigterm(sigterm_grace_s())

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
            self.interrupted = True
            if rank() == 0:
                print("herd: interrupted: saving a checkpoint after this step, then stopping "
                      "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        global _received
        self.requested = _received = True  # otherwise only flags: the handler may run between any two bytecodes

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
        """After trainer.train(): once every rank has finished saving, exit with PREEMPTED_EXIT (requeued
        by the batch script), or INTERRUPTED_EXIT after Ctrl-C."""
        if not self.stopped:
            return
        close_process_group()  # waits until every rank has saved; a clean end, as after a finished run
        status = INTERRUPTED_EXIT if self.interrupted else PREEMPTED_EXIT
        if rank() == 0:
            print(f"herd: checkpoint saved after the stop signal; exiting with {status}"
                  + ("" if self.interrupted else " for the job to be requeued")
                  + "; the same command resumes", flush=True)
        sys.exit(status)
