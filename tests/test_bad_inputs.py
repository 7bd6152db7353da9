"""The bad-input corpus: every case is a command a user could type, the exit code it must end with, and the
words its one line must hold. Config-time cases run the real entrypoints in this process (they are refused
before anything loads; `--cfg job` makes a case that wrongly passes print its config instead of training).
"""

import importlib
import json
import os
import sys

import pytest

from herd import slurm

TRAIN_CONFIG = [
    # (overrides, words in the one line)
    ("train.micro_batch_size=0", "train.micro_batch_size=0: must be >= 1"),
    ("train.micro_batch_size=-1", "train.micro_batch_size=-1: must be >= 1"),
    ("train.global_batch_size=0", "train.global_batch_size=0: must be >= 1"),
    ("peft.r=0", "peft.r=0: must be >= 1"),
    ("peft.r=-4", "peft.r=-4: must be >= 1"),
    ("peft.alpha=0", "peft.alpha=0: must be >= 1"),
    ("peft.dropout=1", "peft.dropout=1.0: must be < 1"),
    ("peft.dropout=1.5", "peft.dropout=1.5: must be < 1"),
    ("peft.dropout=-0.1", "peft.dropout=-0.1: must be >= 0"),
    ("train.learning_rate=0", "train.learning_rate=0.0: must be > 0"),
    ("train.learning_rate=-1e-4", "train.learning_rate=-0.0001: must be > 0"),
    ("train.learning_rate=nan", "train.learning_rate=nan: must be a number"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio=-0.1: must be >= 0"),
    ("train.warmup_ratio=1.0", "train.warmup_ratio=1.0: must be < 1"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0: must be >= 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0: must be >= 0"),
    ("train.max_steps=0", "train.max_steps=0: must be >= 1, or -1"),
    ("train.max_steps=-2", "train.max_steps=-2: must be >= 1, or -1"),
    ("train.epochs=0", "train.epochs=0.0: must be > 0"),
    ("train.epochs=-1", "train.epochs=-1.0: must be > 0"),
    ("train.logging_steps=0", "train.logging_steps=0: must be >= 1"),
    ("train.eval_steps=0", "train.eval_steps=0: must be >= 1"),
    ("train.save_steps=0", "train.save_steps=0: must be >= 1"),
    ("train.save_total_limit=0", "train.save_total_limit=0: must be >= 1"),
    ("train.seed=-1", "train.seed=-1: must be >= 0"),
    ("train.dataloader_num_workers=-1", "train.dataloader_num_workers=-1: must be >= 0"),
    ("data.eval_size=-0.5", "data.eval_size=-0.5: must be a fraction in [0, 1) or a whole count"),
    ("data.eval_size=1.5", "data.eval_size=1.5: above 1 it is a count of samples and must be whole"),
    ("data.max_seq_len=0", "data.max_seq_len=0: must be >= 8"),
    ("data.max_seq_len=4", "data.max_seq_len=4: must be >= 8"),
    ("data.max_samples=0", "data.max_samples=0: must be >= 1"),
    ("data.seed=-1", "data.seed=-1: must be >= 0"),
    ("peft.compute_dtype=fp8", "peft.compute_dtype=fp8: 'fp8' is not one of: auto, bfloat16"),
    ("peft.quant_storage=int4", "peft.quant_storage=int4: 'int4' is not one of: auto, uint8"),
    ("strategy.zero_stage=1", "strategy.zero_stage=1: '1' is not one of: 0, 2, 3"),
    ("strategy.zero_stage=4", "strategy.zero_stage=4: '4' is not one of: 0, 2, 3"),
    ("device=tpu", "device=tpu: 'tpu' is not one of: auto, cpu, cuda"),
    ("device=gpu", "device=gpu: 'gpu' is not one of: auto, cpu, cuda"),
    ("device_memory_gb=0", "device_memory_gb=0.0: must be > 0"),
    ("device_memory_gb=-8", "device_memory_gb=-8.0: must be > 0"),
    ("train.lr=1e-4", "unknown key 'train.lr'; allowed keys: max_steps"),
    ("model.foo=1", "unknown key 'model.foo'; allowed keys: name, path"),
    ("+train.bar=1", "unknown key 'train.bar'"),
    ("+top_level=1", "unknown key 'top_level'"),
    ("model=llama3", "unknown option 'llama3' for 'model'; allowed: llama2-13b"),
    ("strategy=fsdp2", "unknown option 'fsdp2' for 'strategy'; allowed: ddp, fsdp"),
    ("data=nope", "unknown option 'nope' for 'data'"),
    ("peft=dora", "unknown option 'dora' for 'peft'; allowed: lora, qlora"),
    ("tracking=mlflow", "unknown option 'mlflow' for 'tracking'"),
    ("experiment=nope", "unknown option 'nope' for 'experiment'"),
    ("train.max_steps=abc", "invalid value for 'train.max_steps'"),
    ("train.learning_rate=fast", "invalid value for 'train.learning_rate'"),
    ("peft.r=1.5", "invalid value for 'peft.r'"),
    ("train.packing=maybe", "invalid value for 'train.packing'"),
    ("peft.quant=int4", "invalid value for 'peft.quant'"),
    ("data.format=csv", "invalid value for 'data.format'"),
    ("data.bad_rows=ignore", "invalid value for 'data.bad_rows'"),
    ("train.precision=fp16", "invalid value for 'train.precision'"),
    ("strategy.name=pipeline", "invalid value for 'strategy.name'"),
    ("train.learning_rate=1e-4,2e-4", "is a sweep; add --multirun (-m)"),
]

INFER_CONFIG = [
    ("infer.generate", "generate.max_new_tokens=0", "generate.max_new_tokens=0: must be >= 1"),
    ("infer.generate", "generate.max_new_tokens=-5", "generate.max_new_tokens=-5: must be >= 1"),
    ("infer.generate", "generate.temperature=-1", "generate.temperature=-1.0: must be >= 0"),
    ("infer.generate", "generate.top_p=0", "generate.top_p=0.0: must be > 0"),
    ("infer.generate", "generate.top_p=1.5", "generate.top_p=1.5: must be <= 1"),
    ("infer.generate", "generate.batch_size=0", "generate.batch_size=0: must be >= 1"),
    ("infer.generate", "generate.seed=-1", "generate.seed=-1: must be >= 0"),
    ("infer.generate", "generate.foo=1", "unknown key 'generate.foo'"),
    ("infer.generate", "generate.split=test", "invalid value for 'generate.split'"),
    ("infer.evaluate", "evaluate.batch_size=0", "evaluate.batch_size=0: must be >= 1"),
    ("infer.evaluate", "device=tpu", "device=tpu: 'tpu' is not one of: auto, cpu, cuda"),
    ("infer.evaluate", "precision=fp16", "invalid value for 'precision'"),
    ("infer.evaluate", "quant=int4", "invalid value for 'quant'"),
    ("infer.merge", "merge.tolerance=0", "merge.tolerance=0.0: must be > 0"),
    ("infer.merge", "merge.tolerance=-1", "merge.tolerance=-1.0: must be > 0"),
    ("infer.lm_eval", "lm_eval.limit=0", "lm_eval.limit=0.0: must be > 0"),
    ("infer.lm_eval", "lm_eval.num_fewshot=-1", "lm_eval.num_fewshot=-1: must be >= 0"),
    ("infer.lm_eval", "lm_eval.batch_size=0", "lm_eval.batch_size=0: must be >= 1"),
    ("infer.chat", "chat.max_new_tokens=0", "chat.max_new_tokens=0: must be >= 1"),
    ("infer.chat", "chat.top_p=2", "chat.top_p=2.0: must be <= 1"),
    ("infer.generate", "model.path=x", "cannot set 'model.path': 'model' is not chosen"),
    ("infer.generate", "model=llama3", "unknown option 'llama3' for 'model'"),
]

CLUSTER_CONFIG = [
    ("cluster.nodes=0", "cluster.nodes=0: must be >= 1"),
    ("cluster.nodes=-2", "cluster.nodes=-2: must be >= 1"),
    ("cluster.gpus_per_node=-1", "cluster.gpus_per_node=-1: must be >= 0"),
    ("cluster.procs_per_node=0", "cluster.procs_per_node=0: must be >= 1"),
    ("cluster.cpus_per_task=-2", "cluster.cpus_per_task=-2: must be >= 1"),
    ("cluster.cpus_per_task=0", "cluster.cpus_per_task=0: must be >= 1"),
    ("cluster.array_parallelism=0", "cluster.array_parallelism=0: must be >= 1"),
    ("cluster.time=abc", "cluster.time=abc: is not a SLURM time limit"),
    ("cluster.time=1:2:3:4", "cluster.time=1:2:3:4: is not a SLURM time limit"),
    ("cluster.signal_seconds=-5", "cluster.signal_seconds=-5: must be >= 0"),
    ("cluster=nope", "unknown option 'nope' for 'cluster'"),
    ("cluster.foo=1", "unknown key 'cluster.foo'"),
    ("cluster.nodes=two", "invalid value for 'cluster.nodes'"),
]


def run_entry(entry: str, args: list[str], capsys, monkeypatch) -> tuple[int, list[str]]:
    """Run `python -m <entry> <args>` in this process; its exit code and its non-empty stderr lines."""
    monkeypatch.setattr(sys, "argv", [entry, *args])
    main = importlib.import_module(entry if entry != "train" else "train.__main__").main
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_refusal(code: int, lines: list[str], words: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("herd: ") and words in lines[0], lines[0]


@pytest.mark.parametrize("override, words", TRAIN_CONFIG, ids=[case[0] for case in TRAIN_CONFIG])
def test_train_refuses_a_bad_config_in_one_line(override, words, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, lines = run_entry("train", [override, "--cfg", "job"], capsys, monkeypatch)
    assert_one_line_refusal(code, lines, words)
    assert not any(tmp_path.iterdir()), "a refused launch wrote files"


@pytest.mark.parametrize("entry, override, words", INFER_CONFIG, ids=[f"{c[0]}-{c[1]}" for c in INFER_CONFIG])
def test_infer_refuses_a_bad_config_in_one_line(entry, override, words, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, lines = run_entry(entry, ["run_dir=runs/none", override, "--cfg", "job"], capsys, monkeypatch)
    assert_one_line_refusal(code, lines, words)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, words", CLUSTER_CONFIG, ids=[case[0] for case in CLUSTER_CONFIG])
def test_slurm_render_refuses_a_bad_cluster_in_one_line(override, words, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code = slurm.main(["render", "cluster=local", override, f"output_dir={tmp_path / 'run'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert_one_line_refusal(code, lines, words)
    assert not (tmp_path / "run").exists()


# ---- refused inside the task, before anything is written: real processes ---------------------------------


def bad_files(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "columns.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "herd_run.json").write_text("{broken")
    return tmp_path


TASK_CASES = [
    # (module, overrides (with {tmp}), words, paths that must not exist afterwards)
    ("train", ["data=jsonl", "data.path={tmp}/missing.jsonl"], "data.path={tmp}/missing.jsonl: no such file", ["run"]),
    ("train", ["data=jsonl", "data.path={tmp}"], "is a directory, expected a file", ["run"]),
    ("train", ["data=jsonl", "data.path={tmp}/latin.jsonl"], "not UTF-8 text (line 1", ["run"]),
    ("train", ["data=jsonl", "data.path={tmp}/columns.jsonl"],
     ("only 0 usable samples after dropping bad rows (missing_field=2). First bad rows: missing_field: line 1: "
      "row has no 'messages' field (data.field); its fields: a"), ["run"]),
    ("train", ["train.optimizer=adamw_foo"], "train.optimizer=adamw_foo is not one transformers accepts", ["run"]),
    ("train", ["model.attn_implementation=fast"], "model.attn_implementation=fast is not one transformers accepts",
     ["run"]),
    ("train", ["peft.target_modules=[qkv]"], ("peft.target_modules: qkv name no linear layer of tiny; allowed: "
                                              "all-linear, down_proj"), ["run"]),
    ("infer.evaluate", ["run_dir={tmp}/damaged"], "herd_run.json is damaged", []),
    ("infer.evaluate", ["run_dir={tmp}/nothere"], "is not a finished herd training run", []),
]


@pytest.mark.parametrize("module, overrides, words, absent", TASK_CASES,
                         ids=[f"{c[0]}-{c[1][-1].split('=')[0]}-{i}" for i, c in enumerate(TASK_CASES)])
def test_refused_in_the_task_in_one_line_with_nothing_written(module, overrides, words, absent, tmp_path,
                                                              tiny_model_dir):
    from tests.conftest import FAST_TRAIN, run_module

    tmp = bad_files(tmp_path)
    args = [o.format(tmp=tmp) for o in overrides]
    if module == "train":
        args = [*FAST_TRAIN, *args, "train.max_steps=1", f"output_dir={tmp / 'run'}"]
    result = run_module(module, *args, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("herd: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert words.format(tmp=tmp) in lines[0]
    assert "Traceback" not in result.stderr
    assert not any((tmp / path).exists() for path in absent)


def test_a_second_launch_into_a_run_directory_in_use_is_refused(tmp_path, tiny_model_dir):
    from herd.training.run_lock import RunLock
    from tests.conftest import FAST_TRAIN, run_module

    run_dir = tmp_path / "run"
    holder = RunLock(run_dir)
    holder.acquire()  # this test process plays the launch that is still training
    try:
        result = run_module("train", *FAST_TRAIN, "train.max_steps=1", f"output_dir={run_dir}", check=False)
    finally:
        holder.release()
    assert result.returncode == 2
    assert f"herd: run directory {run_dir} is in use by pid {os.getpid()}" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [], "the refused launch wrote into the run directory"


def test_checkpoints_past_max_steps_are_kept_and_the_rerun_refused(tmp_path, tiny_model_dir):
    from tests.conftest import FAST_TRAIN, run_module

    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 10}))
    (checkpoint / "herd-complete").write_text("10\n")
    result = run_module("train", *FAST_TRAIN, "train.max_steps=4", f"output_dir={run_dir}", check=False)
    assert result.returncode == 2
    assert "has checkpoints past train.max_steps=4 (newest: checkpoint-10)" in result.stderr
    assert (checkpoint / "trainer_state.json").exists() and not (run_dir / "config.yaml").exists()


# ---- overwrite replaces only herd's own output, and only once the new one is whole ------------------------


def test_generate_overwrite_leaves_a_file_herd_did_not_write(tmp_path):
    from herd import jsonl_parts
    from herd.errors import ConfigError

    final = tmp_path / "answers.jsonl"
    final.write_text("the user's own notes\n")
    with pytest.raises(ConfigError, match="was not written by herd .* left as it is"):
        jsonl_parts.begin(final, "settings", overwrite=True)
    assert final.read_text() == "the user's own notes\n"


def test_generate_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    from herd import jsonl_parts

    final = tmp_path / "answers.jsonl"
    assert jsonl_parts.begin(final, "old", overwrite=False) is False
    writer = jsonl_parts.PartWriter(final, 0)
    writer.write([{"id": 0, "response": "old"}])
    writer.close()
    jsonl_parts.finalize(final, [0], {"fingerprint": "old"})
    assert jsonl_parts.begin(final, "new", overwrite=True) is False
    assert json.loads(final.read_text())["response"] == "old", "overwrite removed the old output up front"
    writer = jsonl_parts.PartWriter(final, 0)
    writer.write([{"id": 0, "response": "new"}])
    writer.close()
    jsonl_parts.finalize(final, [0], {"fingerprint": "new"})
    assert json.loads(final.read_text())["response"] == "new"


def test_merge_overwrite_refuses_a_folder_herd_did_not_merge(trained_run, tmp_path):
    from tests.conftest import run_module

    precious = tmp_path / "runs"
    (precious / "run-1").mkdir(parents=True)
    (precious / "run-1" / "adapter.bin").write_text("weeks of training")
    result = run_module("infer.merge", f"run_dir={trained_run}", f"merge.output={precious}", "merge.overwrite=true",
                        check=False)
    assert result.returncode == 2
    assert f"merge.overwrite: {precious} is not a model herd merged (no herd_merge.json)" in result.stderr
    assert (precious / "run-1" / "adapter.bin").read_text() == "weeks of training"


# ---- storage faults on a real small file system (tmpfs, mounted by the test: needs root, as CI runs) ------


@pytest.fixture
def small_mount(tmp_path):
    """A 200 KiB tmpfs at tmp_path/mnt; yields (mount point, remount read-only)."""
    import subprocess

    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("storage-fault tests mount a tmpfs: CI runs as root and must run them")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], check=True)
    try:
        yield mount, lambda: subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_ends_in_one_line_and_the_run_resumes_elsewhere(small_mount, tiny_model_dir):
    from tests.conftest import FAST_TRAIN, run_module

    mount, _ = small_mount
    run_dir = mount / "run"
    result = run_module("train", *FAST_TRAIN, "train.max_steps=2", "train.save_steps=1", f"output_dir={run_dir}",
                        check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("herd: ")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "no space left on the device" in lines[0] and str(run_dir) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()


def test_a_read_only_file_system_ends_in_one_line(small_mount, tiny_model_dir):
    from tests.conftest import FAST_TRAIN, run_module

    mount, read_only = small_mount
    read_only()
    result = run_module("train", *FAST_TRAIN, "train.max_steps=1", f"output_dir={mount / 'run'}", check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("herd: ")]
    assert result.returncode == 1 and lines == [f"herd: read-only file system: {mount / 'run'}"], result.stderr[-3000:]
