"""The training benchmarks (SFT and DPO) run each side they name, and each side trains with what its name says.

No timings are checked here: the figures are measured by the benchmark and committed under
benchmarks/results/.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import OFFLINE_ENV, REPO

BENCH_TRAIN = REPO / "benchmarks" / "bench_train.py"
BENCH_DPO = REPO / "benchmarks" / "bench_dpo.py"


def bench(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env={**os.environ, **OFFLINE_ENV},
                          capture_output=True, text=True, timeout=600, check=False)


def test_each_side_trains_with_what_its_name_says(tmp_path):
    out = tmp_path / "report.json"
    result = bench(BENCH_TRAIN, "--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                   "--seq-len", "128", "--micro-batch", "2", "--conversations", "40", "--out", str(out),
                   "--sides", "baseline,herd,herd-one-row,herd-trl-head")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    ran = {r["side"]: {k: r[k] for k in ("lm_head", "packing")} for r in report["results"]}
    assert ran == {
        "baseline": {"lm_head": "TRL fused", "packing": "none (padded)"},
        "herd": {"lm_head": "herd: labelled positions, CPU", "packing": "row per bin"},
        "herd-one-row": {"lm_head": "herd: labelled positions, CPU", "packing": "one flattened row"},
        "herd-trl-head": {"lm_head": "TRL fused", "packing": "row per bin"},
    }
    for measured in report["results"]:
        assert measured["steps_measured"] == 1 and measured["non_padding_tokens_per_s"] > 0
    assert report["device"] and report["versions"]["trl"] and report["settings"]["shape"] == "tiny"


def test_an_unknown_side_is_refused_in_one_line(tmp_path):
    out = tmp_path / "report.json"
    result = bench(BENCH_TRAIN, "--sides", "baseline,herd-fast", "--out", str(out))
    assert result.returncode != 0
    refusal = [line for line in result.stderr.splitlines() if line.startswith("bench_train:")]
    allowed = "baseline, herd, herd-one-row, herd-no-checkpointing, herd-trl-head, herd-2-workers"
    assert refusal == [f"bench_train: unknown side 'herd-fast' in --sides; allowed: {allowed}"]
    assert not out.exists()


def test_each_dpo_side_trains_with_what_its_name_says(tmp_path):
    out = tmp_path / "report.json"
    result = bench(BENCH_DPO, "--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                   "--seq-len", "512", "--micro-batch", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    keys = ("pairs_tokenized_by", "lora_attached_by", "reference", "gradient_checkpointing", "adapter_dtype")
    ran = {r["side"]: {k: r[k] for k in keys} for r in report["results"]}
    assert ran == {
        "baseline": {"pairs_tokenized_by": "TRL (text tokenized by DPOTrainer)",
                     "lora_attached_by": "TRL (peft_config)", "reference": "adapter switched off",
                     "gradient_checkpointing": True,
                     "adapter_dtype": "bfloat16"},  # TRL casts QLoRA adapters to bf16
        "herd": {"pairs_tokenized_by": "herd.preference cache", "lora_attached_by": "herd.modeling.add_lora",
                 "reference": "adapter switched off", "gradient_checkpointing": True,
                 "adapter_dtype": "float32"},  # herd restores the adapters as loaded
    }
    pairs = {r["side"]: r["pairs"] for r in report["results"]}
    # The same 400 bundled pairs: herd drops those longer than 512 tokens, TRL truncates them.
    assert pairs["baseline"]["in_data"] == pairs["herd"]["in_data"] == 400
    assert pairs["herd"]["dropped_too_long"] > 0 and pairs["herd"]["truncated"] == 0
    assert pairs["baseline"]["dropped_too_long"] == 0 and pairs["baseline"]["truncated"] > 0
    for measured in report["results"]:
        assert measured["steps_measured"] == 1 and measured["pair_tokens_per_s"] > 0 and measured["peak_rss_gb"] > 0
        assert measured["final_loss"] > 0 and measured["trainable_parameters"] > 0
    assert report["settings"]["shape"] == "tiny" and report["settings"]["beta"] == 0.1


def test_an_unknown_dpo_side_is_refused_in_one_line(tmp_path):
    out = tmp_path / "report.json"
    result = bench(BENCH_DPO, "--sides", "baseline,herd-fast", "--out", str(out))
    assert result.returncode != 0
    refusal = [line for line in result.stderr.splitlines() if line.startswith("bench_dpo:")]
    allowed = "baseline, herd, herd-no-checkpointing"
    assert refusal == [f"bench_dpo: unknown side 'herd-fast' in --sides; allowed: {allowed}"]
    assert not out.exists()
