"""The typed schema of a SLURM cluster (conf/cluster/*.yaml) for `python -m herd.slurm`, registered with Hydra."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from herd.config.checks import checked
from herd.errors import ConfigError


def time_seconds(limit: str) -> int | None:
    """SLURM's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None = no limit."""
    if limit.upper() in ("INFINITE", "UNLIMITED"):
        return None
    try:
        days, _, clock = limit.rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if days:
            hours, minutes, seconds = (parts + [0, 0])[:3]
        elif len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        else:
            hours, minutes, seconds = parts
        if len(parts) > 3 or min(parts) < 0:
            raise ValueError
        return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    except ValueError:
        raise ConfigError(f"cluster.time='{limit}' is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)") from None


def slurm_time_rule(value: str) -> str | None:
    try:
        time_seconds(str(value))
    except ConfigError:
        return "is not a SLURM time limit (MM, HH:MM:SS or D-HH:MM:SS)"
    return None


@dataclass
class ClusterConfig:
    name: str = MISSING
    partition: str | None = None  # None = the cluster's default partition
    account: str | None = None  # the allocation to charge, on clusters that require one
    qos: str | None = None
    # Wall-clock limit per job (SLURM format: MM, HH:MM:SS, D-HH:MM:SS). Longer runs are fine: near the limit
    # the job checkpoints and requeues itself, and resumes.
    time: str = checked("24:00:00", rule=slurm_time_rule)
    nodes: int = checked(1, at_least=1)
    gpus_per_node: int = checked(0, at_least=0)  # one training rank per GPU; 0 = CPU-only nodes, see procs_per_node
    procs_per_node: int = checked(1, at_least=1)  # ranks per node on CPU-only nodes (ignored when gpus_per_node > 0)
    # CPUs for one node's launcher task and all its ranks (data loading, tokenization); None = SLURM's
    # default, which on clusters that bind tasks to CPUs may be a single CPU for all ranks of a node.
    cpus_per_task: int | None = checked(None, at_least=1)
    mem: str | None = None  # memory per node, e.g. 480G; "0" = all of it; None = the partition's default
    constraint: str | None = None  # node features, e.g. "a100|h100"
    exclusive: bool = False  # whole nodes, shared with no other job
    # USR1 this many seconds before the time limit: enough to finish one optimizer step and save a
    # checkpoint (SLURM may deliver it up to 60 s late).
    signal_seconds: int = checked(300, at_least=0)
    requeue: bool = True  # on preemption, node failure or the time limit: requeue and resume
    array_parallelism: int | None = checked(None, at_least=1)  # sweeps: at most this many array tasks at once
    job_name: str = "herd-train"
    extra_sbatch: list[str] = field(default_factory=list)  # more options, e.g. ["--mail-type=END,FAIL"]
    setup: list[str] = field(default_factory=list)  # shell lines run first, in the repo (module load, venv)


@dataclass
class SlurmConfig:
    cluster: ClusterConfig = MISSING


def register_cluster_schema() -> None:
    ConfigStore.instance().store(name="slurm_schema", node=SlurmConfig)
