"""The run directory: what a run writes there and how other commands find it again."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from herd.errors import ConfigError, InputError
from herd.paths import atomic_write
from herd.redaction import redact

ADAPTER_DIR = "adapter"  # final LoRA adapter + tokenizer: loadable with plain PeftModel / AutoTokenizer
RUN_INFO = "herd_run.json"  # base model location and settings infer needs to rebuild the model
METRICS = "metrics.json"

def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def write_json(path: Path, payload: dict) -> None:
    """`payload` as JSON, redacted (herd.redaction) like every file a run writes: herd_run.json, metrics.json,
    the manifest, infer's results."""
    atomic_write(path, json.dumps(redact(payload), indent=2, default=str) + "\n")


def _sweep_job():
    """Hydra's config of this job when it is one job of a --multirun sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get()
    return None


def job_run_dir(output_dir: str) -> str:
    """This job's run directory: output_dir, or under --multirun Hydra's directory for the job,
    <sweep dir>/<job number> (conf/train.yaml), so that the jobs of a sweep do not share one run."""
    job = _sweep_job()
    return job.runtime.output_dir if job else output_dir


_SWEEP_OUTPUTS: dict[Path, int] = {}  # output path -> the sweep job (of this process) that wrote it


def claim_sweep_output(path: Path, key: str) -> None:
    """Refuse a sweep job an output that an earlier job of the same sweep wrote (e.g. a sweep over
    generate.temperature into one generations file), instead of overwriting it."""
    job = _sweep_job()
    if job is None:
        return
    earlier = _SWEEP_OUTPUTS.setdefault(path, job.job.num)
    if earlier != job.job.num:
        per_job = path.with_name(f"{path.stem}-${{hydra:job.num}}{path.suffix}")
        raise ConfigError(f"{key}: job {job.job.num} of this sweep would overwrite {path}, written by job {earlier}; "
                          f"give each job its own, e.g. '{key}={per_job}', or sweep run_dir")


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a finished herd training run (no {RUN_INFO})")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is damaged ({type(error).__name__}: {error}); it records the run's base model "
                         "and settings: restore it, or re-run the training command to rewrite it") from None
    missing = [key for key in ("base_model", "model") if key not in (info if isinstance(info, dict) else {})]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: not a record herd wrote; re-run the training command")
    return info
