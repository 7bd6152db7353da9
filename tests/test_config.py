"""Every config refusal rule, every experiment composing, and `--cfg job` loading nothing."""

from pathlib import Path

import pytest

from herd.cli import check_config, sweep_dir_override, user_overrides
from herd.config.train import register_train_schema
from herd.errors import ConfigError
from tests.conftest import REPO, run_module

register_train_schema()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.foo=1"], "unknown key 'train.foo'; allowed keys: max_steps"),
        (["foo=1"], "unknown key 'foo'; allowed keys: model, data, peft, train"),
        (["+train.bar=2"], "unknown key 'train.bar'"),
        (["+model.quantize=yes"], "unknown key 'model.quantize'; allowed keys: name, path"),
        (["train.max_steps=abc"], "invalid value for 'train.max_steps'"),
        (["train.learning_rate=fast"], "invalid value for 'train.learning_rate'"),
        (["peft.quant=nf5"], "expected one of [nf4, fp4, int8, none]"),
        (["data.bad_rows=ignore"], "expected one of [skip, error]"),
        (["model=llama3"], "unknown option 'llama3' for 'model'; allowed: llama2-13b, llama2-13b-chat"),
        (["data=c4"], "unknown option 'c4' for 'data'; allowed: guanaco, guanaco-llama2-1k, jsonl, mix, sample"),
        (["experiment=nope"], "unknown option 'nope' for 'experiment'"),
        (["data=jsonl"], "'data.path' must be set"),
        (["strategy=zero4"], "unknown option 'zero4' for 'strategy'; allowed: ddp, fsdp, single, zero2, zero3"),
    ],
)
def test_refusals_name_the_key_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError) as error:
        check_config("train", overrides)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_sweep_without_multirun_is_refused():
    with pytest.raises(ConfigError, match="is a sweep; add --multirun"):
        user_overrides(["train.learning_rate=1e-4,2e-4"])
    assert user_overrides(["-m", "train.learning_rate=1e-4,2e-4"]) == ["train.learning_rate=0.0001"]
    assert user_overrides(["--cfg", "job", "hydra.run.dir=x", "train.max_steps=3"]) == ["train.max_steps=3"]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = check_config("train", [f"experiment={experiment}"])
    assert cfg.model.name and cfg.data.name and cfg.output_dir


@pytest.mark.parametrize("model", sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
def test_model_files_are_headed_by_command_and_hardware(model):
    head = (REPO / "conf" / "model" / f"{model}.yaml").read_text().splitlines()[:3]
    assert head[0].startswith(f"# python -m train model={model}")
    assert head[1].startswith("# Hardware:")
    path = ["model.path=/models/any"] if model == "local" else []  # `local` has no default path
    assert check_config("train", [f"model={model}", *path]).model.name == model


def test_bad_override_exits_2_with_one_line_and_no_traceback():
    result = run_module("train", "train.foo=1", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("herd: invalid config: unknown key 'train.foo'")


def test_cfg_job_prints_the_70b_config_without_loading(tmp_path):
    result = run_module("train", "model=llama2-70b", f"output_dir={tmp_path}/never", "--cfg", "job")
    assert "path: meta-llama/Llama-2-70b-hf" in result.stdout
    assert "quant: nf4" in result.stdout
    assert not (tmp_path / "never").exists()


def test_batch_arithmetic_refused(tmp_path):
    result = run_module("train", "train.global_batch_size=6", "train.micro_batch_size=4",
                        f"output_dir={tmp_path}/run", check=False)
    assert result.returncode == 2
    assert "train.global_batch_size=6 is not divisible by train.micro_batch_size x processes = 4 x 1" in (
        result.stderr)
    assert not Path(tmp_path / "run" / "adapter").exists()


def test_multirun_output_dir_names_the_sweep_directory_and_cannot_be_swept():
    assert sweep_dir_override(["-m", "train.learning_rate=1e-4,2e-4", "output_dir=runs/lr"], "output_dir") == [
        "hydra.sweep.dir=runs/lr"]
    assert sweep_dir_override(["train.learning_rate=1e-4", "output_dir=runs/lr"], "output_dir") == []  # no sweep
    assert sweep_dir_override(["--multirun", "train.learning_rate=1e-4,2e-4"], "output_dir") == []  # conf's default
    with pytest.raises(ConfigError, match=r"output_dir cannot be swept: .* each job runs in <output_dir>/<job number>"):
        sweep_dir_override(["-m", "output_dir=runs/a,runs/b"], "output_dir")
