"""W&B's environment (WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS, WANDB_NAME) honoured where the
tracking config leaves a key unset, the config winning where it sets one; read back from real offline run files,
and the manifest recording what the run got and from where."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from herd.cli import check_config
from herd.config.train import TrackingBackend, TrackingConfig, register_train_schema
from herd.training.tracking import wandb as herd_wandb
from herd.training.tracking.callback import HerdTracker
from tests.conftest import REPO
from tests.test_tracking import E2E_TRAIN, drive_tracker, launch_env, wandb_env  # noqa: F401 (a fixture)
from tests.wandb_reader import read_wandb_records

register_train_schema()

WANDB_ENV = {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team", "WANDB_RUN_GROUP": "env-group",
             "WANDB_TAGS": "env-a, env-b,", "WANDB_NAME": "env-name"}
ALL_FROM_ENV = {"project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "group": "WANDB_RUN_GROUP",
                "tags": "WANDB_TAGS", "name": "WANDB_NAME"}


def run_record(run_dir: Path) -> dict:
    [offline] = herd_wandb.offline_run_dirs(run_dir)
    return next(r for r in read_wandb_records(offline) if r["type"] == "run")


def tracked_run(tmp_path: Path, tracking: TrackingConfig) -> tuple[dict, dict]:
    """A tracker driven through a short run: (the offline run's run record, the manifest file)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest_path = run_dir / "manifest.json"
    manifest = {"git": "abc"}
    manifest_path.write_text(json.dumps(manifest))
    tracker = HerdTracker(tracking, run_dir, {"model": {"name": "tiny"}}, base_name="exp")
    tracker.add_manifest(manifest, manifest_path)
    drive_tracker(tracker, steps=2, logging_steps=1, eval_steps=2)
    tracker.finish()
    return run_record(run_dir), json.loads(manifest_path.read_text())


def test_schema_leaves_project_to_the_environment():
    for option in ("wandb", "wandb_offline"):
        tracking = check_config("train", [f"tracking={option}"]).tracking
        assert tracking.project is None and tracking.entity is None and tracking.group is None
        assert tracking.name is None and list(tracking.tags) == []
    assert TrackingConfig().project is None


@pytest.mark.usefixtures("wandb_env")
def test_environment_fills_every_key_the_config_leaves_unset(tmp_path, monkeypatch):
    for name, value in WANDB_ENV.items():
        monkeypatch.setenv(name, value)
    record, manifest = tracked_run(tmp_path, TrackingConfig(backend=TrackingBackend.wandb_offline))
    assert (record["project"], record["entity"], record["group"], record["name"], record["tags"]) == (
        "env-project", "env-team", "env-group", "env-name", ["env-a", "env-b"])
    used = manifest["wandb"]
    assert used["id"] == record["id"] and used["mode"] == "offline" and manifest["git"] == "abc"
    assert (used["project"], used["entity"], used["group"], used["name"], used["tags"]) == (
        "env-project", "env-team", "env-group", "env-name", ["env-a", "env-b"])
    assert used["from"] == ALL_FROM_ENV


@pytest.mark.usefixtures("wandb_env")
def test_the_config_wins_over_the_environment(tmp_path, monkeypatch):
    for name, value in WANDB_ENV.items():
        monkeypatch.setenv(name, value)
    tracking = TrackingConfig(backend=TrackingBackend.wandb_offline, project="cfg-project", entity="cfg-team",
                              group="cfg-group", tags=["cfg"], name="cfg-name")
    record, manifest = tracked_run(tmp_path, tracking)
    assert (record["project"], record["entity"], record["group"], record["name"], record["tags"]) == (
        "cfg-project", "cfg-team", "cfg-group", "cfg-name", ["cfg"])
    assert manifest["wandb"]["from"] == {key: f"tracking.{key}" for key in ALL_FROM_ENV}


@pytest.mark.usefixtures("wandb_env")
def test_without_config_or_environment_herds_defaults(tmp_path, monkeypatch):
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    record, manifest = tracked_run(tmp_path, TrackingConfig(backend=TrackingBackend.wandb_offline))
    assert (record["project"], record["group"], record["name"], record["tags"]) == ("herd", "exp", "run", [])
    assert manifest["wandb"]["from"] == {key: "herd" for key in ALL_FROM_ENV}
    assert manifest["wandb"]["entity"] is None  # the key's default entity, decided by W&B when it syncs


def test_target_mixes_config_environment_and_slurm_defaults():
    env = {"WANDB_PROJECT": "p", "SLURM_JOB_ID": "77", "WANDB_TAGS": " , "}
    target = herd_wandb.wandb_target(TrackingConfig(group="g"), "exp", Path("/runs/x"), env)
    assert {k: target[k] for k in ("project", "entity", "group", "name", "tags")} == {
        "project": "p", "entity": None, "group": "g", "name": "exp-77", "tags": []}
    assert target["from"] == {"project": "WANDB_PROJECT", "entity": "herd", "group": "tracking.group",
                              "name": "herd", "tags": "herd"}


def test_a_training_process_honours_the_environment_and_records_it(tmp_path):
    run_dir = tmp_path / "run"
    env = {**launch_env(tmp_path), **WANDB_ENV}
    env.pop("WANDB_NAME")
    result = subprocess.run([sys.executable, "-m", "train", *E2E_TRAIN, "train.max_steps=2", "train.eval_steps=100",
                             "data.max_samples=32", "tracking.group=from-config", f"output_dir={run_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    record = run_record(run_dir)
    assert (record["project"], record["entity"], record["group"], record["name"], record["tags"]) == (
        "env-project", "env-team", "from-config", "run", ["env-a", "env-b"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["wandb"]["project"] == "env-project" and manifest["wandb"]["id"] == record["id"]
    assert manifest["wandb"]["from"] == {**ALL_FROM_ENV, "group": "tracking.group", "name": "herd"}
    assert manifest["environment"]["WANDB_PROJECT"] == "env-project"
