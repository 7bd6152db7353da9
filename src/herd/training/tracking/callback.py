"""The `HerdTracker` TrainerCallback: one training run's metrics to W&B from rank 0, and to the run directory.

On rank 0 it
  - starts the W&B run, or resumes the same one (herd.training.tracking.wandb keeps its id in the run
    directory);
  - logs the resolved config (secrets redacted through herd.redaction.redact) and a manifest;
  - logs train loss, learning rate, grad norm, tokens/s, MFU, peak memory per device, eval loss and
    perplexity (DPO: rewards chosen/rejected, margins, accuracies instead of perplexity), with
    `train/global_step` as W&B's x axis;
  - appends every log event to `<run_dir>/metrics.jsonl` and draws `<run_dir>/loss.png`
    (herd.training.tracking.local), with or without W&B;
  - prints herd's one line per logging step (herd.training.tracking.progress), with or without W&B.
Call `finish(adapter_dir)` after the final evaluation and save: it logs the adapter artifact, closes the
run and, for offline runs with `sync_at_end`, uploads them.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from herd import rundir
from herd.config.train import TrackingBackend, TrackingConfig
from herd.redaction import redact
from herd.training.tracking.local import append_metrics, plot_losses
from herd.training.tracking.metrics import (
    PEAK_FLOPS_ENV,
    count_parameters,
    device_peak_flops,
    flops_per_token,
    gather_peak_memory,
    mfu,
)
from herd.training.tracking.progress import print_line, step_line
from herd.training.tracking.wandb import (
    choose_mode,
    close_wandb,
    experiment_name,
    init_wandb,
    log_adapter_artifact,
    offline_run_dirs,
    run_facts,
    step_by_global_step,
    sync_offline,
    wandb_target,
)

# Trainer's since-start averages (eval time included); herd logs its own per interval instead.
_TRAINER_AVERAGES = ("train_runtime", "train_tokens_per_second")


def _config_dict(config: Any) -> dict:
    from omegaconf import DictConfig

    if isinstance(config, DictConfig):
        return rundir.resolved_config(config)
    return redact(dict(config or {}))


def _log_kind(logs: dict) -> str:
    """train, eval, summary (Trainer's end-of-training log) or other."""
    if "loss" in logs:
        return "train"
    if any(k.startswith("eval_") for k in logs):
        return "eval"
    return "summary" if "train_loss" in logs else "other"


def _metric_name(key: str) -> str:
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


def _named_metrics(kind: str, logs: dict, perplexity: bool = True) -> dict[str, Any]:
    """The Trainer's numeric logs under herd's names, and eval perplexity where the loss is a language
    model's (not DPO's)."""
    metrics: dict[str, Any] = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if kind == "summary":
            metrics["final/" + key] = value
        elif kind == "train" and key in _TRAINER_AVERAGES:
            continue
        else:
            metrics[_metric_name(key)] = value
    if perplexity and "eval/loss" in metrics:
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
    return metrics


class _TrainingClock:
    """Seconds of training (data + forward/backward/step) since the last train log: from one step's end to
    the next, leaving out logging, evaluation and saving. Stopped (no mark) outside train()."""

    def __init__(self) -> None:
        self.productive = 0.0
        self.mark: float | None = None
        self.tokens_at_last_log = 0

    def start(self, tokens_seen: int) -> None:
        self.mark = time.perf_counter()
        self.productive = 0.0
        self.tokens_at_last_log = tokens_seen

    def stop(self) -> None:
        self.mark = None

    def step_end(self) -> None:
        now = time.perf_counter()
        if self.mark is not None:
            self.productive += now - self.mark
        self.mark = now

    def skip_elapsed(self) -> None:
        """Leave the time since the mark (an evaluation, a save, a log) out of the next interval."""
        if self.mark is not None:
            self.mark = time.perf_counter()

    def take_tokens_per_s(self, tokens_seen: int) -> float | None:
        """Tokens/s over the interval since the last call, and start the next interval. None when stopped
        or when the interval holds no tokens or no time."""
        if self.mark is None:
            return None
        tokens = tokens_seen - self.tokens_at_last_log
        rate = tokens / self.productive if tokens > 0 and self.productive > 0 else None
        self.tokens_at_last_log = tokens_seen
        self.productive = 0.0
        return rate


class HerdTracker(TrainerCallback):
    """Tracks one training run. Pass it in `callbacks=[...]` on every rank; call `finish()` on every rank
    after the last evaluation and save (only rank 0 does anything but the memory gather). The W&B run
    starts at the first Trainer event (the baseline evaluation or train begin), not at construction.

    config: the Hydra config (DictConfig, resolved and redacted here) or a plain dict (redacted here).
    manifest: extra facts to record in the W&B config under "manifest" (versions, git commit, ...).
    seq_len: the max sequence length, for the attention term of MFU.
    base_name: the experiment name for run names; default: the Hydra experiment choice, else model name.
    dpo: a preference run: its loss is DPO's (no perplexity) and each token also runs the reference forward
    (counted in MFU's FLOPs); rewards/margins/accuracies are logged as TRL reports them.
    """

    def __init__(self, tracking: TrackingConfig, run_dir: str | Path, config: Any = None, *,
                 manifest: dict | None = None, seq_len: int = 0, base_name: str | None = None,
                 dpo: bool = False) -> None:
        self.tracking = tracking
        self.run_dir = Path(run_dir)
        self.config = config
        self.manifest = manifest
        self.seq_len = seq_len
        self.base_name = base_name
        self.dpo = dpo
        self.run = None  # the wandb Run, on rank 0 once started
        self.wandb_facts: dict | None = None  # where the W&B run went (herd.training.tracking.wandb.run_facts)
        self.manifest_path: Path | None = None
        self.mode: str | None = None
        self.is_main = False
        self.started = False
        self.finished = False
        self.flops_per_token: float | None = None
        self.peak_flops: float | None = None
        self.world_size = 1
        self._clock = _TrainingClock()
        self._began: tuple[float, int] | None = None  # (time, global step) when train() began, for the ETA

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
        config["derived"] = self._derived_facts(args, model)
        if self.manifest:
            config["manifest"] = redact(dict(self.manifest))
        self._start_wandb(config)

    def _derived_facts(self, args, model) -> dict[str, Any]:
        """World size, parameter counts, FLOPs per token and device peak, kept for MFU and logged."""
        derived: dict[str, Any] = {"world_size": self.world_size}
        if model is not None:
            n_base, n_lora = count_parameters(model)
            model_config = getattr(model, "config", None)
            layers = getattr(model_config, "num_hidden_layers", 0) or 0
            hidden = getattr(model_config, "hidden_size", 0) or 0
            self.flops_per_token = flops_per_token(n_base, n_lora, layers, hidden, self.seq_len,
                                                   reference_forward=self.dpo)
            derived.update(params_base=n_base, params_lora=n_lora, flops_per_token=self.flops_per_token)
        # A CPU run on a GPU machine must not take the GPU's peak: off CUDA only a user-given peak counts.
        on_known_device = args.device.type == "cuda" or os.environ.get(PEAK_FLOPS_ENV)
        self.peak_flops = device_peak_flops() if on_known_device else None
        derived["peak_flops_per_device"] = self.peak_flops
        return derived

    def _start_wandb(self, config: dict) -> None:
        self.mode, reason = choose_mode(self.tracking)
        if self.mode is None:
            return
        if self.mode == "offline" and TrackingBackend(self.tracking.backend) == TrackingBackend.wandb:
            print(f"herd: W&B offline ({reason}); upload later with `wandb sync`", flush=True)
        model_name = (config.get("model") or {}).get("name") or "run"
        base = self.base_name or experiment_name() or model_name
        target = wandb_target(self.tracking, base, self.run_dir)
        self.run = init_wandb(self.tracking, self.run_dir, self.mode, target["name"], target["group"], config)
        step_by_global_step(self.run)
        self.wandb_facts = run_facts(self.run, self.mode, target)
        self._record_wandb_in_manifest()

    def add_manifest(self, manifest: dict, path: str | Path | None = None) -> None:
        """Record the run manifest in the W&B config (under "manifest"), before or after the run started.
        `path`: the manifest's file, which gets the W&B run's project, entity, group, name, tags, id and mode
        (and where each came from: config, environment or herd) once the run has started."""
        self.manifest = manifest
        self.manifest_path = Path(path) if path is not None else None
        self._record_wandb_in_manifest()
        if self.run is not None:
            self.run.config.update({"manifest": redact(dict(manifest))}, allow_val_change=True)

    def _record_wandb_in_manifest(self) -> None:
        if self.wandb_facts is None or self.manifest is None:
            return
        self.manifest["wandb"] = redact(self.wandb_facts)
        if self.manifest_path is not None:
            rundir.write_json(self.manifest_path, self.manifest)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start(args, state, model)
        self._clock.start(state.num_input_tokens_seen)
        self._began = (time.perf_counter(), state.global_step)

    # -- throughput bookkeeping -------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        self._clock.step_end()

    def on_evaluate(self, args, state, control, **kwargs):
        self._clock.skip_elapsed()

    def on_save(self, args, state, control, **kwargs):
        self._clock.skip_elapsed()

    # -- logging ----------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self._start(args, state, model)
        logs = dict(logs or {})
        kind = _log_kind(logs)
        metrics = self._peak_memory() if kind == "train" else {}  # every rank, before the rank-0 check
        if self.is_main:
            metrics.update(_named_metrics(kind, logs, perplexity=not self.dpo))
            if kind == "train":
                metrics.update(self._throughput(state))
            metrics["train/global_step"] = state.global_step
            self._record(kind, state.global_step, metrics)
            if kind == "train":
                print_line(step_line(state.global_step, state.max_steps, metrics, self._eta(state)))
        self._clock.skip_elapsed()

    @staticmethod
    def _peak_memory() -> dict[str, float]:
        """Every rank's peak memory in GiB. Collective: every rank calls it on a train log."""
        metrics = {}
        for rank, (peak, reserved) in enumerate(gather_peak_memory()):
            metrics[f"memory/peak_gib_rank{rank}"] = peak / 2**30
            if reserved is not None:  # CUDA: the caching allocator's peak too (the planner predicts it)
                metrics[f"memory/peak_reserved_gib_rank{rank}"] = reserved / 2**30
        return metrics

    def _eta(self, state) -> float | None:
        """Seconds left at the pace since train() began (evaluations and saves included)."""
        if self._began is None or not state.max_steps:
            return None
        began_at, first_step = self._began
        done = state.global_step - first_step
        if done <= 0:
            return None
        return (time.perf_counter() - began_at) / done * max(state.max_steps - state.global_step, 0)

    def _throughput(self, state) -> dict[str, float]:
        tokens_per_s = self._clock.take_tokens_per_s(state.num_input_tokens_seen)
        if tokens_per_s is None:
            return {}
        metrics = {"train/tokens_per_s": tokens_per_s}
        if self.flops_per_token and self.peak_flops:
            metrics["train/mfu"] = mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size)
        return metrics

    def _record(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        append_metrics(self.run_dir, {"step": step, "kind": kind, "time": time.time(), **metrics})
        if self.run is not None:
            if kind == "summary":
                self.run.summary.update(metrics)
            else:
                self.run.log(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self._clock.stop()
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
            peft = redact(_config_dict(self.config).get("peft", {}))
            log_adapter_artifact(self.run, adapter_dir, metadata=peft)
        run_id = self.run.id
        close_wandb(self.run)
        self.run = None
        if self.mode == "offline" and self.tracking.sync_at_end:
            sync_offline(offline_run_dirs(self.run_dir, run_id))
