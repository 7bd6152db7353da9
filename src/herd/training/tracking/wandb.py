"""W&B for one run directory: the mode (online/offline), safe settings, the run id file, names and groups,
starting, closing and syncing runs.

The id lives in `<run_dir>/wandb_run_id`, so a resumed or requeued job continues the SAME W&B run
(`resume="allow"`). W&B's own collection of argv, environment metadata, code, git state, requirements and
console output is switched off (`wandb_settings`), because any of those can carry a token into
`run-<id>.wandb`.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from herd import dist, rundir
from herd.config.train import TrackingBackend, TrackingConfig
from herd.errors import ConfigError
from herd.paths import atomic_write
from herd.redaction import redact

RUN_ID_FILE = "wandb_run_id"  # the W&B run id, written before wandb.init so a requeued job finds it
RUN_NAMES_FILE = "wandb_run.json"  # id, name, group as W&B got them: for a later job resuming the same run
DEFAULT_BASE_URL = "https://api.forge.coreweave.com"  # wandb 0.31's default host (was api.wandb.ai)


# ---- names, modes and settings -------------------------------------------------------------------------

def experiment_name() -> str | None:
    """The `experiment=` choice of the running Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment") or None
    except (ImportError, ValueError):  # not under @hydra.main (tests, notebooks)
        return None


# W&B's own environment variables, honoured for each key the tracking config leaves unset (null, or no tags):
# the config wins, then the environment, then herd's default.
ENV_VARS = {"project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "group": "WANDB_RUN_GROUP", "tags": "WANDB_TAGS",
            "name": "WANDB_NAME"}
DEFAULT_PROJECT = "herd"
MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def _chosen(tracking: TrackingConfig, key: str, default: Any, env: Mapping[str, str]) -> tuple[Any, str]:
    """(value, where it came from: tracking.<key>, the environment variable, or "herd")."""
    configured = getattr(tracking, key)
    if configured:
        return (list(configured) if key == "tags" else configured), f"tracking.{key}"
    from_env = (env.get(ENV_VARS[key]) or "").strip()
    if from_env:
        if key == "tags":  # W&B's format: comma-separated
            tags = [tag.strip() for tag in from_env.split(",") if tag.strip()]
            too_long = [tag for tag in tags if len(tag) > MAX_TAG_LENGTH]
            if too_long:
                raise ConfigError(f"WANDB_TAGS: tag '{too_long[0][:20]}...' is longer than W&B's "
                                  f"{MAX_TAG_LENGTH} characters")
            if tags:
                return tags, ENV_VARS[key]
            return default, "herd"
        return from_env, ENV_VARS[key]
    return default, "herd"


def run_names(tracking: TrackingConfig, base: str, run_dir: Path, env: Mapping[str, str] | None = None
              ) -> tuple[str, str]:
    """(name, group): tracking.name / .group, else WANDB_NAME / WANDB_RUN_GROUP, else herd's. herd's name:
    <base>-<SLURM job id> (<array job>_<task> for arrays), or the run directory's name off SLURM; herd's
    group: <base>, or <base>-<array job id> so that one sweep's tasks group together."""
    target = wandb_target(tracking, base, run_dir, env)
    return target["name"], target["group"]


def wandb_target(tracking: TrackingConfig, base: str, run_dir: Path, env: Mapping[str, str] | None = None
                 ) -> dict[str, Any]:
    """Where the W&B run goes: project, entity (None: the key's default entity), group, name and tags, each
    from the tracking config, else W&B's environment variable (ENV_VARS), else herd's default; `from` says
    which, per key."""
    env = os.environ if env is None else env
    job = dist.slurm_job(env)
    if job is None:
        name, group = run_dir.name, base
    else:
        name, group = f"{base}-{job.tag}", (f"{base}-{job.array_job}" if job.array_job else base)
    defaults = {"project": DEFAULT_PROJECT, "entity": None, "group": group, "name": name, "tags": []}
    target: dict[str, Any] = {"from": {}}
    for key, default in defaults.items():
        target[key], target["from"][key] = _chosen(tracking, key, default, env)
    return target


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def has_api_key(base_url: str | None = None) -> bool:
    """WANDB_API_KEY, or a `wandb login` entry in ~/.netrc for the W&B host. Never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators(urlsplit(base_url or _base_url()).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def network_reachable(base_url: str | None = None, timeout: float = 3.0) -> bool:
    parts = urlsplit(base_url or _base_url())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def choose_mode(tracking: TrackingConfig) -> tuple[str | None, str]:
    """(W&B mode, why): None for backend none; 'offline' when asked, when WANDB_MODE says so, without an
    API key or without network; else 'online'."""
    backend = TrackingBackend(tracking.backend)
    if backend == TrackingBackend.none:
        return None, "tracking.backend=none"
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode == "disabled":
        return "disabled", "WANDB_MODE=disabled"
    if backend == TrackingBackend.wandb_offline:
        return "offline", "tracking=wandb_offline"
    if env_mode in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env_mode}"
    if not has_api_key():
        return "offline", "no WANDB_API_KEY and no `wandb login`"
    if not network_reachable():
        return "offline", f"{urlsplit(_base_url()).hostname} is not reachable"
    return "online", "online"


def wandb_settings() -> dict[str, Any]:
    """wandb.Settings that keep secrets and the user's files out of the run. Measured on wandb 0.31:
    with defaults, argv lands in the `environment` record of run-<id>.wandb (x_disable_meta stops it),
    stdout/stderr in files/output.log (console="off"), and `pip freeze` in files/requirements.txt
    (a `pkg @ https://token@...` line would carry a token). Env values themselves are not recorded."""
    return {
        "x_disable_meta": True,  # argv, program path, host, username, email, executable
        "disable_code": True,
        "save_code": False,
        "disable_git": True,  # remote URLs can hold credentials
        "x_save_requirements": False,  # herd's manifest records the package versions instead
        "console": "off",  # the SLURM log already has stdout; it may hold anything the user printed
        "disable_job_creation": True,
        # wandb-core buffers the .wandb file and flushes every 15 s by default; a SIGKILLed job (OOM,
        # scancel, node failure) lost everything since (measured: an 8 s run left only the 7-byte header).
        "x_transaction_log_flush_interval": 2.0,
    }


# ---- where a run's files are ------------------------------------------------------------------------------

def wandb_dir(run_dir: Path) -> Path:
    """Where W&B writes: $WANDB_DIR if set (a scratch file system, say), else the run directory."""
    return Path(os.environ.get("WANDB_DIR") or run_dir)


def offline_run_dirs(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """The offline-run directories of this run, oldest first (a resumed run adds one per attempt)."""
    run_dir = Path(run_dir)
    run_id = run_id or read_run_id(run_dir)
    if not run_id:
        return []
    return sorted((wandb_dir(run_dir) / "wandb").glob(f"offline-run-*-{run_id}"))


def read_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def _run_id(run_dir: Path) -> str:
    """The run id stored in the run directory, created (and stored before use) on the first start."""
    existing = read_run_id(run_dir)
    if existing:
        return existing
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write(run_dir / RUN_ID_FILE, run_id + "\n")
    return run_id


def _wait_for_a_fresh_second(directory: Path, run_id: str) -> None:
    """wandb names a run's directory <mode>-<local start second>-<id>; a second attempt of the same run
    started within the same second would reuse (and overwrite) the first one's .wandb file."""
    while True:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        if not any((directory / "wandb" / f"{mode}-{stamp}-{run_id}").exists() for mode in ("run", "offline-run")):
            return
        time.sleep(0.1)


# ---- a run's life -----------------------------------------------------------------------------------------

def init_wandb(tracking: TrackingConfig, run_dir: Path, mode: str, name: str, group: str,
               config: dict | None = None, job_type: str = "train"):
    """Start or resume the W&B run whose id is stored in run_dir."""
    import wandb

    run_id = _run_id(run_dir)
    directory = wandb_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _wait_for_a_fresh_second(directory, run_id)
    name, group = redact(name), redact(group)
    rundir.write_json(run_dir / RUN_NAMES_FILE, {"id": run_id, "name": name, "group": group})
    target = wandb_target(tracking, "", run_dir)  # project, entity, tags: config, else environment, else herd's
    if os.environ.get(ENV_VARS["tags"]):
        # wandb parses WANDB_TAGS itself too, even with tags given, and fails on an empty item ("a,b,") or
        # keeps blanks: it gets herd's reading (blanks and empty items dropped).
        os.environ[ENV_VARS["tags"]] = ",".join(_chosen(TrackingConfig(), "tags", [], os.environ)[0])
    return wandb.init(
        project=redact(target["project"]), entity=target["entity"], name=name, group=group,
        tags=redact(target["tags"]) or None, id=run_id, resume="allow", mode=mode,
        dir=str(directory), config=config, job_type=job_type, settings=wandb.Settings(**wandb_settings()),
    )


def run_facts(run, mode: str, target: dict[str, Any]) -> dict[str, Any]:
    """What the W&B run really got, for the manifest: W&B's own record of it, and where herd took each key."""
    return {"id": run.id, "mode": mode, "project": run.project, "entity": run.entity or target["entity"],
            "group": run.group, "name": run.name, "tags": list(run.tags or ()), "from": target["from"]}


def step_by_global_step(run) -> None:
    """Make train/global_step every metric's x axis: a resumed run may re-log steps W&B has seen, which an
    explicit step= would drop as non-monotonic."""
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)


def log_adapter_artifact(run, adapter_dir: str | Path, metadata: dict) -> None:
    import wandb

    artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata=metadata)
    artifact.add_dir(str(adapter_dir))
    run.log_artifact(artifact, aliases=["latest"])


def close_wandb(run) -> None:
    """Finish the run and wait until its .wandb file is complete. Measured on wandb 0.31 offline:
    run.finish() returns before wandb-core has written the file (right after it, the file was often still
    the 7-byte header); wandb.teardown() stops the service, which completes it. A sync or a reader started
    right after finish() alone would see a partial run."""
    import wandb

    run.finish()
    wandb.teardown()


def _run_command(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          check=False)


def sync_offline(dirs: list[Path], timeout: float = 600) -> bool:
    """`wandb sync` the given offline-run directories (in order: resumed attempts replay in sequence).
    A failure is a warning, never an error: the files stay for a later manual sync."""
    if not dirs:
        return False
    command = [sys.executable, "-m", "wandb", "sync", *map(str, dirs)]
    hint = "wandb sync " + " ".join(map(str, dirs))
    if not has_api_key() or not network_reachable():
        warnings.warn(f"herd: not syncing W&B (no key or no network); later run: {hint}", stacklevel=2)
        return False
    try:
        result = _run_command(command, timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        warnings.warn(f"herd: wandb sync failed ({error}); later run: {hint}", stacklevel=2)
        return False
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        warnings.warn(f"herd: wandb sync exited {result.returncode} ({last[0]}); later run: {hint}",
                      stacklevel=2)
        return False
    return True
