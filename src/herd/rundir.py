"""The run directory: what a run writes there and how other commands find it again."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from herd.config import ConfigError

ADAPTER_DIR = "adapter"  # final LoRA adapter + tokenizer: loadable with plain PeftModel / AutoTokenizer
RUN_INFO = "herd_run.json"  # base model location and settings infer needs to rebuild the model
METRICS = "metrics.json"

_SECRET_KEY = re.compile(r"(token|secret|password|api_key|apikey|credential)", re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """A copy of a config container with secret-looking keys and any secret env value blanked out."""
    secrets = [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    partial.replace(path)


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
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "config.yaml.partial"
    partial.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))
    partial.replace(run_dir / "config.yaml")


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a finished herd training run (no {RUN_INFO})")
    return json.loads(path.read_text())
