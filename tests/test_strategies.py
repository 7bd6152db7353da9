"""Strategies, the compatibility matrix, one run directory, exact auto-resume, failing ranks."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from herd.config.train import ModelConfig, PeftConfig, Quant, Strategy, StrategyConfig, TrainJob
from herd.dist import close_process_group, free_port
from herd.errors import ConfigError
from herd.training.strategy import check_compatibility, trainer_kwargs
from tests.conftest import FAST_TRAIN, OFFLINE_ENV, REPO, run_module

RESUME = [*FAST_TRAIN, "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=4",
          "train.save_steps=2", "train.eval_steps=100", "train.logging_steps=1", "data.max_samples=64"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "train"]


def job(strategy=Strategy.single, quant=Quant.nf4, storage="auto", stage=0, device_map=None) -> TrainJob:
    offload = strategy == Strategy.zero3_offload
    return TrainJob(model=ModelConfig(name="m", path="p"), peft=PeftConfig(quant=quant, quant_storage=storage),
                    strategy=StrategyConfig(name=strategy, zero_stage=stage, offload_optimizer=offload,
                                            offload_params=offload, device_map=device_map), output_dir="o")


@pytest.mark.parametrize(
    "settings, world, device, env, message",
    [
        ({"strategy": Strategy.single}, 2, "cuda", {}, "strategy=single but launched with 2 processes"),
        ({"strategy": Strategy.ddp}, 2, "cuda", {"ACCELERATE_USE_DEEPSPEED": "true"},
         "the accelerate config enables DeepSpeed but strategy=ddp; use strategy=zero2, zero3 or zero3_offload"),
        ({"strategy": Strategy.ddp}, 2, "cuda", {"ACCELERATE_USE_FSDP": "true"},
         "the accelerate config enables FSDP but strategy=ddp; add strategy=fsdp"),
        ({"strategy": Strategy.fsdp, "quant": Quant.int8}, 2, "cuda", {}, "peft.quant=int8 cannot be sharded by FSDP"),
        ({"strategy": Strategy.fsdp, "storage": "uint8"}, 2, "cuda", {},
         "needs peft.quant_storage equal to the param dtype (bfloat16), got uint8"),
        ({"strategy": Strategy.zero3, "storage": "float16", "stage": 3}, 2, "cuda", {},
         "needs peft.quant_storage equal to the param dtype (bfloat16), got float16"),
        ({"strategy": Strategy.zero2, "stage": 0}, 2, "cuda", {}, "needs strategy.zero_stage 2 or 3"),
        ({"strategy": Strategy.ddp, "device_map": "auto"}, 2, "cuda", {},
         "strategy.device_map=auto splits one model inside one process: only with strategy=single, got ddp"),
        ({"strategy": Strategy.single, "device_map": "everywhere"}, 1, "cuda", {},
         "strategy.device_map=everywhere is not one of auto, balanced, balanced_low_0, sequential"),
    ],
)
def test_compatibility_matrix_refuses(settings, world, device, env, message):
    with pytest.raises(ConfigError) as error:
        check_compatibility(job(**settings), world, torch.bfloat16, device, env)
    assert message in str(error.value)


@pytest.mark.parametrize("settings", [{"strategy": Strategy.fsdp}, {"strategy": Strategy.zero3, "stage": 3},
                                      {"strategy": Strategy.ddp}, {"strategy": Strategy.zero2, "stage": 2}])
def test_compatible_settings_pass(settings):
    check_compatibility(job(**settings), 2, torch.bfloat16, "cuda", {})


def test_device_map_auto_loads_through_accelerate_and_trains(tmp_path, tiny_model_dir):
    # On CPU "auto" maps every layer to the CPU; on a multi-GPU node the same load spreads the layers.
    run_dir = tmp_path / "run"
    run_module("train", *RESUME, "strategy.device_map=auto", "train.max_steps=2", f"output_dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["distributed"]["num_processes"] == 1
    assert metrics["distributed"]["devices"] == ["cpu"]
    assert adapter(run_dir)


def test_fsdp_on_cpu_is_herds_own_fsdp2():
    # Allowed on CPU (herd shards with fully_shard itself), with fp32 4-bit storage, but not cpu_offload;
    # accelerate is told nothing about FSDP there (it would run DDP).
    cpu_job = job(Strategy.fsdp)
    check_compatibility(cpu_job, 2, torch.float32, "cpu", {})
    assert trainer_kwargs(cpu_job, torch.float32, "cpu") == {}
    offload = TrainJob(model=ModelConfig(name="m", path="p"), peft=PeftConfig(), output_dir="o",
                       strategy=StrategyConfig(name=Strategy.fsdp, cpu_offload=True))
    with pytest.raises(ConfigError, match="strategy.cpu_offload needs CUDA GPUs"):
        check_compatibility(offload, 2, torch.float32, "cpu", {})


def test_strategy_reaches_the_trainer_without_an_accelerate_config():
    fsdp = trainer_kwargs(job(Strategy.fsdp), torch.bfloat16)
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["fsdp_config"]["version"] == 2
    zero3 = trainer_kwargs(TrainJob(model=ModelConfig(name="m", path="p"), peft=PeftConfig(), output_dir="o",
                                    strategy=StrategyConfig(name=Strategy.zero3_offload, zero_stage=3,
                                                            offload_optimizer=True, offload_params=True)),
                           torch.bfloat16)["deepspeed"]["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["offload_param"]["device"] == "cpu"
    assert trainer_kwargs(job(Strategy.ddp), torch.bfloat16) == {}


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a, b):
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-7, msg=name)
    loss_a = json.loads((a / "metrics.json").read_text())["final_train_loss"]
    loss_b = json.loads((b / "metrics.json").read_text())["final_train_loss"]
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_module("train", *RESUME, f"output_dir={run_dir}")
    return run_dir


def test_sigkill_after_a_step_then_same_command_resumes_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_module("train", *RESUME, f"output_dir={run_dir}", env={"HERD_DEBUG_KILL_AFTER_STEP": "2"},
                        check=False)
    assert killed.returncode == -9 and not (run_dir / "adapter").exists()
    resumed = run_module("train", *RESUME, f"output_dir={run_dir}")
    assert "resuming from checkpoint-2" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-2"
    facts = metrics["distributed"]  # strategy=single: one plain process, no wrapper
    assert facts["distributed_type"] == "NO" and facts["num_processes"] == 1
    assert facts["wrapped_model"] == "PeftModelForCausalLM" and facts["quantized_linear_layers"] > 0
    assert_same_run(uninterrupted, run_dir)


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_module("train", *RESUME, "train.max_steps=4", f"output_dir={run_dir}",
                        env={"HERD_DEBUG_KILL_IN_SAVE": "4"}, check=False)
    assert killed.returncode == -9
    assert (run_dir / "checkpoint-4").is_dir() and not (run_dir / "checkpoint-4" / "herd-complete").exists()
    resumed = run_module("train", *RESUME, f"output_dir={run_dir}")
    assert "skipping incomplete checkpoint checkpoint-4" in resumed.stdout
    assert "resuming from checkpoint-2" in resumed.stdout
    assert_same_run(uninterrupted, run_dir)


def test_rerunning_a_finished_run_does_nothing_and_a_final_checkpoint_is_replayed_exactly(uninterrupted,
                                                                                         tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    adapter_file = run_dir / "adapter" / "adapter_model.safetensors"
    before = adapter_file.stat().st_mtime_ns
    again = run_module("train", *RESUME, f"output_dir={run_dir}")  # e.g. a requeue after the run ended
    assert "already finished at step 4; nothing to do" in again.stdout
    assert adapter_file.stat().st_mtime_ns == before
    # Killed after the last checkpoint but before the final outputs: the trainer would run a 5th step from
    # checkpoint-4, so herd replays from checkpoint-2 instead and ends exactly where the straight run did.
    (run_dir / "metrics.json").unlink()
    shutil.rmtree(run_dir / "adapter")
    replayed = run_module("train", *RESUME, f"output_dir={run_dir}")
    assert "checkpoint-4 is at the last step but the run did not finish; replaying from checkpoint-2" in \
        replayed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["resumed_from"] == "checkpoint-2"
    assert (run_dir / "checkpoint-4" / "herd-complete").exists()  # rewritten by the replay
    assert_same_run(uninterrupted, run_dir)


def launch(tmp_path, *args, env=None, timeout=600):
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **(env or {})}
    full_env.pop("HERD_RUN_ID", None)
    return subprocess.run([*LAUNCH, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def test_ddp_two_processes_one_run_dir_and_exact_resume(uninterrupted, tmp_path, tiny_model_dir):
    # No output_dir: the default, runs/tiny-<launch id>, must be ONE directory for both ranks.
    killed = launch(tmp_path, *RESUME, "strategy=ddp", env={"HERD_DEBUG_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0
    [run_dir] = list((tmp_path / "runs").iterdir())
    assert (run_dir / "checkpoint-2" / "herd-complete").exists()
    resumed = launch(tmp_path, *RESUME, "strategy=ddp", f"output_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    facts = metrics["distributed"]
    assert facts["distributed_type"] == "MULTI_CPU" and facts["num_processes"] == 2
    assert metrics["lm_head"] == "herd: labelled positions, CPU"  # herd's head under FSDP2's gathered weights
    assert facts["wrapped_model"] == "DistributedDataParallel"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["strategy"] == "ddp"
    assert any("accelerate" in command for command in manifest["launch_command"])
    assert manifest["environment"]["ACCELERATE_USE_CPU"] == "true"
    # Exact: the resumed run skipped the baseline evaluation, whose distributed loader advances torch's
    # RNG; herd restores it, or the rest of the epoch would be shuffled differently.
    straight = launch(tmp_path, *RESUME, "strategy=ddp", f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_run(tmp_path / "straight", run_dir)


def test_a_sweep_under_two_processes_runs_every_job(tmp_path, tiny_model_dir):
    """The jobs of a sweep share the launch's process group: herd closes it after the last job only."""
    result = launch(tmp_path, "-m", *RESUME, "strategy=ddp", "train.max_steps=2", "train.learning_rate=1e-3,2e-3",
                    f"output_dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())
        assert metrics["global_step"] == 2 and metrics["distributed"]["num_processes"] == 2


def test_a_rank_that_finished_closes_its_process_group(tmp_path):
    """Every entrypoint does this after its task succeeds (herd.cli); left to interpreter exit gloo aborted a
    finished lm-eval rank in CI."""
    # a file store: no port to pick and hope no other process takes first
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                         world_size=1)
    close_process_group()
    assert not torch.distributed.is_initialized()
    close_process_group()  # none open: nothing to do


def test_a_rank_that_raises_ends_the_launch_at_once(tmp_path, tiny_model_dir):
    """The launcher stops the rank still training as soon as the other raised, rather than leaving it blocked
    in its next collective until the process group times out: shown by what happened (the launcher's SIGTERM
    ended rank 0 before it finished), not by a clock. The timeout only turns a hang into a failure."""
    result = launch(tmp_path, *RESUME, "strategy=ddp", "train.max_steps=50", f"output_dir={tmp_path / 'run'}",
                    env={"HERD_DEBUG_RAISE_ON_RANK": "1"})
    assert result.returncode != 0
    assert "herd debug fault: rank 1 raised" in result.stderr
    assert re.search(r"Sending process \d+ closing signal SIGTERM", result.stderr), result.stderr[-3000:]
    # herd treats SIGTERM like USR1 (a checkpoint at the step's end, HERD_SIGTERM_GRACE_S at most), so rank 0
    # ends either by the launcher's SIGTERM (-15) or earlier, when its next collective finds the peer gone (1).
    ended = re.search(r"rank\s*: 0 \(local_rank: 0\)\s+exitcode\s*: (-15|1) ", result.stderr)
    assert ended, result.stderr[-3000:]
    assert ended.group(1) == "-15" or "Connection closed by peer" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


PORT_TAKEN = re.compile(r"address already in use|EADDRINUSE|server socket has failed to (listen|bind)",
                        re.IGNORECASE)


def test_two_machines_on_loopback_join_one_run(tmp_path, tiny_model_dir):
    """The command a cluster would use, one process per "machine", both on 127.0.0.1. Both must be told one
    port before machine 0 binds it, so another process can take it in between: then the launch is retried
    on another port (the failure names the taken address), up to three times."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    for _attempt in range(3):
        port = free_port()
        machines = [
            subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                 "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port), "--rdzv_backend", "static", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "-m", "train", *RESUME, "strategy=ddp", "train.max_steps=2",
                 f"output_dir={run_dir}"],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in (0, 1)
        ]
        outputs = [machine.communicate(timeout=600)[0] for machine in machines]
        if not (any(m.returncode for m in machines) and PORT_TAKEN.search(outputs[0])):
            break
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    facts = json.loads((run_dir / "metrics.json").read_text())["distributed"]
    assert facts["num_processes"] == 2 and facts["distributed_type"] == "MULTI_CPU"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_fsdp2_two_processes_on_cpu_shards_saves_and_resumes(tmp_path, tiny_model_dir):
    """strategy=fsdp on CPU: really FSDP2 (DTensor parameters on 2 ranks, not accelerate's silent DDP),
    QLoRA on a 4-bit base with fp32 storage; the adapter is gathered whole and loads with plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    killed = launch(tmp_path, *RESUME, "strategy=fsdp", f"output_dir={run_dir}",
                    env={"HERD_DEBUG_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt", "herd-complete"} <= {
        p.name for p in (run_dir / "checkpoint-2").iterdir()}
    resumed = launch(tmp_path, *RESUME, "strategy=fsdp", f"output_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    facts = metrics["distributed"]
    assert facts["distributed_type"] == "MULTI_CPU" and facts["num_processes"] == 2
    assert metrics["lm_head"] == "herd: labelled positions, CPU"  # herd's head under FSDP2's gathered weights
    assert facts["wrapped_model"].startswith("FSDP")  # fully_shard's class, not DistributedDataParallel
    assert facts["sharded_parameters"] > 0
    weights = adapter(run_dir)
    assert weights and all("lora_" in name for name in weights)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))  # full shapes, not shards
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)
    # The same run without the kill: resuming restores each rank's optimizer shard and the adapter.
    straight = launch(tmp_path, *RESUME, "strategy=fsdp", f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_run(tmp_path / "straight", run_dir)


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_zero_two_processes_on_cpu_trains_saves_and_resumes(name, stage, tmp_path, tiny_model_dir):
    """DeepSpeed on CPU for real: accelerate's CPU mode would drop DeepSpeed, so herd gives DeepSpeed its CPU
    accelerator and a gloo group; the engine, the ZeRO stage, 2 processes and (ZeRO-3) partitioned
    parameters are asserted, and a SIGKILLed run resumes from DeepSpeed's checkpoint exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    killed = launch(tmp_path, *RESUME, f"strategy={name}", f"output_dir={run_dir}",
                    env={"HERD_DEBUG_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0
    assert {"global_step2", "herd-complete"} <= {p.name for p in (run_dir / "checkpoint-2").iterdir()}
    resumed = launch(tmp_path, *RESUME, f"strategy={name}", f"output_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    facts = metrics["distributed"]
    assert facts["distributed_type"] == "DEEPSPEED" and facts["num_processes"] == 2
    assert facts["wrapped_model"] == "DeepSpeedEngine" and facts["zero_stage"] == stage
    assert metrics["lm_head"] == "herd: labelled positions, CPU"  # under ZeRO-3 with the head gathered
    assert facts["offload_optimizer"] is False and facts["offload_params"] is False
    assert facts["quantized_linear_layers"] > 0  # QLoRA: the base stayed 4-bit under DeepSpeed
    if stage == 3:
        assert facts["partitioned_parameters"] > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["environment"]["DS_ACCELERATOR"] == "cpu" and "ACCELERATE_USE_CPU" not in manifest["environment"]
    weights = adapter(run_dir)
    assert weights and all("lora_" in key and value.dtype == torch.float32 for key, value in weights.items())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(run_dir / "adapter"))  # whole tensors, not ZeRO partitions
    straight = launch(tmp_path, *RESUME, f"strategy={name}", f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_run(tmp_path / "straight", run_dir)


def test_zero3_offload_on_cpu_runs_deepspeeds_offload_path(tmp_path, tiny_model_dir):
    """The configuration herd sends for 70B on small GPUs, exercised for real: DeepSpeed offloads the
    optimizer (its CPU Adam) and the partitioned weights, as the engine reports."""
    run_dir = tmp_path / "run"
    result = launch(tmp_path, *RESUME, "strategy=zero3_offload", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    facts = metrics["distributed"]
    assert facts["distributed_type"] == "DEEPSPEED" and facts["num_processes"] == 2 and facts["zero_stage"] == 3
    assert facts["offload_optimizer"] is True and facts["offload_params"] is True
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert adapter(run_dir)


@pytest.mark.parametrize("name, stage", [(Strategy.fsdp, 0), (Strategy.zero2, 2), (Strategy.zero3, 3)])
def test_a_sharded_strategy_without_a_launcher_gets_a_one_process_group(name, stage, monkeypatch):
    """`python -m train strategy=fsdp` (or accelerate launch --num_processes 1, which sets no ranks): FSDP and
    DeepSpeed need a process group, so herd sets the one-process rendezvous torchrun would (the GPU round
    runs each strategy this way: benchmarks/gpu_round.py stage b)."""
    from herd.training.strategy import prepare_launch

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "DS_ACCELERATOR", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_TORCH_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    prepare_launch("cuda", job(name, stage=stage))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # under a launcher its ranks are kept
    monkeypatch.setenv("RANK", "3")
    prepare_launch("cuda", job(name, stage=stage))
    assert os.environ["RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("RANK")
    prepare_launch("cuda", job(Strategy.single))
    assert "RANK" not in os.environ
