"""One launch per run directory: a lock file naming its holder, kept fresh while the run lives.

Two launches into one output_dir would resume from each other's checkpoints and overwrite each other's
files. Rank 0 of a launch takes `<run_dir>/.herd-lock` (created exclusively, so two hosts on a shared
filesystem cannot both win) before it writes anything there, and refreshes its time every HEARTBEAT_S.
A later launch refuses in one line naming the holder, unless the lock is stale:
- held by a process of this host that no longer runs (a SIGKILL, a crash), or
- left by an earlier run of the same SLURM job (a requeue: SLURM runs one incarnation of a job at a time), or
- not refreshed for HERD_LOCK_STALE_S seconds (default 300): its holder on another host is gone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from herd.dist import slurm_job
from herd.errors import HerdError

LOCK = ".herd-lock"
HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_start: str | None  # this host's start tick of the pid: tells a reused pid apart
    slurm_job: str | None
    launch: str | None  # HERD_RUN_ID
    since: str

    @classmethod
    def me(cls) -> Holder:
        job = slurm_job()
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), job.tag if job else None,
                   os.environ.get("HERD_RUN_ID"), time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job} since {self.since}"


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def stale_after_s() -> float:
    return float(os.environ.get("HERD_LOCK_STALE_S", "300"))


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.me = Holder.me()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise HerdError naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us, or by another taker, then try again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(asdict(self.me)) + "\n")
            self._start_heartbeat()
            return
        raise HerdError(f"could not take the lock {self.path}: other launches keep replacing it")

    def _take_over_or_refuse(self) -> None:
        holder, age = self._read()
        reason = self._stale_because(holder, age)
        if reason is None:
            shown = holder.describe() if holder else "a launch that is still writing its lock"
            raise HerdError(f"run directory {self.path.parent} is in use by {shown}; wait for it to end or give "
                            f"another output_dir (if it is gone, delete {self.path})")
        print(f"herd: taking over the run directory lock ({reason})", flush=True)
        try:
            os.replace(self.path, self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
            os.unlink(self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
        except FileNotFoundError:
            pass  # another launch took it over first; the next attempt sees its lock

    def _read(self) -> tuple[Holder | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            return Holder(**json.loads(self.path.read_text())), age
        except FileNotFoundError:
            return None, 0.0
        except (ValueError, TypeError):
            return None, age  # half-written or foreign: judged by its age alone

    def _stale_because(self, holder: Holder | None, age: float) -> str | None:
        if holder is not None and holder.host == self.me.host:
            if holder.pid == self.me.pid:
                return "held by this process"
            running = _process_start(holder.pid)
            if running is None or (holder.process_start is not None and running != holder.process_start):
                return f"its holder, {holder.describe()}, no longer runs"
        if holder is not None and holder.slurm_job and holder.slurm_job == self.me.slurm_job:
            return f"left by an earlier run of SLURM job {holder.slurm_job}"
        if age > stale_after_s():
            return f"not refreshed for {age:.0f} s (HERD_LOCK_STALE_S={stale_after_s():g})"
        return None

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._heartbeat = threading.Thread(target=beat, name="herd-run-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._read()
        if holder is not None and holder.pid == self.me.pid and holder.host == self.me.host:
            self.path.unlink(missing_ok=True)
