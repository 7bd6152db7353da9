"""The user's own config folders (--config-dir, hydra.searchpath): every group, train / infer / herd.slurm,
the README's worked example composed, refused and trained, in real processes where a command is involved."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from herd import slurm
from herd.cli import check_config, searchpath_override, user_search_path
from herd.config.cluster import register_cluster_schema
from herd.config.infer import register_infer_schema
from herd.config.train import register_train_schema
from herd.errors import ConfigError
from tests.conftest import REPO, run_module

register_train_schema()
register_infer_schema()
register_cluster_schema()

README = (REPO / "README.md").read_text()


def readme_experiment() -> str:
    """The worked example of the README: the YAML block headed `# ~/my-configs/experiment/mine.yaml`."""
    block = re.search(r"```yaml\n# ~/my-configs/experiment/mine\.yaml\n(.*?)```", README, re.DOTALL)
    assert block, "the README's worked example is gone"
    return block.group(1)


def write(folder: Path, relative: str, text: str) -> Path:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def my_configs(tmp_path) -> Path:
    """A user's folder with the README's experiment and one option of every other group."""
    folder = tmp_path / "my-configs"
    write(folder, "experiment/mine.yaml", readme_experiment())
    write(folder, "model/my-tiny.yaml", "defaults:\n  - tiny\nname: my-tiny\n")
    write(folder, "data/my-data.yaml", "defaults:\n  - sample\nname: my-data\nmax_seq_len: 192\n")
    write(folder, "peft/my-lora.yaml", "defaults:\n  - qlora\nr: 4\nalpha: 8\n")
    write(folder, "strategy/my-zero2.yaml", "defaults:\n  - zero2\n")
    write(folder, "tracking/my-wandb.yaml", "defaults:\n  - wandb_offline\nproject: my-project\n")
    write(folder, "cluster/my-site.yaml", "defaults:\n  - local\nname: my-site\npartition: my-partition\n")
    return folder


def folders(folder: Path) -> list[str]:
    return user_search_path(["--config-dir", str(folder)])[0]


# ---- composing: every group, train / infer / slurm ----------------------------------------------------------


@pytest.mark.parametrize("config, override, key, value", [
    ("train", "experiment=mine", "train.max_steps", 20),
    ("train", "model=my-tiny", "model.name", "my-tiny"),
    ("train", "data=my-data", "data.max_seq_len", 192),
    ("train", "peft=my-lora", "peft.r", 4),
    ("train", "strategy=my-zero2", "strategy.zero_stage", 2),
    ("train", "tracking=my-wandb", "tracking.project", "my-project"),
    ("infer", "model=my-tiny", "model.name", "my-tiny"),
    ("infer", "data=my-data", "data.name", "my-data"),
    ("slurm", "cluster=my-site", "cluster.partition", "my-partition"),
])
def test_every_group_takes_options_from_the_users_folder(my_configs, config, override, key, value):
    from omegaconf import OmegaConf

    cfg = check_config(config, [override], folders(my_configs))
    assert OmegaConf.select(cfg, key) == value
    with pytest.raises(ConfigError, match=f"unknown option '{override.partition('=')[2]}'"):
        check_config(config, [override])  # without the folder: Hydra's conf/ alone does not have it


@pytest.mark.parametrize("relative, text, override, message", [
    ("experiment/typo.yaml", "# @package _global_\ntrain:\n  max_step: 3\n", "experiment=typo",
     "unknown key 'train.max_step' in {folder}/experiment/typo.yaml; allowed keys: max_steps, epochs"),
    ("model/typo.yaml", "name: x\npth: /m\n", "model=typo",
     "unknown key 'model.pth' in {folder}/model/typo.yaml; allowed keys: name, path"),
    ("data/bad.yaml", "defaults:\n  - sample\nmax_seq_len: 4\n", "data=bad", "data.max_seq_len=4: must be >= 8"),
    ("peft/bad.yaml", "defaults:\n  - qlora\nquant: nf5\n", "peft=bad",
     "invalid value for 'peft.quant' in {folder}/peft/bad.yaml: Invalid value 'nf5', expected one of [nf4"),
    ("strategy/typo.yaml", "name: ddp\nzero_stag: 2\n", "strategy=typo",
     "unknown key 'strategy.zero_stag' in {folder}/strategy/typo.yaml"),
    ("tracking/typo.yaml", "backend: wandb\nprojct: x\n", "tracking=typo",
     "unknown key 'tracking.projct' in {folder}/tracking/typo.yaml"),
    ("experiment/broken.yaml", "# @package _global_\ntrain:\n  max_steps: 3\n bad: [\n", "experiment=broken",
     "{folder}/experiment/broken.yaml line 4 is not valid YAML"),
    ("experiment/other.yaml", "# @package _global_\ndefaults:\n  - override /model: llama9\n", "experiment=other",
     "unknown option 'llama9' for 'model'"),
])
def test_typos_and_bad_values_in_the_users_files_are_refused_in_one_line(tmp_path, relative, text, override,
                                                                           message):
    folder = tmp_path / "mine"
    write(folder, relative, text)
    with pytest.raises(ConfigError) as error:
        check_config("train", [override], folders(folder))
    assert message.format(folder=folder) in str(error.value) and "\n" not in str(error.value)


def test_cluster_typo_in_the_users_folder_is_refused_by_render(tmp_path):
    folder = tmp_path / "mine"
    write(folder, "cluster/typo.yaml", "defaults:\n  - local\npartion: gpu\n")
    result = subprocess.run([sys.executable, "-m", "herd.slurm", "render", "--config-dir", str(folder),
                             "cluster=typo", f"output_dir={tmp_path}/run"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"herd: invalid config: unknown key 'cluster.partion' in {folder}/cluster/typo")
    assert not (tmp_path / "run").exists()


def test_search_path_flags_are_checked_and_rewritten_for_hydra(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b c"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(tmp_path)
    entries, argv = user_search_path(["--cfg", "job", "-cd", "a", "train.max_steps=3", "hydra.searchpath=[b c]"])
    # Hydra's order: --config-dir, then the hydra.searchpath entries; all absolute, ready for any cwd.
    assert entries == [f"file://{first}", f"file://{second}"]
    assert argv == ["--cfg", "job", searchpath_override(entries), "train.max_steps=3"]
    assert user_search_path(["--config-dir=a"])[0] == [f"file://{first}"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_search_path(["hydra.searchpath=['~/a',pkg://herd]"])[0] == [f"file://{first}", "pkg://herd"]
    for argv, message in [
        (["--config-dir", "nope"], f"--config-dir 'nope': no such folder ({tmp_path}/nope)"),
        (["hydra.searchpath=[a,nope]"], "hydra.searchpath 'nope': no such folder"),
        (["hydra.searchpath=a"], "hydra.searchpath must be a list of folders"),
        (["hydra.searchpath=[pkg://no_such_package]"], "no importable package 'no_such_package'"),
        (["hydra.searchpath=[s3://bucket/conf]"], "only folders (a path or file://) and packages (pkg://)"),
        (["--config-name", "mine"], "--config-name would replace herd's primary config"),
        (["-cp", "x"], "-cp would replace herd's primary config"),
        (["--config-dir"], "--config-dir needs a value"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            user_search_path(argv)


def test_a_user_file_that_conf_would_shadow_is_refused_unless_identical(tmp_path):
    folder = tmp_path / "mine"
    write(folder, "model/tiny.yaml", "name: tiny\npath: /somewhere/else\n")
    with pytest.raises(ConfigError, match=re.escape(f"{folder}/model/tiny.yaml is never read: herd's "
                                                    "conf/model/tiny.yaml has the same name")):
        check_config("train", [], folders(folder))
    check_config("train", ["model=llama2-7b"], folders(folder))  # not chosen: nothing is lost
    write(folder, "model/tiny.yaml", (REPO / "conf" / "model" / "tiny.yaml").read_text())
    check_config("train", [], folders(folder))  # a copy of conf/ as a config dir reads the same
    write(folder, "train.yaml", "defaults:\n  - train_schema\n")
    with pytest.raises(ConfigError, match="put your settings in an experiment/ file"):
        check_config("train", [], folders(folder))


# ---- real processes -------------------------------------------------------------------------------------------


def test_readme_example_cfg_job_shows_the_users_experiment(my_configs, tmp_path):
    result = run_module("train", "--config-dir", str(my_configs), "experiment=mine", "--cfg", "job")
    assert "max_steps: 20\n" in result.stdout and "max_seq_len: 256\n" in result.stdout
    assert "output_dir: runs/mine\n" in result.stdout and "learning_rate: 0.003\n" in result.stdout
    # hydra.searchpath, relative to the working directory, reads the same folder
    relative = os.path.relpath(my_configs, REPO)
    other = run_module("train", f"hydra.searchpath=[{relative}]", "--cfg", "job", "experiment=mine")
    assert other.stdout == result.stdout
    assert not (REPO / "runs" / "mine").exists()


@pytest.mark.parametrize("module", ["train", "infer.evaluate", "infer.generate", "infer.merge", "infer.chat",
                                    "infer.lm_eval"])
def test_every_entry_point_refuses_a_typo_in_the_users_file_in_one_line(module, tmp_path):
    folder = tmp_path / "mine"
    write(folder, "model/typo.yaml", "name: x\npth: /m\n")
    result = run_module(module, "--config-dir", str(folder), "model=typo", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"herd: invalid config: unknown key 'model.pth' in {folder}/model/typo.yaml; allowed "
                             "keys: name, path, revision, build_tiny, trust_remote_code, attn_implementation, "
                             "chat_template, random_init, random_init_seed\n")


@pytest.mark.parametrize("module", ["infer.evaluate", "infer.generate", "infer.merge", "infer.chat", "infer.lm_eval"])
def test_every_infer_command_composes_the_users_model_and_data(module, my_configs):
    result = run_module(module, "--config-dir", str(my_configs), "model=my-tiny", "data=my-data", "--cfg", "job")
    assert "name: my-tiny\n" in result.stdout and "name: my-data\n" in result.stdout


def test_slurm_render_bakes_the_users_folder_into_the_job(my_configs, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "herd.slurm", "render", "--config-dir", str(my_configs),
                             "cluster=my-site", "experiment=mine", f"output_dir={run_dir}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    text = (run_dir / "train.sbatch").read_text()
    assert "#SBATCH --partition=my-partition\n" in text
    baked = shlex.split(re.search(r"^set -- (.*) \"\$@\"$", text, re.MULTILINE).group(1))
    assert baked == ["experiment=mine", f"output_dir={run_dir}", searchpath_override(folders(my_configs))]
    # What the job will run, from another working directory: the same experiment, the same run directory.
    job = run_module("train", *baked, "--cfg", "job")
    assert "max_steps: 20\n" in job.stdout and f"output_dir: {run_dir}\n" in job.stdout
    sweep = slurm.render(["cluster=my-site"], ["train.seed=1,2", f"output_dir={tmp_path}/sweep"],
                         sweep=True, search_path=folders(my_configs))
    lines = (sweep.script.parent / slurm.SWEEP_FILE).read_text().splitlines()
    assert [shlex.split(line)[-1] for line in lines] == [searchpath_override(folders(my_configs))] * 2


def test_readme_example_trains_from_the_users_folder(my_configs, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_module("train", "--config-dir", str(my_configs), "experiment=mine", "train.max_steps=2",
               "train.eval_steps=100", "train.save_steps=100", "data.max_samples=32", f"output_dir={run_dir}")
    config = (run_dir / "config.yaml").read_text()
    assert "max_seq_len: 256" in config and "learning_rate: 0.003" in config
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["eval_loss_after"] is not None
