"""The planner before every launch: refusal with a suggestion, acceptance, `plan=true`, and the
checkpointing it decides."""

import json

import pytest

from herd.config.train import (
    DataConfig,
    ModelConfig,
    PeftConfig,
    Strategy,
    StrategyConfig,
    TrainConfig,
    TrainJob,
)
from herd.errors import ConfigError
from herd.memory import GB
from herd.training.plan import check_fits, plan_job
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


def test_auto_checkpointing_is_off_only_where_the_plan_fits_without_it():
    # 7B, seq 2048: planned 23.8 GB without checkpointing at micro batch 1, 79.6 GB at micro batch 4
    seven = job("7b", 2048, 1)
    assert seven.train.gradient_checkpointing is None  # the default is auto

    def checkpointing(train_job, device_gb):
        settings, plan = plan_job(train_job, 1, train_job.model.path, device_gb and device_gb * GB)
        assert plan.settings.gradient_checkpointing == settings.gradient_checkpointing
        return settings.gradient_checkpointing

    assert checkpointing(seven, 80) is False
    assert checkpointing(seven, 24) is True  # 23.8 GB would leave less than 10% of 24 GB free
    assert checkpointing(job("7b", 2048, 4), 80) is True
    assert checkpointing(seven, None) is False  # CPU: no device memory to plan against
    offload = job("7b", 2048, 1)
    offload.strategy = StrategyConfig(name=Strategy.zero3_offload, zero_stage=3, offload_optimizer=True,
                                      offload_params=True)
    assert checkpointing(offload, 80) is True  # the plan under-predicts offloading: kept on
    for forced in (True, False):
        seven.train.gradient_checkpointing = forced
        assert checkpointing(seven, 80) is forced and checkpointing(seven, 24) is forced


def test_auto_checkpointing_is_reported_by_plan_and_run(tmp_path, tiny_model_dir):
    shown = run_module("train", "model=llama2-7b", "plan=true", "device_memory_gb=80", f"output_dir={tmp_path}/p")
    assert "gradient checkpointing off (auto)" in shown.stdout
    shown = run_module("train", "model=llama2-7b", "plan=true", "device_memory_gb=24", f"output_dir={tmp_path}/p")
    assert "gradient checkpointing on (auto)" in shown.stdout
    run_dir = tmp_path / "run"
    trained = run_module("train", "model=tiny", "data=sample", "train.max_steps=1", "train.eval_steps=100",
                         "data.max_seq_len=256", "train.global_batch_size=2", "train.micro_batch_size=2",
                         f"output_dir={run_dir}")
    assert "gradient checkpointing off (auto)" in trained.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["gradient_checkpointing"] == "off (auto)" and metrics["global_step"] == 1


def test_unreadable_model_config_is_one_line():
    train_job = job("7b", 2048, 1)
    with pytest.raises(ConfigError, match=r"cannot read the config.json of model.path=/nonexistent/model: "):
        plan_job(train_job, 1, "/nonexistent/model")
