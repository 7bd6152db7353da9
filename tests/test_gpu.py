"""The GPU paths, run where CUDA GPUs are visible (`pytest -m gpu`, subprocesses get gpu_env()); skipped on
CPU. Each names its CPU sibling, which tests the same logic here. Written without a GPU to run them on:
the first GPU session runs them."""

import json

import pytest

from tests.conftest import FAST_TRAIN, gpu_env, run_module
from tests.test_strategies import RESUME, adapter, launch


@pytest.mark.gpu(1)
def test_qlora_trains_on_one_gpu_in_bf16(tmp_path, tiny_model_dir):
    """CPU sibling: test_train.test_training_lowers_eval_loss_and_writes_the_run."""
    run_dir = tmp_path / "run"
    run_module("train", *FAST_TRAIN, "train.max_steps=20", "train.eval_steps=10", f"output_dir={run_dir}",
               env=gpu_env())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["lm_head"] == "TRL fused"  # TRL's Triton head on CUDA; herd's head is CPU only
    facts = metrics["distributed"]
    assert facts["distributed_type"] == "NO" and facts["devices"] == ["cuda:0"]
    assert facts["quantized_linear_layers"] > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["hardware"]["gpu_count"] >= 1
    assert adapter(run_dir)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("name, distributed_type", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                                    ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_strategies_on_two_gpus(name, distributed_type, tmp_path, tiny_model_dir):
    """CPU siblings: test_strategies' DDP, FSDP2 and DeepSpeed tests (same assertions, gloo)."""
    run_dir = tmp_path / "run"
    result = launch(tmp_path, *RESUME, f"strategy={name}", f"output_dir={run_dir}", env=gpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads((run_dir / "metrics.json").read_text())["distributed"]
    assert facts["distributed_type"] == distributed_type and facts["num_processes"] == 2
    if name == "fsdp":
        assert facts["sharded_parameters"] > 0
    if name == "zero3":
        assert facts["partitioned_parameters"] > 0
    assert adapter(run_dir)


@pytest.mark.gpu(2)
def test_device_map_auto_spreads_one_model_over_two_gpus(tmp_path, tiny_model_dir):
    """CPU sibling: test_strategies.test_device_map_auto_loads_through_accelerate_and_trains."""
    run_dir = tmp_path / "run"
    run_module("train", *RESUME, "strategy.device_map=balanced", "train.max_steps=2", f"output_dir={run_dir}",
               env=gpu_env())
    facts = json.loads((run_dir / "metrics.json").read_text())["distributed"]
    assert facts["num_processes"] == 1 and {"cuda:0", "cuda:1"} <= set(facts["devices"])
