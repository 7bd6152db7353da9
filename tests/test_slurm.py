"""SLURM: the job templates, rendering them from conf/cluster/, and real jobs on a local cluster.

The `slurm` tests start a real SLURM cluster once per session (scripts/slurm-cluster-up: Debian's slurm-wlm,
installed beforehand by `make system-packages`; two slurmd "nodes" on this host) and stop it at the end. Each
job trains the tiny model for a few steps on CPU. Where the cluster cannot run (no packages, not root) these
tests skip, except under CI (CI=true), where a skipped layer would vanish unnoticed: there they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from herd import slurm
from herd.errors import ConfigError
from tests.conftest import FAST_TRAIN, OFFLINE_ENV, REPO

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
SCRIPTS = [REPO / "scripts" / "slurm-cluster-up", REPO / "scripts" / "slurm-cluster-down",
           REPO / "scripts" / "install-system-packages"]

# Two ranks split a global batch of 4; logging every step shows when training has started; checkpoints only
# when preempted.
JOB_TRAIN = [o for o in FAST_TRAIN if not o.startswith(("train.micro_batch_size", "train.logging_steps"))] + [
    "train.micro_batch_size=2", "train.logging_steps=1", "train.eval_before_train=false", "train.save_steps=1000",
    "train.eval_steps=1000", "data.max_samples=64",
]
STEPS = 12
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cannot_run(reason: str) -> None:
    """Skip a layer that cannot run on this machine; fail under CI (CI=true), which installs what the layer
    needs (make system-packages) and must not lose it silently."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: this layer must run; `make system-packages` installs its packages)")
    pytest.skip(reason)


# ---- templates and rendering (no cluster) -------------------------------------------------------------


@pytest.fixture(scope="session")
def shellcheck() -> str:
    found = shutil.which("shellcheck")
    if not found:
        cannot_run("shellcheck is not installed (make system-packages)")
    return found


def render(tmp_path: Path, *args: str, sweep: bool = False):
    return slurm.render([a for a in args if a.startswith("cluster")],
                        [a for a in args if not a.startswith("cluster")], sweep=sweep, stamp="20260101-000000")


@pytest.mark.parametrize("script", TEMPLATES + SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n_and_shellcheck(script, shellcheck):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_rendered_script_has_the_cluster_options_and_the_overrides(tmp_path, shellcheck):
    run_dir = tmp_path / "run"
    job = render(tmp_path, "cluster=default", "cluster.partition=gpu", "cluster.nodes=2", "cluster.account=proj1",
                 "cluster.setup=[module load cuda/12.4,source .venv/bin/activate]",
                 "model=tiny", "strategy=ddp", "train.global_batch_size=16", "train.micro_batch_size=1",
                 "data.system_prompt='Be brief, and kind'", f"output_dir={run_dir}")
    text = job.script.read_text()
    assert job.script == run_dir / "train.sbatch" and job.run_dirs == [run_dir]
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, re.MULTILINE)
    assert sbatch == ["--job-name=herd-train", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--cpus-per-task=64", "--mem=0", "--partition=gpu", "--account=proj1", "--exclusive",
                      "--time=24:00:00", "--signal=B:USR1@600", "--requeue", "--open-mode=append",
                      f"--output={run_dir}/slurm-%j.out"]
    assert "module load cuda/12.4\nsource .venv/bin/activate\n" in text
    # The overrides are baked in, quoted for bash: the run directory holds a script that reruns it.
    baked = re.search(r"^set -- (.*) \"\$@\"$", text, re.MULTILINE).group(1)
    words = subprocess.run(["bash", "-c", f'printf "%s\\n" {baked}'], capture_output=True, text=True).stdout
    assert words.splitlines() == ["model=tiny", "strategy=ddp", "train.global_batch_size=16",
                                  "train.micro_batch_size=1", "data.system_prompt='Be brief, and kind'",
                                  f"output_dir={run_dir}"]
    assert subprocess.run([shellcheck, str(job.script)], capture_output=True).returncode == 0
    assert subprocess.run(["bash", "-n", str(job.script)]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["cluster=local", "cluster.nodez=2"], "unknown key 'cluster.nodez'"),
    (["cluster=nope"], "unknown option 'nope'"),
    (["cluster=local", "train.lr=1"], "unknown key 'train.lr'"),
    (["cluster=local", "cluster.procs_per_node=2"], "strategy=single but the job runs 2 processes"),
    (["cluster=local", "cluster.nodes=2", "strategy=ddp", "train.global_batch_size=3"], "not divisible"),
    (["cluster=local", "cluster.time=1:00"], "signal_seconds=60 must be positive and below the time limit"),
    (["cluster=local", "cluster.partition=a b"], "contains whitespace"),
])
def test_render_refuses_what_the_job_would_refuse_after_queueing(tmp_path, args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render(tmp_path, *args, f"output_dir={tmp_path}/run")
    assert not (tmp_path / "run").exists()


def test_render_command_line_refuses_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "herd.slurm", "render", "cluster=local", "train.lr=1",
                             f"output_dir={tmp_path}/x"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("herd: invalid config: unknown key 'train.lr'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_sweep_becomes_one_job_array(tmp_path):
    sweep_dir = tmp_path / "sweep"
    job = render(tmp_path, "cluster=local", "cluster.array_parallelism=2", "train.learning_rate=1e-4,2e-4,3e-4",
                 "train.seed=range(2)", "model=tiny", f"output_dir={sweep_dir}", sweep=True)
    assert job.array == "0-5%2" and job.script == sweep_dir / "train.sbatch"
    assert job.run_dirs == [sweep_dir / str(i) for i in range(6)]
    lines = (sweep_dir / "overrides.txt").read_text().splitlines()
    assert lines[0] == f"train.learning_rate=0.0001 train.seed=0 model=tiny output_dir={sweep_dir}/0"
    assert lines[5] == f"train.learning_rate=0.0003 train.seed=1 model=tiny output_dir={sweep_dir}/5"
    text = job.script.read_text()
    assert "#SBATCH --array=0-5%2\n" in text and f"#SBATCH --output={sweep_dir}/slurm-%A_%a.out\n" in text
    assert f"export HERD_SWEEP_FILE={sweep_dir}/overrides.txt\n" in text
    with pytest.raises(ConfigError, match="swept and also set elsewhere"):
        render(tmp_path, "cluster=local", "train.learning_rate=1e-4,2e-4", "train.learning_rate=3e-3", sweep=True)
    with pytest.raises(ConfigError, match="hold a sweep"):
        render(tmp_path, "cluster=local", "train.learning_rate=1e-4,2e-4")


def test_default_run_directory_is_new_for_every_render(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = render(tmp_path, "cluster=local", "model=tiny").run_dirs[0]
    second = render(tmp_path, "cluster=local", "model=tiny").run_dirs[0]
    assert first == tmp_path / "runs" / "tiny-20260101-000000"
    assert second == tmp_path / "runs" / "tiny-20260101-000000-2"


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("10:05", 605), ("01:00:00", 3600), ("2-00", 172800),
                                            ("1-02:03:04", 93784), ("INFINITE", None)])
def test_time_limits_in_slurm_formats(limit, seconds):
    assert slurm.time_seconds(limit) == seconds


@pytest.mark.parametrize("signum, status", [(signal.SIGUSR1, 124), (signal.SIGTERM, 124), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_and_stops_at_the_next_step(signum, status, monkeypatch):
    from herd.training.preempt import STOP_SIGNALS, Preemption

    monkeypatch.setenv("HERD_SIGTERM_GRACE_S", "1e9")  # this process is the test run: SIGTERM's deadline never comes
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        callback = Preemption()
        args = SimpleNamespace(device="cpu")
        state = SimpleNamespace(global_step=3, is_world_process_zero=True)
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_step_end(args, state, control)
        assert not control.should_save and not callback.stopped
        callback.exit_if_stopped()  # no signal: training goes on to the end
        os.kill(os.getpid(), signum)
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and callback.stopped
        with pytest.raises(SystemExit) as stopped:
            callback.exit_if_stopped()
        assert stopped.value.code == status
        if signum == signal.SIGINT:  # a second Ctrl-C does not wait for the step
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(-1)


def test_a_process_still_running_after_sigterm_grace_ends_as_sigterm_would():
    """A rank blocked where no step ends (a peer died inside a collective) must not outlive the launcher's
    SIGTERM: HERD_SIGTERM_GRACE_S after it, it ends with -15, what torch's launcher expects."""
    code = ("import os, signal, time; from herd.training.preempt import Preemption; p = Preemption(); "
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)")
    blocked = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HERD_SIGTERM_GRACE_S": "0.5"},
                             timeout=50)
    assert blocked.returncode == -signal.SIGTERM


# ---- a real cluster ------------------------------------------------------------------------------------


def free_port_block(size: int) -> int:
    """A base port with `size` free ports above it, away from the jobs' rendezvous ports (20000-39999)."""
    for base in range(41000 + os.getpid() % 100 * 50, 60000, 50):
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for slurmctld/slurmd")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running local cluster: (environment for the SLURM commands, state directory). Stopped at the end."""
    state = tmp_path_factory.mktemp("slurm")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        cannot_run(f"cannot start a local SLURM cluster: {', '.join(missing)} not installed (make system-packages)")
    if os.geteuid() != 0:
        cannot_run("cannot start a local SLURM cluster: needs root (slurmd, /etc/hosts)")
    env = {**os.environ, **OFFLINE_ENV, "HERD_SLURM_PORT": str(free_port_block(4)),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.monotonic()
    up = subprocess.run([str(SCRIPTS[0]), str(state)], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"slurm-cluster-up failed:\n{up.stdout}\n{up.stderr}"
    print(f"\nslurm cluster up in {time.monotonic() - started:.1f} s", flush=True)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env, state
    finally:
        subprocess.run([str(SCRIPTS[1]), str(state)], env=env, capture_output=True, timeout=300)


@dataclass
class Job:
    """A submitted job; wait() polls it to its end (once) and returns its final state."""

    env: dict
    job_id: str
    log: Path  # the log (for an array: its directory's slurm-*.out files)
    run_dir: Path
    label: str
    state: str | None = None

    def wait(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while self.state is None:
            states = job_states(self.env, self.job_id)
            if states and all(s in TERMINAL for s in states):
                self.state = next((s for s in states if s != "COMPLETED"), "COMPLETED")
                print(f"\n{self.label}: {self.elapsed()} s from submission to end", flush=True)
            elif time.monotonic() > deadline:
                subprocess.run(["scancel", self.job_id], env=self.env)
                raise AssertionError(f"job {self.job_id} still {states} after {timeout} s\n{self.text()[-3000:]}")
            else:
                time.sleep(0.5)
        return self.state

    def elapsed(self) -> int:
        """Seconds from submission to the end of the last task, by SLURM's clock."""
        out = subprocess.run(["scontrol", "show", "job", "-o", self.job_id], env=self.env, capture_output=True,
                             text=True).stdout
        submit = min(datetime.fromisoformat(t) for t in re.findall(r"SubmitTime=(\S+)", out))
        end = max(datetime.fromisoformat(t) for t in re.findall(r"EndTime=(\S+)", out))
        return int((end - submit).total_seconds())

    def text(self) -> str:
        logs = sorted(self.log.glob("slurm-*.out")) if self.log.is_dir() else [self.log]
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())

    def wait_for_text(self, pattern: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            states = job_states(self.env, self.job_id)
            if states and all(s in TERMINAL for s in states):
                raise AssertionError(f"job {self.job_id} ended ({states}) before '{pattern}':\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no '{pattern}' in {self.log} after {timeout} s")
            time.sleep(0.5)


def job_states(env: dict, job_id: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return re.findall(r"JobState=(\S+)", out)


def submit_train(env: dict, out: Path, label: str, *sbatch_args: str, steps: int = STEPS,
                 overrides: list[str] = JOB_TRAIN) -> Job:
    """sbatch slurm/train.sbatch directly, as a user would, from the repository root."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={out / 'job.out'}", *sbatch_args, str(REPO / "slurm" / "train.sbatch"),
         *overrides, "strategy=ddp", f"train.max_steps={steps}", f"output_dir={out / 'run'}"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return Job(env, result.stdout.strip().split(";")[0], out / "job.out", out / "run", label)


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# The jobs are submitted by fixtures and run side by side on the two nodes; each test waits for its own.
# The preemption test asks for all of them, so that one pytest run starts them together.


HOLD_AT = 3  # the preempted job's ranks stop after this step until USR1 arrives (herd.training.faults)


@pytest.fixture(scope="module")
def preempted_job(cluster, tmp_path_factory, tiny_model_dir) -> Job:
    """Two ranks on one CPU-only node (HERD_PROCS_PER_NODE), to be sent USR1 mid-training: they hold after
    step HOLD_AT until the signal arrives, so it cannot come after the last step however fast the steps are
    (the requeued job resumes past that step and does not hold again)."""
    env, _ = cluster
    return submit_train({**env, "HERD_PROCS_PER_NODE": "2", "HERD_DEBUG_HOLD_AT_STEP": str(HOLD_AT)},
                        tmp_path_factory.mktemp("preempted"), "preempted job (checkpoint, requeue, resume)")


# DPO on the bundled pairs (method=dpo), from the base: the same launcher, callbacks and requeue as SFT.
DPO_JOB = ["method=dpo", "model=tiny", "data.max_samples=32", "data.max_seq_len=384", "data.eval_size=4",
           "train.global_batch_size=4", "train.micro_batch_size=2", "train.logging_steps=1",
           "train.eval_before_train=false", "train.save_steps=1000", "train.eval_steps=1000"]
DPO_STEPS = 6


@pytest.fixture(scope="module")
def preempted_dpo_job(cluster, tmp_path_factory, tiny_model_dir) -> Job:
    """preempted_job's twin for method=dpo."""
    env, _ = cluster
    return submit_train({**env, "HERD_PROCS_PER_NODE": "2", "HERD_DEBUG_HOLD_AT_STEP": str(HOLD_AT)},
                        tmp_path_factory.mktemp("preempted_dpo"), "preempted DPO job", steps=DPO_STEPS,
                        overrides=DPO_JOB)


@pytest.fixture(scope="module")
def single_node_job(cluster, tmp_path_factory, tiny_model_dir) -> Job:
    """Two ranks on one node from two (fake) GPUs: SLURM_GPUS_ON_NODE. Also the uninterrupted reference."""
    env, _ = cluster
    return submit_train(env, tmp_path_factory.mktemp("single"), "single-node 2-rank job", "--gpus-per-node=2")


@pytest.fixture(scope="module")
def two_node_job(cluster, tmp_path_factory, tiny_model_dir) -> Job:
    env, _ = cluster
    return submit_train({**env, "HERD_PROCS_PER_NODE": "1"}, tmp_path_factory.mktemp("two_nodes"), "2-node job",
                        "--nodes=2", steps=4)


@pytest.fixture(scope="module")
def sweep_job(cluster, tmp_path_factory, tiny_model_dir) -> Job:
    """python -m herd.slurm submit -m: a learning-rate sweep as one 3-task job array (cluster=local)."""
    env, _ = cluster
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    overrides = [o for o in JOB_TRAIN if not o.startswith("train.learning_rate")]
    result = subprocess.run([sys.executable, "-m", "herd.slurm", "submit", "cluster=local",
                             "-m", "train.learning_rate=1e-3,2e-3,3e-3", *overrides, "train.max_steps=3",
                             f"output_dir={sweep_dir}"], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    return Job(env, job_id, sweep_dir, sweep_dir, "3-task array")


def preempt_and_requeue(job: Job, steps: int) -> dict:
    """USR1 to a job held after step HOLD_AT: it checkpoints, requeues and resumes to `steps`; its metrics."""
    # both ranks hold after step HOLD_AT (every rank handles USR1 from before loading the model on)
    job.wait_for_text(rf"rank 1 holds after step {HOLD_AT} until SIGUSR1")
    job.wait_for_text(rf"rank 0 holds after step {HOLD_AT} until SIGUSR1")
    # What SLURM does near the time limit (--signal=B:USR1@...) or at preemption, without waiting for either.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], env=job.env, check=True)
    state = job.wait()
    text = job.text()
    assert state == "COMPLETED", text[-3000:]
    assert f"herd: preemption signal: saving checkpoint-{HOLD_AT}" in text and "gave up waiting" not in text
    assert f"requeueing job {job.job_id}" in text and "restart 1 on" in text
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == f"checkpoint-{HOLD_AT}", metrics
    assert metrics["global_step"] == steps
    assert json.loads((job.run_dir / "manifest.json").read_text())["restart_count"] == 1
    return metrics


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_adapter(preempted_job, single_node_job, two_node_job,
                                                                    sweep_job, preempted_dpo_job):
    job = preempted_job
    preempt_and_requeue(job, STEPS)
    assert single_node_job.wait() == "COMPLETED", single_node_job.text()[-3000:]
    reference, resumed = adapter_tensors(single_node_job.run_dir), adapter_tensors(job.run_dir)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert (tensor - resumed[name]).abs().max().item() < 1e-4, name


@pytest.mark.slurm
def test_a_dpo_job_is_preempted_requeued_and_resumed(preempted_dpo_job):
    metrics = preempt_and_requeue(preempted_dpo_job, DPO_STEPS)
    assert metrics["method"] == "dpo" and metrics["distributed"]["num_processes"] == 2
    assert metrics["eval_rewards_after"]["rewards/margins"] != 0.0
    # the requeued job continued the run: the steps before the signal are not trained again
    steps = [json.loads(line) for line in (preempted_dpo_job.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [e["step"] for e in steps if e["kind"] == "train"]
    assert sorted(set(trained)) == list(range(1, DPO_STEPS + 1)) and trained.count(1) == 1, trained


@pytest.mark.slurm
def test_single_node_job_trains_with_two_ranks(single_node_job):
    job = single_node_job
    assert job.wait() == "COMPLETED", job.text()[-3000:]
    assert (job.run_dir / "adapter" / "adapter_model.safetensors").exists()
    manifest = json.loads((job.run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed_type"] == "MULTI_CPU"
    assert manifest["environment"]["SLURM_GPUS_ON_NODE"] == "2"
    assert "1 node(s) x 2 process(es) = 2" in job.text()
    assert json.loads((job.run_dir / "metrics.json").read_text())["global_step"] == STEPS


@pytest.mark.slurm
def test_two_nodes_join_one_rendezvous(two_node_job):
    job = two_node_job
    assert job.wait() == "COMPLETED", job.text()[-3000:]
    text = job.text()
    assert "2 node(s) x 1 process(es) = 2" in text
    assert "herd: node n1 is machine rank 0" in text and "herd: node n2 is machine rank 1" in text
    manifest = json.loads((job.run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed_type"] == "MULTI_CPU"
    assert manifest["environment"]["SLURM_JOB_NODELIST"] == "n[1-2]"
    assert (job.run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slurm
def test_sweep_runs_as_one_job_array(sweep_job):
    job = sweep_job
    assert job.wait() == "COMPLETED", job.text()[-4000:]
    run_dirs = sorted(p.parent.parent for p in job.run_dir.glob("*/adapter/adapter_model.safetensors"))
    assert run_dirs == [job.run_dir / str(i) for i in range(3)]
    rates = [json.loads((d / "manifest.json").read_text())["config"]["train"]["learning_rate"] for d in run_dirs]
    assert rates == [1e-3, 2e-3, 3e-3]
    assert len(set(re.findall(r"run id (slurm-\d+_\d)", job.text()))) == 3
