"""Train on SLURM: render slurm/train.sbatch for a cluster described in conf/cluster/, and submit it.

    python -m herd.slurm render [cluster=NAME] [cluster.KEY=VALUE ...] [train overrides ...]
    python -m herd.slurm submit [--wait] [cluster=NAME] [cluster.KEY=VALUE ...] [train overrides ...]
    python -m herd.slurm submit -m train.learning_rate=1e-4,2e-4,3e-4 [...]   # a sweep: ONE job array
    python -m herd.slurm submit --config-dir ~/my-conf cluster=mysite experiment=mine    # your own configs

`render` validates the training config (a bad key is refused here, not after hours in the queue), decides the
run directory, writes the job script there (the #SBATCH lines from the cluster config, the overrides baked in)
and prints the sbatch command; `submit` also runs it. With -m, the sweep is expanded as Hydra's multirun would
expand it; each combination becomes one task of a job array, with its own run directory <sweep dir>/<index>.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from herd.config.cluster import ClusterConfig, register_cluster_schema, time_seconds
from herd.config.train import check_process_count, gradient_accumulation
from herd.errors import ConfigError, HerdError
from herd.paths import REPO_ROOT

TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch"
SETUP_BEGIN = "# >>> herd setup"
SETUP_END = "# <<< herd setup"
SWEEP_FILE = "overrides.txt"
SCRIPT = "train.sbatch"


@dataclass
class Job:
    """A rendered job: where its script is and how to submit it."""

    script: Path
    log: str  # the --output pattern
    run_dirs: list[Path]
    array: str | None = None

    def sbatch_command(self) -> list[str]:
        return ["sbatch", str(self.script)]


def procs_per_node(cluster: ClusterConfig) -> int:
    return cluster.gpus_per_node if cluster.gpus_per_node > 0 else cluster.procs_per_node


def sbatch_options(cluster: ClusterConfig, output: str, array: str | None = None) -> list[str]:
    """The #SBATCH options for a cluster config (refused in one line when SLURM could not use them)."""
    if cluster.nodes < 1 or cluster.gpus_per_node < 0 or cluster.procs_per_node < 1:
        raise ConfigError("cluster.nodes and cluster.procs_per_node must be >= 1, cluster.gpus_per_node >= 0")
    limit = time_seconds(cluster.time)
    if not 0 < cluster.signal_seconds <= 65535 or (limit is not None and cluster.signal_seconds >= limit):
        raise ConfigError(f"cluster.signal_seconds={cluster.signal_seconds} must be positive and below the time "
                          f"limit (cluster.time={cluster.time}): the job needs time to run before it checkpoints")
    options = [f"--job-name={cluster.job_name}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1"]
    if cluster.gpus_per_node:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    for flag, value in (("cpus-per-task", cluster.cpus_per_task), ("mem", cluster.mem),
                        ("partition", cluster.partition), ("account", cluster.account), ("qos", cluster.qos),
                        ("constraint", cluster.constraint)):
        if value is not None:
            options.append(f"--{flag}={value}")
    if cluster.exclusive:
        options.append("--exclusive")
    options += [f"--time={cluster.time}", f"--signal=B:USR1@{cluster.signal_seconds}",
                "--requeue" if cluster.requeue else "--no-requeue", "--open-mode=append", f"--output={output}"]
    if array:
        options.append(f"--array={array}")
    options += cluster.extra_sbatch
    for option in options:
        # sbatch reads #SBATCH lines itself: no shell quoting or expansion happens there.
        if any(c.isspace() for c in option) or "$" in option:
            raise ConfigError(f"sbatch option '{option}' contains whitespace or '$': #SBATCH lines are not "
                              "expanded by a shell")
    return options


def render_script(template: str, options: list[str], setup: list[str]) -> str:
    """The template with its #SBATCH lines replaced by `options` and `setup` inside its setup block."""
    lines = template.splitlines()
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    begin = next(i for i, line in enumerate(lines) if line.startswith(SETUP_BEGIN))
    end = next(i for i, line in enumerate(lines) if line.startswith(SETUP_END))
    if not sbatch or not sbatch[-1] < begin < end:
        raise HerdError("slurm template: expected #SBATCH lines, then the herd setup block")
    rendered = (lines[:sbatch[0]] + [f"#SBATCH {option}" for option in options]
                + [line for line in lines[sbatch[0]:begin + 1] if not line.startswith("#SBATCH")]
                + setup + lines[end:])
    return "\n".join(rendered) + "\n"


def split_arguments(argv: list[str]) -> tuple[list[str], list[str], set[str], list[str]]:
    """(cluster overrides, train overrides, flags, the user's config folders) from the command line. The
    folders (--config-dir DIR, hydra.searchpath=[...]) are absolute file:// URIs, searched after conf/ for
    the cluster and the training config alike."""
    from herd.cli import user_search_path

    search_path, argv = user_search_path(argv)
    argv = [arg for arg in argv if not arg.startswith("hydra.searchpath=")]
    cluster, train, flags = [], [], set()
    for arg in argv:
        if arg.startswith("-"):
            flags.add({"--multirun": "-m"}.get(arg, arg))
        elif arg.lstrip("+~").startswith(("cluster=", "cluster.")):
            cluster.append(arg)
        else:
            train.append(arg)
    unknown = flags - {"-m", "--wait"}
    if unknown:
        raise ConfigError(f"unknown option {min(unknown)}; allowed: -m/--multirun, --wait (submit), --config-dir DIR")
    return cluster, train, flags, search_path


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of the sweep overrides, in the order Hydra's basic sweeper runs them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.get_key_element() for o in parsed]
    for o in parsed:
        if o.is_sweep_override() and keys.count(o.get_key_element()) > 1:
            raise ConfigError(f"'{o.get_key_element()}' is swept and also set elsewhere on the command line "
                              "(the last one would win); give it once")
    choices = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
        else [o.input_line] for o in parsed
    ]
    return [list(combination) for combination in itertools.product(*choices)]


def compose_cluster(overrides: list[str], search_path: list[str] | None = None) -> ClusterConfig:
    from herd.cli import check_config

    register_cluster_schema()
    cfg = check_config("slurm", overrides, search_path or [])
    return OmegaConf.to_object(cfg.cluster)


def compose_train(overrides: list[str], run_id: str, search_path: list[str] | None = None) -> DictConfig:
    """The resolved training config, refused in one line if bad; HERD_RUN_ID as the job will not know it."""
    from herd.cli import check_config
    from herd.config.train import register_train_schema

    register_train_schema()
    cfg = check_config("train", overrides, search_path or [])
    previous = os.environ.get("HERD_RUN_ID")
    os.environ["HERD_RUN_ID"] = run_id
    try:
        OmegaConf.resolve(cfg)
    finally:
        if previous is None:
            os.environ.pop("HERD_RUN_ID")
        else:
            os.environ["HERD_RUN_ID"] = previous
    return cfg


def check_launch(cfg: DictConfig, cluster: ClusterConfig) -> None:
    """What the job would refuse only after queueing and loading: the strategy, the batch split, the user's
    DeepSpeed JSON against herd's settings (bf16 where the nodes have GPUs and train.precision is auto)."""
    from herd.config.launch import check_deepspeed_file, deepspeed_file, read_deepspeed_file

    processes = cluster.nodes * procs_per_node(cluster)
    where = f"{cluster.nodes} node(s) x {procs_per_node(cluster)} process(es)"
    check_process_count(cfg.strategy.name, processes, f"the job runs {processes} processes ({where})")
    gradient_accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, processes)
    job = OmegaConf.to_object(cfg)
    found = deepspeed_file(job, env={})  # the job's own accelerate launch carries no config file
    if found is not None:
        precision = job.train.precision.value
        bf16 = precision == "bf16" or (precision == "auto" and cluster.gpus_per_node > 0)
        check_deepspeed_file(read_deepspeed_file(*found), found[1], job, bf16, processes)


def _without_key(overrides: list[str], key: str) -> list[str]:
    return [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]


def _fresh_dir(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _absolute(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else (Path.cwd() / path).resolve()


def render(cluster_overrides: list[str], train_overrides: list[str], sweep: bool = False,
           stamp: str | None = None, search_path: list[str] | None = None) -> Job:
    """Validate, decide the run directory (or sweep directory), write the job script there. `search_path`:
    the user's config folders (absolute), searched by this check and, baked into the script, by the job."""
    from herd.cli import searchpath_override

    search_path = search_path or []
    cluster = compose_cluster(cluster_overrides, search_path)
    stamp = stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
    if not sweep and len(expand_sweep(train_overrides)) > 1:
        raise ConfigError("the overrides hold a sweep (a,b or range(...)); add -m (--multirun) to submit it as "
                          "a job array, or quote the value")
    tasks = expand_sweep(train_overrides) if sweep else [train_overrides]
    configs = [compose_train(task, stamp, search_path) for task in tasks]
    for cfg in configs:
        check_launch(cfg, cluster)
    explicit_dir = any(o.lstrip("+").partition("=")[0] == "output_dir" for o in train_overrides)

    # the job reads the same config folders and files
    baked = [searchpath_override(search_path)] if search_path else []
    deepspeed_files = {cfg.strategy.deepspeed_config for cfg in configs} - {None}
    if len(deepspeed_files) == 1 and not Path(next(iter(deepspeed_files))).expanduser().is_absolute():
        # the job runs in the repository, not where this was rendered: the file as an absolute path
        baked.append(f"strategy.deepspeed_config={_absolute(str(Path(next(iter(deepspeed_files))).expanduser()))}")
    setup = [f"# rendered by: python -m herd.slurm render {shlex.join(cluster_overrides + train_overrides + baked)}",
             f"export HERD_REPO={shlex.quote(str(REPO_ROOT))}", 'cd "$HERD_REPO"']
    if cluster.gpus_per_node == 0:
        setup.append(f"export HERD_PROCS_PER_NODE={cluster.procs_per_node}")
    if cluster.setup:
        # Module files and activate scripts often read unset variables, and shellcheck cannot follow them.
        setup += ["# shellcheck disable=SC1090,SC1091", "{", "set +u", *cluster.setup, "set -u", "}"]

    if not sweep:
        run_dir = _absolute(configs[0].output_dir)
        if not explicit_dir:
            run_dir = _fresh_dir(run_dir)
        overrides = _without_key(train_overrides, "output_dir") + [f"output_dir={run_dir}"] + baked
        setup.append(f"set -- {shlex.join(overrides)} \"$@\"")
        job_dir, log, array, run_dirs = run_dir, str(run_dir / "slurm-%j.out"), None, [run_dir]
    else:
        if len({o for task in tasks for o in task if o.lstrip("+").startswith("output_dir=")}) > 1:
            raise ConfigError("output_dir cannot be swept: give one output_dir, the sweep directory; "
                              "each task runs in <output_dir>/<index>")
        job_dir = _absolute(configs[0].output_dir) if explicit_dir else _fresh_dir(
            _absolute(f"runs/sweep-{stamp}"))
        run_dirs = [job_dir / str(i) for i in range(len(tasks))]
        setup.append(f"export HERD_SWEEP_FILE={shlex.quote(str(job_dir / SWEEP_FILE))}")
        array = f"0-{len(tasks) - 1}" + (f"%{cluster.array_parallelism}" if cluster.array_parallelism else "")
        log = str(job_dir / "slurm-%A_%a.out")

    options = sbatch_options(cluster, log, array)  # refuses before anything is written
    job_dir.mkdir(parents=True, exist_ok=True)
    if sweep:
        lines = [shlex.join(_without_key(task, "output_dir") + [f"output_dir={d}"] + baked)
                 for task, d in zip(tasks, run_dirs)]
        (job_dir / SWEEP_FILE).write_text("\n".join(lines) + "\n")
    script = job_dir / SCRIPT
    script.write_text(render_script(TEMPLATE.read_text(), options, setup))
    script.chmod(0o755)
    return Job(script=script, log=log, run_dirs=run_dirs, array=array)


def submit(job: Job, wait: bool = False) -> tuple[str, int]:
    """Run sbatch; returns (job id, sbatch's exit status: with --wait, the job's)."""
    command = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(job.script)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    job_id = process.stdout.readline().strip().split(";")[0]
    if job_id:
        print(f"herd: submitted job {job_id}; log {job.log}", flush=True)
    process.stdout.read()
    return job_id, process.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("render", "submit"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        cluster_overrides, train_overrides, flags, search_path = split_arguments(argv[1:])
        job = render(cluster_overrides, train_overrides, sweep="-m" in flags, search_path=search_path)
    except HerdError as error:
        print(f"herd: invalid config: {error}", file=sys.stderr)
        return 2
    what = (f"{len(job.run_dirs)} array tasks in {job.script.parent}" if job.array
            else f"run directory {job.run_dirs[0]}")
    print(f"herd: wrote {job.script} ({what})", file=sys.stderr)
    if argv[0] == "render":
        print(shlex.join(job.sbatch_command()))
        return 0
    try:
        _, status = submit(job, wait="--wait" in flags)
    except FileNotFoundError:
        print("herd: sbatch not found: submit from a SLURM login node (or run the command above there)",
              file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
