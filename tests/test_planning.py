"""The planner before every launch: refusal with a suggestion, acceptance, and `plan=true`."""

import pytest

from herd.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PeftConfig,
    StrategyConfig,
    TrainConfig,
    TrainJob,
)
from herd.plan import GB
from herd.planning import check_fits, plan_job
from tests.conftest import run_module


def job(model: str, seq_len: int, micro_batch: int) -> TrainJob:
    return TrainJob(model=ModelConfig(name=model, path=f"meta-llama/Llama-2-{model}-hf"), peft=PeftConfig(),
                    data=DataConfig(name="d", path="d.jsonl", max_seq_len=seq_len),
                    train=TrainConfig(micro_batch_size=micro_batch, global_batch_size=16),
                    strategy=StrategyConfig(), output_dir="o")


def test_70b_single_on_24gb_is_refused_with_a_suggestion():
    train_job = job("70b", 2048, 1)
    settings, plan = plan_job(train_job, 1, train_job.model.path)
    with pytest.raises(ConfigError) as error:
        check_fits(train_job, settings, plan, train_job.model.path, 24 * GB)
    message = str(error.value)
    assert message.startswith("the plan needs") and "but the device has 24.0 GB" in message
    assert " fits (" in message and "force=true" in message


def test_7b_that_fits_is_accepted_and_force_overrides():
    fitting = job("7b", 2048, 1)
    check_fits(fitting, *plan_job(fitting, 1, fitting.model.path), fitting.model.path, 24 * GB)
    forced = job("70b", 2048, 1)
    forced.force = True
    check_fits(forced, *plan_job(forced, 1, forced.model.path), forced.model.path, 24 * GB)


def test_train_refuses_before_loading_and_plan_true_prints(tmp_path):
    refused = run_module("train", "model=llama2-70b", "device_memory_gb=24", f"output_dir={tmp_path}/r",
                         check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "herd: invalid config: the plan needs" in refused.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()
    shown = run_module("train", "model=llama2-70b", "plan=true", "strategy=ddp", f"output_dir={tmp_path}/p")
    assert "quantized linear weights" in shown.stdout and "total per GPU" in shown.stdout
    assert "python -m herd.slurm submit model=llama2-70b plan" not in shown.stdout
    assert "python -m herd.slurm submit model=llama2-70b strategy=ddp" in shown.stdout


def test_unreadable_model_config_is_one_line():
    train_job = job("7b", 2048, 1)
    with pytest.raises(ConfigError, match=r"cannot read the config.json of model.path=/nonexistent/model: "):
        plan_job(train_job, 1, "/nonexistent/model")
