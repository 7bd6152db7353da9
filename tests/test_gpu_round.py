"""The GPU round (benchmarks/gpu_round.py) rehearsed on CPU, so that it cannot rot between GPU sessions.

The default suite runs stages a (pytest -m gpu: every gpu test skipped here, the skips recorded) and c (the
random-init builder through `python -m train`, against plan=true) for real, re-runs to check that finished
stages are skipped, and checks the budget / resume logic with stand-in stages. Every stage on CPU, b's
sharded strategies and d's benchmark included, is `pytest -m rehearsal` (~7 min on 2 cores)."""

import importlib.util
import json
import subprocess
import sys
import time

import pytest

from tests.conftest import OFFLINE_ENV, REPO

SCRIPT = REPO / "benchmarks" / "gpu_round.py"


def gpu_round(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def stage(out, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def assert_passed(record: dict) -> None:
    failed = [(s["name"], s.get("stderr_tail", "")[-1500:], s.get("figures")) for s in record["steps"]
              if s.get("passed") is False]
    assert record["status"] == "pass" and record["finished"], failed


def test_stages_a_and_c_on_cpu_then_a_rerun_skips_them(tmp_path):
    out = tmp_path / "round"
    result = gpu_round("--out", str(out), "--budget-s", "300", "--stages", "a,c")
    assert result.returncode == 0, result.stderr[-3000:]
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["rc"] == 0 and preflight["versions"]["torch"] and preflight["cuda"] is False
    assert preflight["wheels"]["installed"] is False  # CPU: the device's wheels are not installed here

    tests = stage(out, "a_gpu_tests")
    assert_passed(tests)
    counts = tests["figures"]["counts"]
    assert tests["figures"]["skipped_gpu_tests"] == counts["skipped"] >= 6 and not counts.get("passed")
    [step] = tests["steps"]
    assert step["command"][-5:] == ["-m", "gpu", "-ra", "-q", "-p", "no:cacheprovider"][-5:]
    assert all("CUDA GPU" in skip["reason"] for skip in step["figures"]["skipped"])

    sizes = stage(out, "c_random_init")
    assert_passed(sizes)
    tiny = sizes["figures"]["tiny"]
    assert tiny["tokens_per_s_median"] > 0 and tiny["build_seconds"] is not None and tiny["plan_total_gb"] > 0
    [step] = sizes["steps"]
    assert "model.random_init=true" in step["command"] and step["figures"]["global_step"] == 5
    assert step["figures"]["built_layers"] == 2 and step["figures"]["plan_rc"] == 0
    assert "plan=true" in step["figures"]["plan_command"]

    written = {name: (out / f"{name}.json").stat().st_mtime_ns for name in ("a_gpu_tests", "c_random_init")}
    started = time.monotonic()
    again = gpu_round("--out", str(out), "--budget-s", "300", "--stages", "a,c")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "a_gpu_tests: skipped, finished earlier (pass)" in again.stdout
    assert "c_random_init: skipped, finished earlier (pass)" in again.stdout
    assert {name: (out / f"{name}.json").stat().st_mtime_ns for name in written} == written
    assert time.monotonic() - started < 60  # no stage, and no second preflight, ran
    assert json.loads((out / "summary.json").read_text())["stages"]["a_gpu_tests"].startswith("pass")


def load_round_module():
    spec = importlib.util.spec_from_file_location("gpu_round_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_cuts_a_stage_which_a_rerun_continues_reusing_its_passed_steps(tmp_path, monkeypatch, capsys):
    """Stand-in stages (short python commands): a step the budget would outlive is not started, the stage is
    left unfinished ('cut'), the next run reuses its passed steps and finishes it; --redo runs it again."""
    module = load_round_module()
    monkeypatch.setattr(module.Round, "preflight", lambda self: {})
    monkeypatch.setattr(module, "MIN_START_S", dict.fromkeys(module.STAGES, 0))
    marker = tmp_path / "first.done"

    def stand_in(round_, stage):
        stage.step("first", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], timeout=60,
                   outputs=(marker,))
        stage.step("second", [sys.executable, "-c", "print('PARSED {\"x\": 1}')"], timeout=60,
                   check=lambda result: (True, module.last_json_line(result["stdout"], "PARSED ")))
    monkeypatch.setattr(module, "RUNNERS", {**module.RUNNERS, "a_gpu_tests": stand_in})
    out = tmp_path / "round"
    common = ["--out", str(out), "--device", "cpu", "--stages", "a"]

    # Budget for the first step only: the second needs 15 s of budget left to start.
    real_left = module.Round.left
    calls = {"n": 0}

    def left(self):
        calls["n"] += 1
        return 100.0 if calls["n"] <= 2 else 10.0
    monkeypatch.setattr(module.Round, "left", left)
    module.main([*common, "--budget-s", "100"])
    cut = json.loads((out / "a_gpu_tests.json").read_text())
    assert cut["status"] == "cut" and not cut["finished"]
    assert [s.get("passed") for s in cut["steps"]] == [True, False] and cut["steps"][1]["skipped"] == "budget spent"

    monkeypatch.setattr(module.Round, "left", real_left)
    module.main([*common, "--budget-s", "100"])
    done = json.loads((out / "a_gpu_tests.json").read_text())
    assert done["status"] == "pass" and done["finished"]
    assert done["steps"][0]["reused"] is True and done["steps"][1]["figures"] == {"x": 1}

    capsys.readouterr()
    module.main([*common, "--budget-s", "100"])
    assert "a_gpu_tests: skipped, finished earlier (pass)" in capsys.readouterr().out
    marker.unlink()
    module.main([*common, "--budget-s", "100", "--redo"])
    redone = json.loads((out / "a_gpu_tests.json").read_text())
    assert redone["status"] == "pass" and not redone["steps"][0].get("reused") and marker.exists()


def test_a_step_outliving_the_budget_is_killed_and_recorded(tmp_path, monkeypatch):
    module = load_round_module()
    monkeypatch.setattr(module.Round, "preflight", lambda self: {})
    monkeypatch.setattr(module, "MIN_START_S", dict.fromkeys(module.STAGES, 0))

    def slow(round_, stage):
        stage.step("sleeps", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=600)
    monkeypatch.setattr(module, "RUNNERS", {**module.RUNNERS, "a_gpu_tests": slow})
    out = tmp_path / "round"
    started = time.monotonic()
    module.main(["--out", str(out), "--device", "cpu", "--stages", "a", "--budget-s", "22"])
    assert time.monotonic() - started < 30
    record = json.loads((out / "a_gpu_tests.json").read_text())
    assert record["status"] == "cut" and "killed at its timeout" in record["steps"][0]["error"]


@pytest.mark.rehearsal
def test_every_stage_on_cpu(tmp_path):
    """All stages as the GPU session runs them, on CPU over gloo (b: fsdp, zero3 with kill + resume, zero2,
    infer; c: the tiny shape through the random-init builder; d: bench_train's sides; e: zero3_offload)."""
    out = tmp_path / "round"
    result = gpu_round("--out", str(out), "--budget-s", "1500", "--with-offload", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("a_gpu_tests", "b_strategies", "c_random_init", "d_throughput", "e_offload"):
        assert_passed(stage(out, name))
    strategies = stage(out, "b_strategies")
    names = [s["name"] for s in strategies["steps"]]
    for strategy in ("fsdp", "zero3"):
        assert f"{strategy}: resumed adapter == uninterrupted" in names
    compared = [s["figures"] for s in strategies["steps"] if s["name"].endswith("== uninterrupted")]
    assert all(c["exact"] and c["resumed_from"] == "checkpoint-2" for c in compared)
    assert {"infer.evaluate", "infer.generate nf4", "infer.generate int8", "infer.merge numeric check"} <= set(names)
    throughput = stage(out, "d_throughput")["figures"]
    assert {"baseline", "herd", "herd-no-checkpointing"} <= set(throughput)
    assert throughput["herd"]["x_herd_default"] == 1.0
