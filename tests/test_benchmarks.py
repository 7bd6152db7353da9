"""The training benchmark runs each side it names, and each side trains with what its name says.

No timings are checked here: the figures are measured by the benchmark and committed under
benchmarks/results/.
"""

import json
import os
import subprocess
import sys

from tests.conftest import OFFLINE_ENV, REPO

BENCH_TRAIN = REPO / "benchmarks" / "bench_train.py"


def bench_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH_TRAIN), *args], cwd=REPO, env={**os.environ, **OFFLINE_ENV},
                          capture_output=True, text=True, timeout=600, check=False)


def test_each_side_trains_with_what_its_name_says(tmp_path):
    out = tmp_path / "report.json"
    result = bench_train("--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-len", "128",
                         "--micro-batch", "2", "--conversations", "40", "--out", str(out),
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
    result = bench_train("--sides", "baseline,herd-fast", "--out", str(out))
    assert result.returncode != 0
    refusal = [line for line in result.stderr.splitlines() if line.startswith("bench_train:")]
    allowed = "baseline, herd, herd-one-row, herd-no-checkpointing, herd-trl-head, herd-2-workers"
    assert refusal == [f"bench_train: unknown side 'herd-fast' in --sides; allowed: {allowed}"]
    assert not out.exists()
