"""W&B tracking (herd.training.tracking): offline runs read back from their .wandb file, resume onto the
same run id, no secret in any file a run writes, metrics.jsonl and loss.png with or without W&B.

In-process tests drive HerdTracker with the Trainer's own callback events (fast, one real offline W&B run
each); the end-to-end tests run `python -m train ... tracking=wandb_offline` as a user would, on 2 ranks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from herd.cli import check_config
from herd.config.train import TrackingBackend, TrackingConfig, register_train_schema
from herd.errors import ConfigError
from herd.training.tracking import wandb as herd_wandb
from herd.training.tracking.callback import HerdTracker
from herd.training.tracking.local import LOSS_PLOT, read_metrics
from herd.training.tracking.metrics import (
    PEAK_FLOPS_ENV,
    count_parameters,
    device_peak_flops,
    flops_per_token,
)
from tests.conftest import FAST_TRAIN, OFFLINE_ENV, REPO
from tests.wandb_reader import CHUNK_HEADER, history_values, log_table, read_wandb_records, read_wandb_run

register_train_schema()

FAKE_WANDB_KEY = "f" * 8 + "SECRETWANDBKEY0123456789abcdefabcdef"  # 44 chars, like no real key
FAKE_HF_TOKEN = "hf_SECRETHFTOKEN0123456789abcdefABCDEF"
SECRETS = (FAKE_WANDB_KEY, FAKE_HF_TOKEN)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with its caches in a temp dir, and fake secrets in the environment."""
    for name in ("WANDB_DIR", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS",
                 "WANDB_NAME", "WANDB_RUN_ID", "SLURM_JOB_ID",
                 "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", PEAK_FLOPS_ENV):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    return home


def files_containing(roots, needles) -> list[str]:
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {needle[:12]}..." for needle in needles if needle.encode() in data]
    return found


def assert_valid_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


# ---- pure functions ----------------------------------------------------------------------------------------

def test_flops_per_token_is_the_documented_formula():
    # 7B-like: 6.5e9 frozen, 40e6 LoRA, 32 layers, hidden 4096, 1024 tokens
    assert flops_per_token(6_500_000_000, 40_000_000, 32, 4096, 1024) == (
        4 * 6_500_000_000 + 6 * 40_000_000 + 12 * 32 * 4096 * 1024)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("Tesla V100-SXM2-16GB", None),
])
def test_device_peak_flops_table(name, peak, monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert device_peak_flops(name) == peak


def test_peak_flops_env_overrides_the_table(monkeypatch):
    monkeypatch.setenv(PEAK_FLOPS_ENV, "1.5e12")
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 1.5e12


def test_count_parameters_counts_4bit_weights_at_full_size(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from herd.config.train import ModelConfig, PeftConfig
    from herd.modeling import add_lora, load_base_model

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected_base = sum(p.numel() for p in plain.parameters()) - plain.get_input_embeddings().weight.numel()
    peft_cfg = PeftConfig()
    model = add_lora(load_base_model(ModelConfig(name="tiny", path=str(tiny_model_dir)), peft_cfg, "cpu",
                                     torch.float32, str(tiny_model_dir)), peft_cfg, False)
    n_base, n_lora = count_parameters(model)
    assert n_base == expected_base  # packed 4-bit tensors hold half as many elements: not counted as such
    assert n_lora == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("env, name, group", [
    ({}, "tiny-20261123", "exp"),
    ({"SLURM_JOB_ID": "4242"}, "exp-4242", "exp"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"}, "exp-4200_3", "exp-4200"),
])
def test_default_names_follow_slurm_ids(env, name, group):
    assert herd_wandb.run_names(TrackingConfig(), "exp", Path("/runs/tiny-20261123"), env) == (name, group)
    explicit = TrackingConfig(name="mine", group="sweep")
    assert herd_wandb.run_names(explicit, "exp", Path("/runs/x"), env) == ("mine", "sweep")


def test_mode_is_offline_without_key_network_or_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    online = TrackingConfig(backend=TrackingBackend.wandb)
    assert herd_wandb.choose_mode(TrackingConfig(backend=TrackingBackend.none))[0] is None
    assert herd_wandb.choose_mode(TrackingConfig(backend=TrackingBackend.wandb_offline))[0] == "offline"
    assert herd_wandb.choose_mode(online) == ("offline", "no WANDB_API_KEY and no `wandb login`")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setattr(herd_wandb, "network_reachable", lambda *a, **k: False)
    assert herd_wandb.choose_mode(online)[0] == "offline"
    monkeypatch.setattr(herd_wandb, "network_reachable", lambda *a, **k: True)
    assert herd_wandb.choose_mode(online)[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert herd_wandb.choose_mode(online)[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert herd_wandb.choose_mode(online)[0] == "disabled"


def test_tracking_configs_compose_and_bad_backend_is_refused():
    for option, backend in [("wandb", "wandb"), ("wandb_offline", "wandb_offline"), ("none", "none")]:
        cfg = check_config("train", [f"tracking={option}"])
        assert cfg.tracking.backend.value == backend
    assert check_config("train", []).tracking.backend.value == "none"
    with pytest.raises(ConfigError, match="tracking.backend"):
        check_config("train", ["tracking.backend=tensorboard"])


# ---- the callback, in process --------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """Enough of a model for parameter counting: an embedding, a frozen matmul, a trainable one."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8)
        self.embed = torch.nn.Embedding(10, 8).requires_grad_(False)
        self.frozen = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
        self.lora = torch.nn.Linear(8, 2, bias=False)

    def get_input_embeddings(self):
        return self.embed


def drive_tracker(tracker: HerdTracker, steps: int = 6, logging_steps: int = 2, eval_steps: int = 3,
                  start_step: int = 0) -> None:
    """The callback events of Trainer: init, eval before training, train with logs/evals/saves, train end."""
    args = SimpleNamespace(process_index=0, world_size=1, device=torch.device("cpu"))
    state, control, model = TrainerState(), TrainerControl(), TinyNet()
    state.global_step = start_step
    state.num_input_tokens_seen = start_step * 100
    tracker.on_init_end(args, state, control, model=model)
    tracker.on_log(args, state, control, logs={"eval_loss": 3.0, "eval_runtime": 0.1}, model=model)
    tracker.on_train_begin(args, state, control, model=model)
    for step in range(start_step + 1, steps + 1):
        tracker.on_step_begin(args, state, control)
        time.sleep(0.01)
        state.global_step = step
        state.num_input_tokens_seen += 100
        tracker.on_step_end(args, state, control)
        if step % logging_steps == 0:
            tracker.on_log(args, state, control, model=model, logs={
                "loss": 3.0 - 0.1 * step, "grad_norm": 0.5, "learning_rate": 1e-3, "epoch": step / 10,
                "num_input_tokens_seen": state.num_input_tokens_seen, "train_runtime": 9.0})
        if step % eval_steps == 0:
            tracker.on_evaluate(args, state, control, metrics={"eval_loss": 2.9 - 0.1 * step})
            tracker.on_log(args, state, control, logs={"eval_loss": 2.9 - 0.1 * step}, model=model)
            tracker.on_save(args, state, control)
    tracker.on_train_end(args, state, control)
    tracker.on_log(args, state, control, logs={"train_loss": 2.7, "total_flos": 1.0, "train_runtime": 1.0})


def test_tracker_logs_to_offline_wandb_and_local_files(tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv(PEAK_FLOPS_ENV, "1e9")
    run_dir = tmp_path / "run"
    config = {"model": {"name": "tiny"}, "train": {"hub_token": "abc"}, "note": f"token {FAKE_HF_TOKEN}"}
    tracker = HerdTracker(TrackingConfig(backend=TrackingBackend.wandb_offline, tags=["t1"]), run_dir, config,
                          seq_len=16)
    tracker.add_manifest({"git": "abc123", "env": {"X": FAKE_WANDB_KEY}})  # as the recipe does, once built
    drive_tracker(tracker)
    tracker.finish()

    run_id = (run_dir / herd_wandb.RUN_ID_FILE).read_text().strip()
    [offline] = herd_wandb.offline_run_dirs(run_dir)
    assert offline.parent == run_dir / "wandb" and offline.name.endswith(run_id)
    run = read_wandb_run(offline)
    assert run.id == run_id and run.name == "run" and run.group == "tiny"
    assert run.config["model"] == {"name": "tiny"} and run.config["manifest"] == {"git": "abc123", "env": {"X": "<redacted>"}}
    assert run.config["train"]["hub_token"] == "<redacted>" and FAKE_HF_TOKEN not in run.config["note"]
    assert run.config["derived"]["params_lora"] == 16 and run.config["derived"]["params_base"] == 64
    assert run.config["derived"]["flops_per_token"] == 4 * 64 + 6 * 16 + 12 * 2 * 8 * 16
    loss = history_values(run.history, "train/loss")
    assert sorted(loss) == [2, 4, 6] and loss[4] == pytest.approx(2.6)
    assert sorted(history_values(run.history, "eval/loss")) == [0, 3, 6]
    assert history_values(run.history, "eval/perplexity")[3] == pytest.approx(math.exp(2.6))
    tokens_per_s = history_values(run.history, "train/tokens_per_s")
    assert sorted(tokens_per_s) == [2, 4, 6]
    # 200 tokens per 2 steps of >= 10 ms each: at most 10k tokens/s, eval/save time excluded
    assert all(0 < v < 10_000 for v in tokens_per_s.values())
    mfu = history_values(run.history, "train/mfu")
    assert mfu[4] == pytest.approx(tokens_per_s[4] * run.config["derived"]["flops_per_token"] / 1e9)
    assert history_values(run.history, "memory/peak_gib_rank0")[2] > 0.01  # this process's RSS
    assert "train/train_runtime" not in {k for row in run.history for k in row}
    assert run.summary["final/train_loss"] == 2.7

    events = read_metrics(run_dir)
    assert [e["kind"] for e in events] == ["eval", "train", "eval", "train", "train", "eval", "summary"]
    assert events[1]["step"] == 2 and events[1]["train/loss"] == pytest.approx(2.8)
    assert_valid_png(run_dir / LOSS_PLOT)
    assert not files_containing([run_dir, wandb_env], SECRETS)


def test_resumed_tracker_continues_the_same_wandb_run(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(backend=TrackingBackend.wandb_offline)
    first = HerdTracker(cfg, run_dir, {"model": {"name": "tiny"}})
    drive_tracker(first, steps=4)
    first.finish()  # (the end-to-end test below kills the process instead)
    second = HerdTracker(cfg, run_dir, {"model": {"name": "tiny"}})
    drive_tracker(second, steps=8, start_step=4)
    second.finish()

    dirs = herd_wandb.offline_run_dirs(run_dir)
    assert len(dirs) == 2  # W&B writes one offline directory per attempt, both for the same run id
    runs = [read_wandb_run(d) for d in dirs]
    assert {r.id for r in runs} == {(run_dir / herd_wandb.RUN_ID_FILE).read_text().strip()}
    assert sorted(history_values(runs[1].history, "train/loss")) == [6, 8]
    steps = [e["step"] for e in read_metrics(run_dir) if e["kind"] == "train"]
    assert steps == [2, 4, 6, 8]


def test_adapter_artifact_and_sync_at_end(tmp_path, wandb_env, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(backend=TrackingBackend.wandb_offline, log_adapter_artifact=True, sync_at_end=True)
    calls = []
    monkeypatch.setattr(herd_wandb, "network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(herd_wandb, "_run_command", lambda command, timeout: calls.append(command) or
                        subprocess.CompletedProcess(command, 0, "", ""))
    tracker = HerdTracker(cfg, run_dir, {"model": {"name": "tiny"}, "peft": {"r": 16}})
    drive_tracker(tracker, steps=2)
    tracker.finish(adapter)
    [offline] = herd_wandb.offline_run_dirs(run_dir)
    [artifact] = [r["record"] for r in read_wandb_records(offline) if r["type"] == "artifact"]
    assert artifact["type"] == "model" and artifact["name"] == f"adapter-{tracker_run_id(run_dir)}"
    assert calls == [[sys.executable, "-m", "wandb", "sync", str(offline)]]

    monkeypatch.setattr(herd_wandb, "network_reachable", lambda *a, **k: False)
    with pytest.warns(UserWarning, match="not syncing W&B"):
        assert herd_wandb.sync_offline([offline]) is False
    assert len(calls) == 1


def test_backend_none_writes_metrics_and_plot_without_wandb(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    tracker = HerdTracker(TrackingConfig(), run_dir, {"model": {"name": "tiny"}})
    drive_tracker(tracker)
    tracker.finish()
    assert tracker.run is None and not (run_dir / "wandb").exists()
    assert not (run_dir / herd_wandb.RUN_ID_FILE).exists()
    assert [e["step"] for e in read_metrics(run_dir) if "train/loss" in e] == [2, 4, 6]
    assert_valid_png(run_dir / LOSS_PLOT)


def test_other_ranks_write_nothing(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    tracker = HerdTracker(TrackingConfig(backend=TrackingBackend.wandb_offline), run_dir, {})
    args = SimpleNamespace(process_index=1, world_size=2, device=torch.device("cpu"))
    state, control = TrainerState(), TrainerControl()
    tracker.on_init_end(args, state, control, model=TinyNet())
    tracker.on_log(args, state, control, logs={"loss": 1.0})
    tracker.on_train_end(args, state, control)
    tracker.finish()
    assert not run_dir.exists()


def test_log_table_resumes_the_run_and_keeps_a_local_copy(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(backend=TrackingBackend.wandb_offline)
    tracker = HerdTracker(cfg, run_dir, {"model": {"name": "tiny"}})
    drive_tracker(tracker, steps=2)
    tracker.finish()
    rows = [{"prompt": "Hi", "output": "Hello"}, {"prompt": "2+2?", "output": "4", "ms": 12}]
    path = log_table(run_dir, "generations", rows, tracking=cfg)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    later = read_wandb_run(herd_wandb.offline_run_dirs(run_dir)[-1])
    assert (later.id, later.name, later.group) == (tracker_run_id(run_dir), "run", "tiny")  # same as training
    [row] = [r for r in later.history if "generations" in r]
    assert row["generations"]["_type"] == "table-file" and row["generations"]["nrows"] == 2


def tracker_run_id(run_dir: Path) -> str:
    return (run_dir / herd_wandb.RUN_ID_FILE).read_text().strip()


# ---- the .wandb reader -------------------------------------------------------------------------------------

def test_reader_joins_records_across_32k_blocks_and_tolerates_a_torn_tail(tmp_path, wandb_env):
    import wandb

    big = "".join(chr(65 + i % 26) for i in range(100_000))  # one record over three 32 KiB blocks
    run = wandb.init(project="p", id="reader1", mode="offline", dir=str(tmp_path), config={"big": big},
                     settings=wandb.Settings(**herd_wandb.wandb_settings()))
    for step in range(200):
        run.log({"x": step, "y": step * 0.5})
    herd_wandb.close_wandb(run)  # finish() alone returns before wandb-core has written the file
    [path] = (tmp_path / "wandb").glob("offline-run-*-reader1/run-reader1.wandb")
    data = path.read_bytes()
    assert len(data) > 3 * 32 * 1024
    chunk_types = set()
    pos = 7
    while pos + 7 <= len(data):  # which chunk types did wandb-core write? FIRST/MIDDLE/LAST must be among them
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        chunk_types.add(kind)
        pos += 7 + length
    assert {1, 2, 3, 4} <= chunk_types

    full = read_wandb_run(path)
    assert full.config["big"] == big
    assert [row["x"] for row in full.history] == list(range(200))

    torn = tmp_path / "torn.wandb"
    torn.write_bytes(data[: len(data) - 5])  # a killed writer leaves half a chunk
    assert 0 < len(read_wandb_records(torn)) < len(read_wandb_records(path))
    corrupt = bytearray(data)
    corrupt[40] ^= 0xFF
    (tmp_path / "bad.wandb").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum"):
        read_wandb_records(tmp_path / "bad.wandb")


# ---- end to end: python -m train, as a user runs it -----------------------------------------------------------

E2E_TRAIN = [*FAST_TRAIN, "tracking=wandb_offline", "train.logging_steps=2", "train.eval_steps=4",
             "train.save_steps=4", "device=cpu"]


def launch_env(tmp_path: Path) -> dict:
    env = {**os.environ, **OFFLINE_ENV, "WANDB_API_KEY": FAKE_WANDB_KEY, "HF_TOKEN": FAKE_HF_TOKEN,
           "ACCELERATE_USE_CPU": "true", "WANDB_CACHE_DIR": str(tmp_path / "wandb-home" / "cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-home" / "data"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-home" / "config"), "HERD_RUN_ID": "test"}
    env.pop("WANDB_DIR", None)  # W&B writes into the run directory
    # Set while a wandb service runs in this (pytest) process; a child that inherits it uses that service
    # instead of its own, and a killed child's run then stays open there (the resume fails).
    env.pop("WANDB_SERVICE", None)
    return env


@pytest.mark.slow  # ~40 s on 2 cores
def test_two_process_run_writes_one_offline_wandb_run_without_secrets(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train", *E2E_TRAIN,
               "strategy=ddp", "train.max_steps=8", "train.global_batch_size=8", f"output_dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    dirs = herd_wandb.offline_run_dirs(run_dir)
    assert len(dirs) == 1 and len(list((run_dir / "wandb").glob("*run-*"))) == 1  # rank 1 made none
    run = read_wandb_run(dirs[0])
    assert run.id == tracker_run_id(run_dir)
    assert run.config["model"]["name"] == "tiny" and run.config["derived"]["world_size"] == 2
    assert sorted(history_values(run.history, "train/loss")) == [2, 4, 6, 8]
    assert sorted(history_values(run.history, "eval/loss")) == [0, 4, 8]
    assert all(v > 0 for v in history_values(run.history, "train/tokens_per_s").values())
    assert len(history_values(run.history, "train/tokens_per_s")) == 4
    assert {"memory/peak_gib_rank0", "memory/peak_gib_rank1"} <= {k for row in run.history for k in row}
    assert [e["step"] for e in read_metrics(run_dir) if e["kind"] == "train"] == [2, 4, 6, 8]
    assert_valid_png(run_dir / LOSS_PLOT)
    assert not files_containing([run_dir, tmp_path / "wandb-home"], SECRETS)


@pytest.mark.slow  # ~90 s on 2 cores: two runs, one killed
def test_killed_run_resumes_onto_the_same_wandb_run_id(tmp_path):
    run_dir = tmp_path / "run"
    env = launch_env(tmp_path)
    command = [sys.executable, "-m", "train", *E2E_TRAIN, f"output_dir={run_dir}"]
    # herd's fault hook SIGKILLs the run right after checkpoint-4 is complete: deterministic, unlike a
    # kill from outside racing the (fast) training steps. It kills once W&B's file holds step 4 (W&B writes
    # on its own schedule, 2 s by herd's setting): what was logged up to step 4 must then survive in the killed
    # run's file. A kill without waiting left a file without even the run record (seen once in CI); a fixed
    # sleep before the kill only made that race less likely.
    killed = subprocess.run([*command, "train.max_steps=8"], cwd=REPO, check=False,
                            env={**env, "HERD_DEBUG_KILL_AFTER_STEP": "4", "HERD_DEBUG_KILL_AFTER_WANDB": "1"},
                            capture_output=True, text=True, timeout=600)
    assert "gave up waiting" not in killed.stdout, killed.stdout[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # W&B flushes every 2 s, so a SIGKILL loses its last ~2 s; the run directory's metrics.jsonl has them.
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r][-1] == 4
    run_id = tracker_run_id(run_dir)

    result = subprocess.run([*command, "train.max_steps=8"], cwd=REPO, env=env, capture_output=True, check=False,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    dirs = herd_wandb.offline_run_dirs(run_dir)
    assert len(dirs) == 2
    assert [read_wandb_run(d).id for d in dirs] == [run_id, run_id] and tracker_run_id(run_dir) == run_id
    assert 4 in history_values(read_wandb_run(dirs[0]).history, "train/loss")  # survived the kill
    assert 8 in history_values(read_wandb_run(dirs[1]).history, "train/loss")
    assert not files_containing([run_dir, tmp_path / "wandb-home"], SECRETS)
