"""The files people pass: accelerate configs (`accelerate launch --config_file F`) and DeepSpeed JSONs
(`strategy.deepspeed_config`, or an accelerate config's `deepspeed_config_file`), read against herd's strategy.

The configs are the ones that ship inside the installed packages, found at test time: TRL's
`trl/accelerate_configs/*.yaml`, accelerate's own `write_basic_config`, DeepSpeed's
`deepspeed/autotuning/config_templates/template_zero*.json`. What a rank sees of an accelerate config is
the environment accelerate launch gives it: `child_env` computes it with accelerate's own launch code. Real
2-rank launches on CPU check that what is accepted trains as asked and what is refused stops in one line.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from herd.cli import check_config
from herd.config.launch import merge_deepspeed
from herd.config.train import (
    ModelConfig,
    PeftConfig,
    Strategy,
    StrategyConfig,
    TrainConfig,
    TrainJob,
    register_train_schema,
)
from herd.errors import ConfigError
from herd.training.strategy import check_compatibility, deepspeed_config, prepare_launch
from tests.conftest import FAST_TRAIN, OFFLINE_ENV, REPO

register_train_schema()

TRL_CONFIGS = importlib.resources.files("trl") / "accelerate_configs"
DS_TEMPLATES = importlib.resources.files("deepspeed") / "autotuning" / "config_templates"


def trl_config(name: str) -> Path:
    return Path(str(TRL_CONFIGS / name))


def ds_template(stage: int) -> Path:
    return Path(str(DS_TEMPLATES / f"template_zero{stage}.json"))


def test_the_packaged_configs_are_there():
    assert sorted(p.name for p in TRL_CONFIGS.iterdir() if p.name.endswith(".yaml")) == [
        "fsdp1.yaml", "fsdp2.yaml", "multi_gpu.yaml", "single_gpu.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml"]
    assert all(ds_template(stage).is_file() for stage in range(4))


def child_env(config_file: Path, *flags: str) -> tuple[int, dict[str, str]]:
    """(processes, the environment each rank gets) for `accelerate launch --config_file F FLAGS -m train`,
    computed with accelerate's own launch code (accelerate.commands.launch.launch_command, minus the start)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(config_file), *flags, "-m", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed and not args.cpu:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    launch_vars = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    return args.num_processes, launch_vars


STAGES = {Strategy.zero2: 2, Strategy.zero3: 3, Strategy.zero3_offload: 3}


def job(strategy: Strategy, deepspeed: str | None = None, **train) -> TrainJob:
    offload = strategy == Strategy.zero3_offload
    return TrainJob(model=ModelConfig(name="m", path="p"), peft=PeftConfig(),
                    strategy=StrategyConfig(name=strategy, zero_stage=STAGES.get(strategy, 0),
                                            offload_optimizer=offload, offload_params=offload,
                                            deepspeed_config=deepspeed),
                    train=TrainConfig(**{"global_batch_size": 16, "micro_batch_size": 4, **train}), output_dir="o")


def refusal(strategy: Strategy, env: dict, processes: int = 2, dtype=torch.float32, device="cpu", **kwargs) -> str | None:
    try:
        check_compatibility(job(strategy, **kwargs), processes, dtype, device, env)
    except ConfigError as error:
        assert "\n" not in str(error)
        return str(error)
    return None


# ---- TRL's accelerate configs against every strategy ------------------------------------------------------

ALL = list(Strategy)
# What each of TRL's configs allows, with `--mixed_precision no` (a CPU run: herd trains in fp32).
ACCEPTED = {
    "multi_gpu.yaml": {Strategy.ddp, Strategy.fsdp, Strategy.zero2, Strategy.zero3, Strategy.zero3_offload},
    "single_gpu.yaml": {Strategy.ddp, Strategy.fsdp, Strategy.zero2, Strategy.zero3, Strategy.zero3_offload},
    "zero1.yaml": set(),
    "zero2.yaml": {Strategy.zero2},
    "zero3.yaml": {Strategy.zero3},
    "fsdp1.yaml": set(),
    "fsdp2.yaml": {Strategy.fsdp},
}
REFUSAL = {  # (config, strategy) -> the one line, for a few representative pairs
    ("zero1.yaml", Strategy.ddp): "the accelerate config enables DeepSpeed ZeRO-1 but strategy=ddp; herd's "
                                  "DeepSpeed strategies are ZeRO-2 (zero2) and ZeRO-3 (zero3, zero3_offload)",
    ("zero1.yaml", Strategy.zero2): "the accelerate config sets zero_stage=1 but strategy=zero2 is ZeRO-2",
    ("zero2.yaml", Strategy.zero3): "the accelerate config sets zero_stage=2 but strategy=zero3 is ZeRO-3; use "
                                    "strategy=zero2 or an accelerate config with zero_stage: 3",
    ("zero2.yaml", Strategy.ddp): "the accelerate config enables DeepSpeed ZeRO-2 but strategy=ddp; use "
                                  "strategy=zero2 or launch without that config",
    ("zero3.yaml", Strategy.zero3_offload): "the accelerate config sets offload_optimizer_device=none but "
                                            "strategy=zero3_offload offloads optimizer states to CPU RAM",
    ("zero3.yaml", Strategy.fsdp): "enables DeepSpeed ZeRO-3 but strategy=fsdp; use strategy=zero3",
    ("fsdp1.yaml", Strategy.fsdp): "the accelerate config asks FSDP version 1; herd's strategy=fsdp is FSDP2",
    ("fsdp2.yaml", Strategy.zero3): "the accelerate config enables FSDP but strategy=zero3; add strategy=fsdp",
    ("multi_gpu.yaml", Strategy.single): "strategy=single but launched with 2 processes",
}


@pytest.mark.parametrize("config", sorted(ACCEPTED))
def test_trls_accelerate_configs_against_every_strategy(config):
    processes, env = child_env(trl_config(config), "--num_processes", "2", "--mixed_precision", "no")
    assert processes == 2
    for strategy in ALL:
        found = refusal(strategy, env)
        if strategy in ACCEPTED[config]:
            assert found is None, (strategy, found)
        else:
            assert found, strategy
            expected = REFUSAL.get((config, strategy))
            assert expected is None or expected in found, found


@pytest.mark.parametrize("config", sorted(c for c in ACCEPTED if ACCEPTED[c]))
def test_trls_bf16_is_refused_on_cpu_and_accepted_where_herd_trains_in_bf16(config):
    _, env = child_env(trl_config(config), "--num_processes", "2")  # TRL's files ask mixed_precision: bf16
    strategy = min(ACCEPTED[config])
    assert refusal(strategy, env).startswith("the accelerate config asks mixed_precision=bf16 but this run trains "
                                             "in fp32 on CPU (train.precision); launch with --mixed_precision no")
    assert refusal(strategy, env, dtype=torch.bfloat16, device="cuda") is None


def test_the_topology_is_the_launchs(tmp_path):
    # TRL's file asks 8 processes; a flag or an edited copy decides; herd reads the world size accelerate set.
    assert child_env(trl_config("multi_gpu.yaml"))[0] == 8
    copy = tmp_path / "multi_gpu.yaml"
    config = yaml.safe_load(trl_config("multi_gpu.yaml").read_text())
    copy.write_text(yaml.safe_dump({**config, "num_processes": 2, "num_machines": 1}))
    assert child_env(copy)[0] == 2
    assert refusal(Strategy.single, child_env(copy, "--mixed_precision", "no")[1], processes=2)


def test_accelerates_own_basic_config_is_accepted(tmp_path):
    from accelerate.utils import write_basic_config

    path = tmp_path / "default_config.yaml"
    write_basic_config(mixed_precision="no", save_location=str(path))
    processes, env = child_env(path)
    assert refusal(Strategy.single if processes == 1 else Strategy.ddp, env, processes=processes) is None


def test_accelerate_deepspeed_fields_are_dropped_once_checked(monkeypatch):
    _, env = child_env(trl_config("zero2.yaml"), "--num_processes", "2", "--mixed_precision", "no")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    prepare_launch("cuda", job(Strategy.zero2))  # (on "cpu" it would also set DeepSpeed's CPU environment)
    # accelerate would otherwise refuse herd's DeepSpeed config ("When using `deepspeed_config_file`, ...")
    assert "ACCELERATE_CONFIG_DS_FIELDS" not in os.environ
    assert os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"  # recorded in the manifest's environment


# ---- DeepSpeed JSON files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, strategy, refused", [
    (0, Strategy.zero2, ("zero_optimization.stage=0 contradicts strategy=zero2 (ZeRO-2); herd's DeepSpeed "
                        "strategies are ZeRO-2 (zero2) and ZeRO-3 (zero3, zero3_offload): drop the stage")),
    (1, Strategy.zero3, "zero_optimization.stage=1 contradicts strategy=zero3 (ZeRO-3)"),
    (2, Strategy.zero2, None),
    (2, Strategy.zero3, ("zero_optimization.stage=2 contradicts strategy=zero3 (ZeRO-3); use strategy=zero2 or "
                        "drop the stage from the file")),
    (3, Strategy.zero3, None),
    (3, Strategy.zero3_offload, None),
    (3, Strategy.zero2, "use strategy=zero3 or drop the stage from the file"),
    (2, Strategy.ddp, "a DeepSpeed config needs strategy=zero2, zero3 or zero3_offload, got strategy=ddp"),
])
def test_deepspeeds_packaged_templates_as_strategy_deepspeed_config(stage, strategy, refused):
    path = ds_template(stage)
    found = refusal(strategy, {}, deepspeed=str(path))
    if refused:
        assert found == f"strategy.deepspeed_config={path}: {refused}" or refused in found, found
        return
    assert found is None
    merged = deepspeed_config(job(strategy, deepspeed=str(path)), torch.float32, env={})
    template = json.loads(path.read_text())["zero_optimization"]
    zero = merged["zero_optimization"]
    # the file's tuning is kept; herd's decisions are on top
    assert zero["reduce_bucket_size"] == template["reduce_bucket_size"] == 5e8
    assert zero["overlap_comm"] is False and zero["contiguous_gradients"] is False
    assert zero["stage"] == STAGES[strategy] and merged["bf16"] == {"enabled": False}
    if stage == 3:
        assert zero["sub_group_size"] == 1e12
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # herd saves the adapter whole
    assert ("offload_optimizer" in zero) == (strategy == Strategy.zero3_offload)


def write_json(tmp_path: Path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return str(path)


@pytest.mark.parametrize("strategy, config, message", [
    (Strategy.zero3, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     ("zero_optimization.offload_optimizer.device=cpu contradicts strategy=zero3 (keeps optimizer states on the "
     "device); use strategy=zero3_offload")),
    (Strategy.zero3_offload, {"zero_optimization": {"offload_param": {"device": "none"}}},
     ("zero_optimization.offload_param.device=none contradicts strategy=zero3_offload (offloads parameters to CPU "
     "RAM); use strategy=zero2 or zero3")),
    (Strategy.zero3_offload, {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
     "offload_optimizer.device=nvme; herd offloads optimizer states to CPU RAM only"),
    (Strategy.zero2, {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
     "has a 'optimizer' section, but herd's train.optimizer chooses it"),
    (Strategy.zero2, {"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section, but herd's train.lr_scheduler"),
    (Strategy.zero2, {"bf16": {"enabled": True}}, "bf16.enabled=true but this run trains in fp32"),
    (Strategy.zero2, {"fp16": {"enabled": True}}, "fp16.enabled=true but this run trains in fp32"),
    (Strategy.zero2, {"train_micro_batch_size_per_gpu": 2}, ("train_micro_batch_size_per_gpu=2 but "
                                                             "train.micro_batch_size gives 4")),
    (Strategy.zero2, {"gradient_accumulation_steps": 4}, ("gradient_accumulation_steps=4 but train.global_batch_size "
                                                          "/ (micro batch x processes) gives 2")),
    (Strategy.zero2, {"train_batch_size": 64}, "train_batch_size=64 but train.global_batch_size gives 16"),
    (Strategy.zero2, {"gradient_clipping": 1.0}, "gradient_clipping=1.0 but train.max_grad_norm gives 0.3"),
    (Strategy.zero2, "{\n  \"zero_optimization\": {,\n}", "not valid JSON (line 2: Expecting property name"),
    (Strategy.zero2, "[1, 2]", "a DeepSpeed config is a JSON object, got list"),
])
def test_a_deepspeed_file_contradicting_herd_is_refused_in_one_line(tmp_path, strategy, config, message):
    path = write_json(tmp_path, config)
    found = refusal(strategy, {}, deepspeed=path)
    assert found and found.startswith(f"strategy.deepspeed_config={path}: ") and message in found, found


def test_auto_and_agreeing_values_pass(tmp_path):
    path = write_json(tmp_path, {"bf16": {"enabled": "auto"}, "fp16": {"enabled": False},
                                 "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
                                 "train_batch_size": 16, "gradient_clipping": 0.3,
                                 "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                       "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                                       "stage3_max_live_parameters": 1e8},
                                 "wall_clock_breakdown": True})
    assert refusal(Strategy.zero3_offload, {}, deepspeed=path) is None
    merged = deepspeed_config(job(Strategy.zero3_offload, deepspeed=path), torch.float32, env={})
    assert merged["wall_clock_breakdown"] is True and merged["zero_optimization"]["stage3_max_live_parameters"] == 1e8
    assert merged["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}  # herd's
    assert merged["train_batch_size"] == "auto"  # filled by the trainer from herd's train.*
    assert merge_deepspeed({}, {"zero_optimization": {"stage": 2}})["zero_optimization"]["overlap_comm"] is True


def test_the_accelerate_configs_deepspeed_config_file_is_used_not_ignored(tmp_path):
    accelerate_config = yaml.safe_load(trl_config("zero3.yaml").read_text())
    accelerate_config["deepspeed_config"] = {"deepspeed_config_file": str(ds_template(3)), "zero3_init_flag": True}
    path = tmp_path / "zero3-file.yaml"
    path.write_text(yaml.safe_dump(accelerate_config))
    _, env = child_env(path, "--num_processes", "2", "--mixed_precision", "no")
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ds_template(3))
    assert refusal(Strategy.zero3, env) is None
    assert deepspeed_config(job(Strategy.zero3), torch.float32, env)["zero_optimization"]["sub_group_size"] == 1e12
    assert refusal(Strategy.zero2, env) == (f"the accelerate config's deepspeed_config_file {ds_template(3)}: "
                                            "zero_optimization.stage=3 contradicts strategy=zero2 (ZeRO-2); use "
                                            "strategy=zero3 or drop the stage from the file")
    other = write_json(tmp_path, {})
    assert "two DeepSpeed files" in refusal(Strategy.zero3, env, deepspeed=other)


def test_a_missing_deepspeed_file_is_refused_before_anything_imports(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy.deepspeed_config=.*nope.json: cannot read it"):
        check_config("train", ["strategy=zero2", f"strategy.deepspeed_config={tmp_path}/nope.json"])
    check_config("train", ["strategy=zero2", f"strategy.deepspeed_config={ds_template(2)}"])


def test_slurm_render_checks_the_deepspeed_file_before_queueing(tmp_path):
    from herd import slurm

    with pytest.raises(ConfigError, match="zero_optimization.stage=3 contradicts strategy=zero2"):
        slurm.render(["cluster=local", "cluster.procs_per_node=2"],
                     ["strategy=zero2", f"strategy.deepspeed_config={ds_template(3)}", f"output_dir={tmp_path}/r"])
    assert not (tmp_path / "r").exists()


# ---- real launches on CPU -------------------------------------------------------------------------------------

LAUNCH_TRAIN = [*FAST_TRAIN, "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=2",
                "train.eval_steps=100", "train.save_steps=100", "data.max_samples=32", "device=cpu"]


def accelerate_launch(tmp_path: Path, config_file: Path, *args: str, flags=("--mixed_precision", "no"),
                      processes: str | None = "2") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               *(["--num_processes", processes] if processes else []), *flags, "--main_process_port", "0",
               "-m", "train", *LAUNCH_TRAIN, *args]
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def distributed(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["distributed"]


@pytest.mark.slow  # make test-all; its fast siblings run by default
def test_trls_multi_gpu_config_with_its_topology_trains_two_ranks(tmp_path):
    config = yaml.safe_load(trl_config("multi_gpu.yaml").read_text())
    copy = tmp_path / "multi_gpu.yaml"  # TRL's file, 2 processes instead of 8 (2 cores here)
    copy.write_text(yaml.safe_dump({**config, "num_processes": 2}))
    run_dir = tmp_path / "run"
    result = accelerate_launch(tmp_path, copy, "strategy=ddp", f"output_dir={run_dir}", processes=None)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = distributed(run_dir)
    assert facts["num_processes"] == 2 and facts["distributed_type"] == "MULTI_CPU"
    assert facts["wrapped_model"] == "DistributedDataParallel"


def test_trls_zero2_config_with_deepspeeds_template_trains_as_the_files_say(tmp_path):
    run_dir = tmp_path / "run"
    result = accelerate_launch(tmp_path, trl_config("zero2.yaml"), "strategy=zero2",
                               f"strategy.deepspeed_config={ds_template(2)}", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    facts = distributed(run_dir)
    assert facts["distributed_type"] == "DEEPSPEED" and facts["zero_stage"] == 2 and facts["num_processes"] == 2
    # the template's tuning reached the engine (herd's own default is overlap_comm on)
    assert facts["overlap_comm"] is False and facts["reduce_bucket_size"] == 500_000_000
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["environment"]["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert manifest["config"]["strategy"]["deepspeed_config"] == str(ds_template(2))


@pytest.mark.slow  # make test-all; its fast siblings run by default
def test_trls_zero3_config_under_strategy_zero2_is_refused_in_one_line_before_loading(tmp_path):
    run_dir = tmp_path / "run"
    result = accelerate_launch(tmp_path, trl_config("zero3.yaml"), "strategy=zero2", f"output_dir={run_dir}",
                               processes="1")
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("herd: ")]
    assert refusals == [("herd: invalid config: the accelerate config sets zero_stage=3 but strategy=zero2 is "
                        "ZeRO-2; use strategy=zero3 or an accelerate config with zero_stage: 2")], result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("herd: invalid config")[0]
    assert not run_dir.exists()


@pytest.mark.slow  # ~60 s on 2 cores
def test_trls_fsdp2_config_runs_herds_fsdp2_on_cpu(tmp_path):
    run_dir = tmp_path / "run"
    result = accelerate_launch(tmp_path, trl_config("fsdp2.yaml"), "strategy=fsdp", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    facts = distributed(run_dir)
    assert facts["num_processes"] == 2 and facts["sharded_parameters"] > 0
