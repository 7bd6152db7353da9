"""One launch per run directory: a live holder is refused by name, a dead or silent one is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from herd.errors import HerdError
from herd.training.run_lock import LOCK, RunLock

HOLD = """
import sys, time
from pathlib import Path
from herd.training.run_lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
Path(sys.argv[2]).write_text("held")
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
lock.release()
"""


def hold_in_another_process(run_dir, tmp_path):
    held, done = tmp_path / "held", tmp_path / "done"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(held), str(done)])
    deadline = time.monotonic() + 60
    while not held.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return holder, done


def test_a_second_launch_is_refused_naming_the_holder_then_runs_once_it_is_released(tmp_path):
    run_dir = tmp_path / "run"
    holder, done = hold_in_another_process(run_dir, tmp_path)
    with pytest.raises(HerdError, match=rf"in use by pid {holder.pid} on .*give another output_dir"):
        RunLock(run_dir).acquire()
    done.write_text("")
    assert holder.wait(timeout=60) == 0 and not (run_dir / LOCK).exists()
    lock = RunLock(run_dir)
    lock.acquire()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_of_a_killed_launch_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder, _ = hold_in_another_process(run_dir, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    lock = RunLock(run_dir)
    lock.acquire()
    assert f"taking over the run directory lock (its holder, pid {holder.pid} on " in capsys.readouterr().out
    lock.release()


def foreign_lock(run_dir, age_s, slurm_job=None):
    run_dir.mkdir(parents=True)
    (run_dir / LOCK).write_text(json.dumps({"host": "another-node", "pid": 4242, "process_start": "1",
                                            "slurm_job": slurm_job, "launch": "x", "since": "then"}))
    old = time.time() - age_s
    os.utime(run_dir / LOCK, (old, old))


def test_a_lock_from_another_host_counts_while_it_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_LOCK_STALE_S", "300")
    foreign_lock(tmp_path / "fresh", age_s=10)
    with pytest.raises(HerdError, match="pid 4242 on another-node"):
        RunLock(tmp_path / "fresh").acquire()
    foreign_lock(tmp_path / "silent", age_s=600)
    RunLock(tmp_path / "silent").acquire()  # its holder stopped refreshing it: gone


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    foreign_lock(tmp_path / "run", age_s=1, slurm_job="777")
    RunLock(tmp_path / "run").acquire()
    foreign_lock(tmp_path / "other", age_s=1, slurm_job="778")
    with pytest.raises(HerdError, match="SLURM job 778"):
        RunLock(tmp_path / "other").acquire()
