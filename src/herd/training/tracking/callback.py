"""Experiment tracking: W&B (online or offline) from rank 0, and the same metrics on local disk always.

`HerdTracker` is a transformers TrainerCallback. On rank 0 it
  - starts the W&B run, or resumes it: the id lives in `<run_dir>/wandb_run_id`, so a resumed or requeued
    job continues the SAME W&B run (`resume="allow"`);
  - logs the resolved config (secrets redacted) and a manifest;
  - logs train loss, learning rate, grad norm, tokens/s, MFU, peak memory per device, eval loss and
    perplexity, with `train/global_step` as W&B's x axis (a run resumed from an older checkpoint logs
    steps W&B has already seen; an explicit `step=` would be dropped, a step metric is not);
  - appends every log event to `<run_dir>/metrics.jsonl` and draws `<run_dir>/loss.png`, with or
    without W&B.
Call `finish(adapter_dir)` after the final evaluation and save: it logs the adapter artifact, closes the
run and, for offline runs with `sync_at_end`, uploads them.

Secrets: the config goes through herd.redaction.redact, and W&B's own collection of argv, environment
metadata, code, git state, requirements and console output is switched off (`wandb_settings`), because
any of those can carry a token into `run-<id>.wandb`.

`read_wandb_run` reads an offline `run-<id>.wandb` file back (wandb 0.31 ships no reader for it).
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from transformers import TrainerCallback

from herd import dist, rundir
from herd.config.train import TrackingBackend, TrackingConfig
from herd.paths import atomic_write
from herd.redaction import redact

RUN_ID_FILE = "wandb_run_id"  # the W&B run id, written before wandb.init so a requeued job finds it
RUN_NAMES_FILE = "wandb_run.json"  # id, name, group: what log_table (infer) reuses to resume the same run
METRICS_LOG = "metrics.jsonl"  # one JSON object per log event: {"step", "kind", "time", metric: value...}
LOSS_PLOT = "loss.png"
TABLES_DIR = "tables"  # log_table's local copy: <run_dir>/tables/<name>.jsonl

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets; the sparse numbers are 2x these).
# First match of the substring in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)
PEAK_FLOPS_ENV = "HERD_PEAK_FLOPS"  # per-device peak FLOP/s for devices not in the table (CPUs, other GPUs)

DEFAULT_BASE_URL = "https://api.forge.coreweave.com"  # wandb 0.31's default host (was api.wandb.ai)


# ---- names, modes and settings -------------------------------------------------------------------------

def experiment_name() -> str | None:
    """The `experiment=` choice of the running Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment") or None
    except (ImportError, ValueError):  # not under @hydra.main (tests, notebooks)
        return None


def run_names(tracking: TrackingConfig, base: str, run_dir: Path, env: dict | None = None) -> tuple[str, str]:
    """(name, group). Name: <base>-<SLURM job id> (<array job>_<task> for arrays), or the run directory's
    name off SLURM. Group: <base>, or <base>-<array job id> so that one sweep's tasks group together."""
    job = dist.slurm_job(env)
    if job is None:
        name, group = run_dir.name, base
    else:
        name, group = f"{base}-{job.tag}", (f"{base}-{job.array_job}" if job.array_job else base)
    return tracking.name or name, tracking.group or group


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


def _config_dict(config: Any) -> dict:
    from omegaconf import DictConfig

    if isinstance(config, DictConfig):
        return rundir.resolved_config(config)
    return redact(dict(config or {}))


def _wait_for_a_fresh_second(directory: Path, run_id: str) -> None:
    """wandb names a run's directory <mode>-<local start second>-<id>; a second attempt of the same run
    started within the same second would reuse (and overwrite) the first one's .wandb file."""
    while True:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        if not any((directory / "wandb" / f"{mode}-{stamp}-{run_id}").exists() for mode in ("run", "offline-run")):
            return
        time.sleep(0.1)


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
    return wandb.init(
        project=tracking.project, entity=tracking.entity, name=name, group=group,
        tags=redact(list(tracking.tags)) or None, id=run_id, resume="allow", mode=mode,
        dir=str(directory), config=config, job_type=job_type, settings=wandb.Settings(**wandb_settings()),
    )


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


# ---- throughput, MFU, memory -----------------------------------------------------------------------------

def count_parameters(model) -> tuple[int, int]:
    """(N_base, N_lora): frozen parameters that take part in matmuls, and trainable ones.

    bitsandbytes packs two 4-bit weights per byte, so a Params4bit tensor's numel() is half the real count:
    the logical shape lives in its quant_state. The input embedding is a lookup, not a matmul, so it is left
    out (the LM head is counted unless tied to it). FSDP2's DTensor numel() is already the global size."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    n_base = n_lora = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            numel = math.prod(quant_state.shape)
        else:  # a ZeRO-3 partitioned parameter is empty locally; ds_numel is its full size
            numel = getattr(param, "ds_numel", None) or param.numel()
        if param.requires_grad:
            n_lora += numel
        elif id(param) not in skip:
            n_base += numel
    return n_base, n_lora


def flops_per_token(n_base: int, n_lora: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token (model FLOPs, so activation-checkpoint recomputation is NOT counted: MFU,
    not hardware FLOPs utilization):

        4 * N_base      frozen weights: forward 2N, backward through the activations 2N (no weight grads)
      + 6 * N_lora      trainable LoRA weights: forward 2N, backward 4N (activation and weight grads)
      + 12 * L * h * s  attention scores and values: (QK^T + AV) 2 matmuls x 2 FLOPs x h x s per layer
                        forward, x3 for forward + backward (PaLM, Chowdhery et al. 2022, appendix B)

    s is the configured max sequence length, an upper bound on the mean context: MFU is slightly
    overstated for short conversations (for 7B at s=1024 the attention term is ~5% of the total)."""
    return 4 * n_base + 6 * n_lora + 12 * layers * hidden * seq_len


def device_peak_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: $HERD_PEAK_FLOPS, else the table, else None (MFU omitted)."""
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def peak_memory_bytes() -> int:
    """This process's peak: CUDA memory allocated by torch on its device, else the CPU peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def peak_reserved_bytes() -> int | None:
    """This process's peak CUDA memory reserved by torch's caching allocator (what the planner predicts,
    with the CUDA context); None off CUDA."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_reserved())
    return None


def _gather_peak_memory() -> list[tuple[int, int | None]]:
    """Every rank's peak memory, (allocated or RSS, CUDA reserved or None). Collective: call on all ranks at
    the same point (Trainer's on_log for a training log is: the Trainer itself gathers the loss there)."""
    return [(int(a), r) for a, r in dist.all_gather_objects((peak_memory_bytes(), peak_reserved_bytes()))]


# ---- the callback -----------------------------------------------------------------------------------------

def _metric_name(key: str) -> str:
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


class HerdTracker(TrainerCallback):
    """Tracks one training run. Pass it in `callbacks=[...]` on every rank; call `finish()` on every rank
    after the last evaluation and save (only rank 0 does anything but the memory gather). The W&B run
    starts at the first Trainer event (the baseline evaluation or train begin), not at construction.

    config: the Hydra config (DictConfig, resolved and redacted here) or a plain dict (redacted here).
    manifest: extra facts to record in the W&B config under "manifest" (versions, git commit, ...).
    seq_len: the max sequence length, for the attention term of MFU.
    base_name: the experiment name for run names; default: the Hydra experiment choice, else model name.
    """

    def __init__(self, tracking: TrackingConfig, run_dir: str | Path, config: Any = None, *,
                 manifest: dict | None = None, seq_len: int = 0, base_name: str | None = None) -> None:
        self.tracking = tracking
        self.run_dir = Path(run_dir)
        self.config = config
        self.manifest = manifest
        self.seq_len = seq_len
        self.base_name = base_name
        self.run = None  # the wandb Run, on rank 0 once started
        self.mode: str | None = None
        self.is_main = False
        self.started = False
        self.finished = False
        self.flops_per_token: float | None = None
        self.peak_flops: float | None = None
        self.world_size = 1
        self._productive = 0.0  # seconds of training (data + forward/backward/step) since the last train log
        self._mark: float | None = None
        self._tokens_at_last_log = 0

    # -- start ------------------------------------------------------------------------------------------
    def _start(self, args, state, model) -> None:
        if self.started:
            return
        self.started = True
        self.is_main = args.process_index == 0
        self.world_size = args.world_size
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = _config_dict(self.config)
        derived: dict[str, Any] = {"world_size": self.world_size}
        if model is not None:
            n_base, n_lora = count_parameters(model)
            model_config = getattr(model, "config", None)
            layers = getattr(model_config, "num_hidden_layers", 0) or 0
            hidden = getattr(model_config, "hidden_size", 0) or 0
            self.flops_per_token = flops_per_token(n_base, n_lora, layers, hidden, self.seq_len)
            derived.update(params_base=n_base, params_lora=n_lora, flops_per_token=self.flops_per_token)
        self.peak_flops = device_peak_flops() if args.device.type == "cuda" or os.environ.get(PEAK_FLOPS_ENV) \
            else None
        derived["peak_flops_per_device"] = self.peak_flops
        config["derived"] = derived
        if self.manifest:
            config["manifest"] = redact(dict(self.manifest))

        self.mode, reason = choose_mode(self.tracking)
        if self.mode is None:
            return
        if self.mode == "offline" and TrackingBackend(self.tracking.backend) == TrackingBackend.wandb:
            print(f"herd: W&B offline ({reason}); upload later with `wandb sync`", flush=True)
        model_name = (config.get("model") or {}).get("name") or "run"
        base = self.base_name or experiment_name() or model_name
        name, group = run_names(self.tracking, base, self.run_dir)
        self.run = init_wandb(self.tracking, self.run_dir, self.mode, name, group, config)
        # train/global_step is the x axis: a resumed run may re-log steps W&B has seen, which an explicit
        # step= would drop as non-monotonic.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def add_manifest(self, manifest: dict) -> None:
        """Record the run manifest in the W&B config (under "manifest"), before or after the run started."""
        self.manifest = manifest
        if self.run is not None:
            self.run.config.update({"manifest": redact(dict(manifest))}, allow_val_change=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start(args, state, model)
        self._mark = time.perf_counter()
        self._productive = 0.0
        self._tokens_at_last_log = state.num_input_tokens_seen

    # -- throughput bookkeeping: time from one step's end to the next, minus logging/eval/save ---------
    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._mark is not None:
            self._productive += now - self._mark
        self._mark = now

    def on_evaluate(self, args, state, control, **kwargs):
        if self._mark is not None:
            self._mark = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if self._mark is not None:
            self._mark = time.perf_counter()

    # -- logging ----------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self._start(args, state, model)
        logs = dict(logs or {})
        kind = "train" if "loss" in logs else "eval" if any(k.startswith("eval_") for k in logs) else \
            "summary" if "train_loss" in logs else "other"
        metrics: dict[str, Any] = {}
        if kind == "train":
            peaks = _gather_peak_memory()  # every rank, before the rank-0 check
            for rank, (peak, reserved) in enumerate(peaks):
                metrics[f"memory/peak_gib_rank{rank}"] = peak / 2**30
                if reserved is not None:
                    metrics[f"memory/peak_reserved_gib_rank{rank}"] = reserved / 2**30
        if not self.is_main:
            if self._mark is not None:
                self._mark = time.perf_counter()
            return

        for key, value in logs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if kind == "summary":
                metrics["final/" + key] = value
            elif kind == "train" and key in ("train_runtime", "train_tokens_per_second"):
                continue  # Trainer's since-start averages (eval time included); herd's are per interval
            else:
                metrics[_metric_name(key)] = value
        if "eval/loss" in metrics:
            metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
        if kind == "train" and self._mark is not None:
            tokens = state.num_input_tokens_seen - self._tokens_at_last_log
            if tokens > 0 and self._productive > 0:
                tokens_per_s = tokens / self._productive
                metrics["train/tokens_per_s"] = tokens_per_s
                if self.flops_per_token and self.peak_flops:
                    metrics["train/mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)
            self._tokens_at_last_log = state.num_input_tokens_seen
            self._productive = 0.0
        metrics["train/global_step"] = state.global_step
        self._record(kind, state.global_step, metrics)
        if self._mark is not None:
            self._mark = time.perf_counter()

    def _record(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        event = {"step": step, "kind": kind, "time": time.time(), **metrics}
        with open(self.run_dir / METRICS_LOG, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.run is not None:
            if kind == "summary":
                self.run.summary.update(metrics)
            else:
                self.run.log(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self._mark = None
        if self.is_main:
            plot_losses(self.run_dir)

    # -- end ----------------------------------------------------------------------------------------------
    def finish(self, adapter_dir: str | Path | None = None) -> None:
        """After the final evaluation and save: redraw loss.png, log the adapter artifact, close the run,
        sync offline runs if asked. Safe to call on every rank, and more than once."""
        if self.finished or not self.is_main:
            self.finished = True
            return
        self.finished = True
        plot_losses(self.run_dir)
        if self.run is None:
            return
        if adapter_dir is not None and self.tracking.log_adapter_artifact and Path(adapter_dir).is_dir():
            import wandb

            artifact = wandb.Artifact(f"adapter-{self.run.id}", type="model",
                                      metadata=redact(_config_dict(self.config).get("peft", {})))
            artifact.add_dir(str(adapter_dir))
            self.run.log_artifact(artifact, aliases=["latest"])
        run_id = self.run.id
        close_wandb(self.run)
        self.run = None
        if self.mode == "offline" and self.tracking.sync_at_end:
            sync_offline(offline_run_dirs(self.run_dir, run_id))


# ---- outputs other commands use ---------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: str | Path) -> Path | None:
    """<run_dir>/loss.png: train and eval loss vs step, from metrics.jsonl. A resumed run re-logs some
    steps; the latest value of each step wins. None when nothing has been logged yet."""
    run_dir = Path(run_dir)
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for event in read_metrics(run_dir):
        if "train/loss" in event and event.get("kind") == "train":
            train[event["step"]] = event["train/loss"]
        if "eval/loss" in event:
            evals[event["step"]] = event["eval/loss"]
    if not train and not evals:
        return None
    # The object API with an explicit Agg canvas: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        steps = sorted(train)
        axes.plot(steps, [train[s] for s in steps], label="train loss")
    if evals:
        steps = sorted(evals)
        axes.plot(steps, [evals[s] for s in steps], "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(run_dir.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    path = run_dir / LOSS_PLOT
    atomic_write(path, image.getvalue())
    return path


def _tracking_of_run(run_dir: Path) -> TrackingConfig:
    import yaml

    path = run_dir / "config.yaml"
    section = (yaml.safe_load(path.read_text()) or {}).get("tracking") if path.exists() else None
    if not section:
        return TrackingConfig()
    known = {k: v for k, v in section.items() if k in TrackingConfig.__dataclass_fields__}
    known["backend"] = TrackingBackend(known.get("backend", "none"))
    return TrackingConfig(**known)


def log_table(run_dir: str | Path, name: str, rows: list[dict], tracking: TrackingConfig | None = None) -> Path:
    """Record rows (e.g. infer's generations: prompt, reference, output) as table `name`.

    Always writes <run_dir>/tables/<name>.jsonl. When the run was tracked with W&B (its config.yaml, or
    `tracking` given), also resumes that W&B run (same id) and logs a wandb.Table under `name`.
    Call from one process only."""
    run_dir = Path(run_dir)
    path = run_dir / TABLES_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(redact(row), default=str) + "\n" for row in rows))
    tracking = tracking or _tracking_of_run(run_dir)
    mode, _ = choose_mode(tracking)
    if mode is None or not rows:
        return path
    import wandb

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = wandb.Table(columns=columns,
                        data=[[redact(row.get(c)) for c in columns] for row in rows])
    names_file = run_dir / RUN_NAMES_FILE
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    name_, group = run_names(tracking, experiment_name() or run_dir.name, run_dir)
    name_, group = names.get("name") or name_, names.get("group") or group
    run = init_wandb(tracking, run_dir, mode, name_, group, config=None, job_type="infer")
    run.log({name: table})
    close_wandb(run)
    if mode == "offline" and tracking.sync_at_end:
        sync_offline(offline_run_dirs(run_dir, run.id))
    return path


# ---- reading an offline run back ---------------------------------------------------------------------

# The .wandb file: a 7-byte file header (b":W&B", magic 0xBEE1 LE, version 0), then LevelDB's log format:
# 32 KiB blocks of chunks, each chunk a 7-byte header (crc32 LE 4 bytes, length LE 2, type 1) + data.
# crc32 is zlib's, over the type byte then the data. A block tail shorter than a header is zero padding.
# Each complete record is a serialized wandb.proto.wandb_internal_pb2.Record.
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_record_bytes(data: bytes) -> Iterator[bytes]:
    """The records of a .wandb file's bytes. A torn tail (the writer was killed) ends the stream; a bad
    checksum or chunk order before that raises ValueError."""
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B transaction log (bad file header)")
    pos, pending = _FILE_HEADER.size, None
    while pos < len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            pos += left_in_block  # zero padding
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            return  # torn header
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        if start + length > len(data):
            return  # torn chunk
        chunk = data[start:start + length]
        pos = start + length
        if kind == 0 and length == 0 and crc == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0  # preallocated zeros: skip the block rest
            continue
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"checksum mismatch in chunk at byte {pos - length - _CHUNK_HEADER.size}")
        if kind == _FULL:
            if pending is not None:
                raise ValueError("FULL chunk inside a fragmented record")
            yield chunk
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind in (_MIDDLE, _LAST):
            if pending is None:
                raise ValueError(f"chunk type {kind} without a FIRST")
            pending += chunk
            if kind == _LAST:
                yield bytes(pending)
                pending = None
        else:
            raise ValueError(f"unknown chunk type {kind}")


def _wandb_file(run_path: str | Path) -> Path:
    path = Path(run_path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one run-*.wandb in {path}, found {len(found)}")
        return found[0]
    return path


def _item_value(item) -> Any:
    """A history/config/summary item's value: the JSON form, else the typed form (x_history_value_encoding)."""
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which in (None, "none"):
        return None
    value = getattr(item, which)
    return json.loads(value) if which == "json" else value


def _items(items) -> dict:
    """{key: value}; a nested_key path (how wandb-core stores logged dicts, e.g. a table's fields)
    becomes nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _item_value(item)
    return out


def _item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_wandb_records(run_path: str | Path) -> list[dict]:
    """Every record of an offline run (a run-<id>.wandb file or its offline-run directory), decoded:
    {"type": "history", "row": {...}}, {"type": "config", "update": {...}, "remove": [...]},
    {"type": "summary", "update": {...}}, {"type": "run", "id", "project", "name", "group", "tags",
    "config": {...}}, and {"type": <other>, "record": <MessageToDict>} for the rest."""
    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2 as pb

    decoded = []
    for raw in iter_record_bytes(_wandb_file(run_path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            decoded.append({"type": kind, "row": _items(record.history.item)})
        elif kind == "config":
            decoded.append({"type": kind, "update": _items(record.config.update),
                            "remove": [_item_key(i) for i in record.config.remove]})
        elif kind == "summary":
            decoded.append({"type": kind, "update": _items(record.summary.update),
                            "remove": [_item_key(i) for i in record.summary.remove]})
        elif kind == "run":
            r = record.run
            decoded.append({"type": kind, "id": r.run_id, "project": r.project, "entity": r.entity,
                            "name": r.display_name, "group": r.run_group, "tags": list(r.tags),
                            "resumed": r.resumed,
                            "config": _items(r.config.update)})
        else:
            decoded.append({"type": kind, "record": MessageToDict(getattr(record, kind)) if kind else {}})
    return decoded


@dataclass
class WandbRun:
    id: str
    name: str
    group: str
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def read_wandb_run(run_path: str | Path) -> WandbRun:
    """An offline run's id, name, config (updates applied in order; "_wandb" dropped), history rows and
    summary."""
    records = read_wandb_records(run_path)
    run = WandbRun(id="", name="", group="", records=records)
    for record in records:
        if record["type"] == "run":
            run.id, run.name, run.group = record["id"], record["name"], record["group"]
            run.config.update(record["config"])
        elif record["type"] == "config":
            run.config.update(record["update"])
            for key in record["remove"]:
                run.config.pop(key, None)
        elif record["type"] == "history":
            run.history.append(record["row"])
        elif record["type"] == "summary":
            run.summary.update(record["update"])
            for key in record["remove"]:
                run.summary.pop(key, None)
    run.config.pop("_wandb", None)
    return run


def history_values(history: Iterable[dict], key: str, step_key: str = "train/global_step") -> dict[int, Any]:
    """{step: value} of one metric in W&B history rows."""
    return {row[step_key]: row[key] for row in history if key in row and step_key in row}
