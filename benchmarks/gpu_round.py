"""The GPU round: one command runs every CUDA-only path of herd and the 7B / 13B / 70B measurements, in
priority order, inside a device lease; rehearsed on CPU by the test suite (tests/test_gpu_round.py).

    python3 benchmarks/gpu_round.py --out /tmp/round --budget-s 520 --copy-to "$OUT"      # on the GPU machine
    python benchmarks/gpu_round.py --out /tmp/rehearsal --budget-s 900 --device cpu --shape tiny

Stages, in priority order, each through herd's real entrypoints (subprocesses), each writing
<out>/<stage>.json (device, versions, exact commands, figures, pass/fail, output tails) after every step,
so a round cut short still returns what it finished:
  a_gpu_tests     pytest -m gpu -ra (on CPU: every gpu test skipped, the skips recorded)
  b_strategies    accelerate launch --num_processes 1 -m train strategy=fsdp|zero3|zero2 (tiny or small
                  shape, 4 steps): trains and saves; fsdp and zero3 SIGKILLed after step 2, re-run, and the
                  resumed adapter compared with the uninterrupted one; then infer.evaluate, infer.generate
                  in 4-bit and 8-bit, infer.merge's numeric check
  c_random_init   model.random_init=true under strategy=single, 5 optimizer steps at seq 2048 for Llama-2-13B
                  and Llama-2-70B (on CPU: the --shape through the same builder, seq 256): measured peak
                  allocated / reserved against plan=true for the same overrides, tokens/s, MFU
  d_throughput    benchmarks/bench_train.py --random-init, Llama-2-7B (on CPU: --shape, 1 round): the plain
                  TRL+PEFT baseline, herd, herd without checkpointing (micro batch 4); herd with
                  flex_attention; herd at micro batch 8
  e_offload       strategy=zero3_offload the same way as b, last: DeepSpeed compiles its CPU Adam first
                  (~85 s on CPU; on CPU only with --with-offload)
A stage whose JSON says finished is skipped by a re-run (--redo runs it again); inside an unfinished stage,
steps that passed and whose outputs still exist are reused. No stage starts, and no step outlives, the
budget: a step cut by it is recorded as such and its stage stays unfinished.

First, when `.whl/` holds wheels (scripts/gpu-wheels) and the device is CUDA, they are installed with
`pip install --no-index --no-deps --target <site>` and <site> leads every subprocess's PYTHONPATH.
Only the standard library is imported here: torch and the rest are imported by the subprocesses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("a_gpu_tests", "b_strategies", "c_random_init", "d_throughput", "e_offload")
TAIL = 3000  # characters of each step's stdout / stderr kept in the JSON
CUDA_CONTEXT_GB = 650 / 1024  # herd.memory.CUDA_CONTEXT: outside torch's allocator, in the plan's total
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# Small training runs of stage b (the suite's tests/test_strategies.py RESUME settings).
SHORT_RUN = ["data=sample", "peft=qlora", "train.global_batch_size=4", "train.micro_batch_size=2",
             "train.max_steps=4", "train.save_steps=2", "train.eval_steps=100", "train.logging_steps=1",
             "data.max_samples=64", "train.learning_rate=3e-3", "train.warmup_ratio=0", "data.max_seq_len=256",
             "train.gradient_checkpointing=true"]
# One process through the real launcher (herd makes the one-process group FSDP / DeepSpeed need).
LAUNCH_ONE = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "train"]
SMALL_SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4}  # benchmarks/bench_train.py's "small"

PREFLIGHT = r"""
import importlib, importlib.metadata as md, json, platform, sys
facts = {"python": sys.version.split()[0], "platform": platform.platform(), "versions": {}, "import_errors": {}}
for dist, module in [("torch", "torch"), ("transformers", "transformers"), ("trl", "trl"), ("peft", "peft"),
                     ("accelerate", "accelerate"), ("bitsandbytes", "bitsandbytes"), ("deepspeed", "deepspeed"),
                     ("hydra-core", "hydra"), ("omegaconf", "omegaconf"), ("datasets", "datasets"),
                     ("safetensors", "safetensors"), ("tokenizers", "tokenizers"),
                     ("huggingface-hub", "huggingface_hub"), ("pyarrow", "pyarrow"), ("numpy", "numpy"),
                     ("pydantic", "pydantic"), ("pytest", "pytest")]:
    try:
        facts["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        facts["versions"][dist] = None
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001
        facts["import_errors"][dist] = f"{type(error).__name__}: {error}"[:400]
import torch
facts["cuda"] = torch.cuda.is_available()
if facts["cuda"]:
    props = torch.cuda.get_device_properties(0)
    facts.update(device=props.name, device_memory_gb=props.total_memory / 2**30, gpu_count=torch.cuda.device_count(),
                 torch_cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability(0)))
else:
    facts.update(device=platform.processor() or "cpu", device_memory_gb=None, gpu_count=0)
try:
    from bitsandbytes.cextension import lib
    facts["bitsandbytes_library"] = str(getattr(lib, "_name", None) or lib)[:200]
except Exception as error:  # noqa: BLE001
    facts["bitsandbytes_library"] = f"{type(error).__name__}: {error}"[:300]
print("PREFLIGHT " + json.dumps(facts))
"""

COMPARE_ADAPTERS = r"""
import json, sys, torch
from safetensors.torch import load_file
a, b = (load_file(p + "/adapter/adapter_model.safetensors") for p in sys.argv[1:3])
same_keys = a.keys() == b.keys()
diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b]
num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a if k in b) ** 0.5
den = sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5
exact = same_keys and all(torch.allclose(b[k].float(), a[k].float(), rtol=1e-5, atol=1e-7) for k in a)
loss = [json.load(open(p + "/metrics.json"))["final_train_loss"] for p in sys.argv[1:3]]
print("COMPARE " + json.dumps({"same_keys": same_keys, "tensors": len(a), "max_abs_diff": max(diffs or [0.0]),
                               "relative_fro_diff": num / den if den else None, "exact": exact,
                               "final_train_loss": loss}))
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def tail(text: str | bytes | None, n: int = TAIL) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def atomic_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(partial, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Round:
    """Budget, environment, subprocesses and the stage files of one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.out = Path(args.out).resolve()
        self.work = Path(args.work or f"{self.out}-work").resolve()
        self.copy_to = Path(args.copy_to).resolve() if args.copy_to else None
        self.cuda = args.device == "cuda"
        self.python = sys.executable
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.site: Path | None = None
        self.facts: dict = {}

    # -- time ---------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- environment --------------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        paths = [str(self.site)] if self.site else []
        paths += [str(REPO), str(REPO / "src")]
        env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join(
            [*paths, *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("HERD_RUN_ID", None)
        for key in [k for k in env if k.startswith("HERD_DEBUG_")]:
            env.pop(key)
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra or {})
        return env

    # -- subprocesses -------------------------------------------------------------------------------------
    def run(self, command: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> dict:
        """Run one command in its own process group (accelerate launch has children), killed whole at its
        timeout. Returns rc, seconds, output tails and the full stdout (for parsing, not stored)."""
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, env=self.env(env), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        return {"command": command, "rc": process.returncode, "timed_out": timed_out,
                "seconds": round(time.monotonic() - started, 1), "stdout": stdout or "", "stderr": stderr or ""}

    # -- the wheels and the facts of the machine ----------------------------------------------------------
    def install_wheels(self) -> dict:
        wheels = sorted(Path(self.args.wheels).glob("*.whl")) if self.args.wheels else []
        wanted = self.args.install_wheels == "yes" or (self.args.install_wheels == "auto" and self.cuda)
        if not wheels or not wanted:
            return {"installed": False, "reason": "no wheels" if not wheels else f"--install-wheels "
                    f"{self.args.install_wheels} on {self.args.device}"}
        site = Path(self.args.site)
        stamp = hashlib.sha256("\n".join(f"{w.name}:{w.stat().st_size}" for w in wheels).encode()).hexdigest()
        marker = site / ".herd-wheels"
        record = {"installed": True, "site": str(site), "wheels": [w.name for w in wheels]}
        if marker.is_file() and marker.read_text() == stamp:
            self.site = site
            return {**record, "reused": True}
        shutil.rmtree(site, ignore_errors=True)
        result = self.run([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                          timeout=min(300, self.left()))
        record.update(rc=result["rc"], seconds=result["seconds"], stderr_tail=tail(result["stderr"], 1500))
        if result["rc"] == 0:
            marker.write_text(stamp)
            self.site = site
        return record

    def preflight(self) -> dict:
        """Install the wheels and read the machine's facts; a re-run on the same machine (same out, same
        Python, same wheels, site still there) reuses them instead of paying another import of the stack."""
        path = self.out / "preflight.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        wheels = self.install_wheels()
        same = (previous.get("rc") == 0 and previous.get("executable") == self.python
                and previous.get("wheels", {}).get("wheels") == wheels.get("wheels") and not self.args.redo)
        if same:
            self.facts = {k: previous.get(k) for k in ("date", "device", "device_memory_gb", "gpu_count", "python",
                                                       "versions", "import_errors", "cuda", "bitsandbytes_library",
                                                       "cpu_count")} | {"git": self.git_state()}
            return previous
        result = self.run([self.python, "-c", PREFLIGHT], timeout=min(180, max(self.left(), 30)))
        line = next((x for x in result["stdout"].splitlines() if x.startswith("PREFLIGHT ")), None)
        facts = json.loads(line.removeprefix("PREFLIGHT ")) if line else {}
        self.facts = {
            "date": now(), "device": facts.get("device"), "device_memory_gb": facts.get("device_memory_gb"),
            "gpu_count": facts.get("gpu_count"), "python": facts.get("python"), "versions": facts.get("versions"),
            "import_errors": facts.get("import_errors"), "cuda": facts.get("cuda"),
            "bitsandbytes_library": facts.get("bitsandbytes_library"), "cpu_count": os.cpu_count(),
            "git": self.git_state(),
        }
        record = {**self.facts, "executable": self.python, "wheels": wheels, "rc": result["rc"],
                  "seconds": result["seconds"],
                  "stderr_tail": tail(result["stderr"])}
        self.save(path, record)
        if self.cuda and not facts.get("cuda"):
            print("gpu_round: --device cuda but torch sees no CUDA device; see preflight.json", flush=True)
        return record

    def git_state(self) -> dict:
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain"], check=False, cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip())
            return {"sha": sha or None, "dirty": dirty}
        except (OSError, subprocess.SubprocessError):
            return {"sha": None, "dirty": None}

    def save(self, path: Path, record: dict) -> None:
        atomic_json(path, record)
        if self.copy_to is not None:
            atomic_json(self.copy_to / path.name, record)


class Stage:
    """One stage's record: its steps, written after each one."""

    def __init__(self, round_: Round, name: str) -> None:
        self.round, self.name = round_, name
        self.path = round_.out / f"{name}.json"
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.previous = {s["name"]: s for s in previous.get("steps", []) if s.get("passed")}
        self.record = {"stage": name, "status": "running", "finished": False, "started": now(),
                       "device": round_.args.device, "shape": round_.args.shape, "machine": round_.facts,
                       "steps": [], "figures": {}, "notes": []}
        self.started = time.monotonic()
        self.cut = False
        self.write()

    def write(self) -> None:
        self.record["seconds"] = round(time.monotonic() - self.started, 1)
        self.round.save(self.path, self.record)

    def step(self, name: str, command: list[str], *, timeout: float, env: dict | None = None,
             check=None, outputs: tuple[Path, ...] = (), expect_rc: int | None = 0, cwd: Path = REPO) -> dict:
        """Run one command; `check(result) -> (passed, figures)` judges it (default: the exit code).
        A step that passed in an earlier run of this unfinished stage, outputs still there, is reused."""
        old = self.previous.get(name)
        if old and all(Path(p).exists() for p in old.get("outputs", [])):
            reused = {**old, "reused": True}
            self.record["steps"].append(reused)
            self.write()
            return reused
        left = self.round.left() - 5
        if self.cut or left < 15:
            self.cut = True
            skipped = {"name": name, "command": command, "passed": False, "skipped": "budget spent"}
            self.record["steps"].append(skipped)
            self.write()
            return skipped
        print(f"gpu_round: {self.name}: {name} (timeout {min(timeout, left):.0f} s)", flush=True)
        result = self.round.run(command, timeout=min(timeout, left), env=env, cwd=cwd)
        entry = {"name": name, "command": command, "env": env or {}, "rc": result["rc"],
                 "seconds": result["seconds"], "outputs": [str(p) for p in outputs]}
        if result["timed_out"]:
            entry.update(passed=False, error=f"killed at its timeout ({min(timeout, left):.0f} s)")
            self.cut = self.cut or timeout >= left  # the budget, not the step's own limit, ended it
        else:
            try:
                passed, figures = check(result) if check else (result["rc"] == expect_rc, {})
            except Exception as error:  # noqa: BLE001 -- a parse failure is a failed step, not a dead round
                passed, figures = False, {"check_error": f"{type(error).__name__}: {error}"}
            if expect_rc is not None and result["rc"] != expect_rc and check is not None:
                passed = False
            entry.update(passed=bool(passed), figures=figures)
        entry.update(stdout_tail=tail(result["stdout"]), stderr_tail=tail(result["stderr"]))
        entry["_stdout"] = result["stdout"]  # for the caller; dropped before writing
        self.record["steps"].append({k: v for k, v in entry.items() if k != "_stdout"})
        self.write()
        print(f"gpu_round: {self.name}: {name}: {'pass' if entry['passed'] else 'FAIL'} "
              f"({entry['seconds']} s)", flush=True)
        return entry

    def skip(self, name: str, reason: str) -> None:
        self.record["steps"].append({"name": name, "passed": None, "skipped": reason})
        self.write()

    def will_run(self, name: str) -> bool:
        """Whether step(name, ...) would run a command now (not reused, budget left)."""
        old = self.previous.get(name)
        if old and all(Path(p).exists() for p in old.get("outputs", [])):
            return False
        return not self.cut and self.round.left() - 5 >= 15

    def finish(self) -> dict:
        steps = self.record["steps"]
        ran = [s for s in steps if not s.get("skipped")]
        budget_skipped = [s for s in steps if s.get("skipped") == "budget spent"]
        failed = [s["name"] for s in ran if not s.get("passed")]
        self.record["failed_steps"] = failed
        if self.cut or budget_skipped:
            self.record.update(status="cut", finished=False)  # a re-run continues it
        else:
            self.record.update(status="fail" if failed else "pass", finished=True)
        self.record["ended"] = now()
        self.write()
        return self.record


# ---------------------------------------------------------------------------------------------- helpers

def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_figures(run_dir: Path) -> dict:
    """Figures of a finished training run from its metrics.json and metrics.jsonl (herd's tracker)."""
    metrics = metrics_of(run_dir)
    events = read_jsonl(run_dir / "metrics.jsonl")
    train = [e for e in events if e.get("kind") == "train"]
    later = [e for e in train if e.get("step", 0) >= 2] or train  # the first step carries warm-up
    speeds = [e["train/tokens_per_s"] for e in later if "train/tokens_per_s" in e]
    mfus = [e["train/mfu"] for e in later if "train/mfu" in e]
    allocated = [e["memory/peak_gib_rank0"] for e in train if "memory/peak_gib_rank0" in e]
    reserved = [e["memory/peak_reserved_gib_rank0"] for e in train if "memory/peak_reserved_gib_rank0" in e]
    return {
        "global_step": metrics.get("global_step"), "final_train_loss": metrics.get("final_train_loss"),
        "eval_loss_before": metrics.get("eval_loss_before"), "eval_loss_after": metrics.get("eval_loss_after"),
        "distributed": metrics.get("distributed"), "gradient_checkpointing": metrics.get("gradient_checkpointing"),
        "lm_head": metrics.get("lm_head"), "packing": metrics.get("packing"),
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
        "tokens_per_s_per_step": speeds, "mfu_median": statistics.median(mfus) if mfus else None,
        "peak_allocated_gib": max(allocated) if allocated else None,
        "peak_reserved_gib": max(reserved) if reserved else None,
    }


def expected_distributed(strategy: str, cuda: bool) -> str:
    if strategy == "fsdp":
        return "FSDP" if cuda else "MULTI_CPU"  # on CPU herd's own FSDP2 over gloo
    return "DEEPSPEED"


def check_strategy_run(run_dir: Path, strategy: str, cuda: bool, steps: int = 4):
    def check(result: dict):
        figures = train_figures(run_dir)
        facts = figures["distributed"] or {}
        problems = []
        if figures["global_step"] != steps:
            problems.append(f"global_step {figures['global_step']} != {steps}")
        if facts.get("distributed_type") != expected_distributed(strategy, cuda):
            problems.append(f"distributed_type {facts.get('distributed_type')}")
        if facts.get("num_processes") != 1:
            problems.append(f"num_processes {facts.get('num_processes')}")
        if strategy == "fsdp" and not facts.get("sharded_parameters"):
            problems.append("no sharded parameters")
        if strategy.startswith("zero3") and not facts.get("partitioned_parameters"):
            problems.append("no ZeRO-3 partitioned parameters")
        if strategy == "zero3_offload" and not (facts.get("offload_optimizer") and facts.get("offload_params")):
            problems.append("DeepSpeed did not offload")
        if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            problems.append("no adapter written")
        if cuda and not any(d.startswith("cuda") for d in facts.get("devices", [])):
            problems.append(f"devices {facts.get('devices')}")
        figures["problems"] = problems
        return not problems, figures
    return check


def last_json_line(stdout: str, prefix: str) -> dict:
    line = next(x for x in reversed(stdout.splitlines()) if x.startswith(prefix))
    return json.loads(line.removeprefix(prefix))


def model_args(round_: Round) -> list[str]:
    """The model of stage b: herd's tiny Llama, or the small shape with saved random weights."""
    if round_.args.shape == "tiny":
        return ["model=tiny"]
    directory = round_.work / "models" / "small"
    return ["model=local", f"model.path={directory}"]


def ensure_small_model(round_: Round) -> None:
    """The small shape as a model directory with weights (sharded strategies load from files) and herd's
    tiny tokenizer; built once in a subprocess."""
    directory = round_.work / "models" / "small"
    if (directory / "model.safetensors").is_file():
        return
    script = ("import sys, shutil; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
              "from bench_train import build_model; from herd.fixtures.tiny import ensure_tiny_model;"
              f"d = Path({str(directory)!r}); build_model('small', d, vocab=32000);"
              "t = ensure_tiny_model(Path('.herd/models/tiny-llama'));"
              "[shutil.copy2(t / f, d / f) for f in ('tokenizer.json', 'tokenizer_config.json',"
              " 'chat_template.jinja') if (t / f).is_file()]")
    result = round_.run([round_.python, "-c", script], timeout=min(300, round_.left()))
    if result["rc"] != 0:
        raise RuntimeError(f"building the small model failed: {tail(result['stderr'], 800)}")


# ---------------------------------------------------------------------------------------------- stages

def stage_a(round_: Round, stage: Stage) -> None:
    """pytest -m gpu -ra: on a GPU the gpu-marked tests run (two-GPU ones skip on one); on CPU all skip."""
    def check(result: dict):
        text = result["stdout"] + result["stderr"]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
        skips = [{"count": int(n), "reason": r} for n, r in re.findall(r"^SKIPPED \[(\d+)\] (.+)$", text,
                                                                        flags=re.MULTILINE)]
        failures = re.findall(r"^(?:FAILED|ERROR) (.+)$", text, flags=re.MULTILINE)
        figures = {"counts": counts, "skipped": skips, "failures": failures}
        ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("skipped", 0)
        return result["rc"] == 0 and ran > 0 and not failures, figures
    stage.step("pytest -m gpu -ra", [round_.python, "-m", "pytest", "-m", "gpu", "-ra", "-q", "-p",
                                     "no:cacheprovider"], timeout=420, check=check, expect_rc=None)
    figures = (stage.record["steps"][-1].get("figures") or {})
    stage.record["figures"] = {"counts": figures.get("counts"),
                               "skipped_gpu_tests": sum(s["count"] for s in figures.get("skipped", []))}


def stage_b(round_: Round, stage: Stage) -> None:
    cuda = round_.cuda
    if round_.args.shape == "small":
        ensure_small_model(round_)
    launch, base = LAUNCH_ONE, [*model_args(round_), *SHORT_RUN]
    launch = [round_.python, *launch]
    work = round_.work / "b"
    finished_runs: list[Path] = []
    for strategy in ("fsdp", "zero3", "zero2"):
        straight = work / strategy / "straight"
        command = [*launch, *base, f"strategy={strategy}", f"output_dir={straight}"]
        trained = stage.step(f"{strategy}: train 4 steps, save", command, timeout=600,
                             check=check_strategy_run(straight, strategy, cuda),
                             outputs=(straight / "metrics.json",))
        if trained.get("passed"):
            finished_runs.append(straight)
        if strategy == "zero2":
            continue
        resumed = work / strategy / "resumed"
        if not (resumed / "metrics.json").exists():
            shutil.rmtree(resumed, ignore_errors=True)

        def killed_check(result, resumed=resumed):
            complete = (resumed / "checkpoint-2" / "herd-complete").is_file()
            return result["rc"] != 0 and complete and not (resumed / "adapter").exists(), {
                "rc": result["rc"], "checkpoint_2_complete": complete}
        stage.step(f"{strategy}: SIGKILL after step 2", [*launch, *base, f"strategy={strategy}",
                                                         f"output_dir={resumed}"],
                   timeout=600, env={"HERD_DEBUG_KILL_AFTER_STEP": "2"}, check=killed_check, expect_rc=None,
                   outputs=(resumed / "checkpoint-2" / "herd-complete",))
        again = stage.step(f"{strategy}: same command resumes", [*launch, *base, f"strategy={strategy}",
                                                                f"output_dir={resumed}"],
                           timeout=600, check=check_strategy_run(resumed, strategy, cuda),
                           outputs=(resumed / "metrics.json",))
        if again.get("passed") and trained.get("passed"):
            def compare_check(result, resumed=resumed):
                compared = last_json_line(result["stdout"], "COMPARE ")
                # CPU: bit-exact (the suite's standard). CUDA kernels (sdpa backward, atomics) are not bitwise
                # deterministic, so there the adapters must agree to 1% of their norm and the losses to 1%;
                # a resume that lost its optimizer state or data position differs by far more.
                loss_a, loss_b = compared["final_train_loss"]
                close = (compared["relative_fro_diff"] is not None and compared["relative_fro_diff"] <= 1e-2
                         and abs(loss_a - loss_b) <= 1e-2 * abs(loss_a))
                resumed_from = metrics_of(resumed).get("resumed_from")
                compared["resumed_from"] = resumed_from
                ok = compared["same_keys"] and resumed_from == "checkpoint-2" and (
                    compared["exact"] if not cuda else close)
                return ok, compared
            stage.step(f"{strategy}: resumed adapter == uninterrupted", [round_.python, "-c", COMPARE_ADAPTERS,
                                                                         str(straight), str(resumed)],
                       timeout=180, check=compare_check)
    infer_steps(round_, stage, finished_runs[0] if finished_runs else None)
    stage.record["notes"].append(
        "Two ranks on the one GPU are not run: NCCL refuses two ranks on one device, and gloo has no "
        "reduce-scatter for CUDA tensors (FSDP2) nor a DeepSpeed backend; each rank also takes the GPU of its "
        "local rank (cuda:1 does not exist). Multi-rank sharding is covered on CPU over gloo by the suite "
        "(tests/test_strategies.py) and on 2+ GPUs by tests/test_gpu.py.")
    by_strategy = {}
    for entry in stage.record["steps"]:
        figures = entry.get("figures") or {}
        if entry["name"].endswith("train 4 steps, save") and figures:
            by_strategy[entry["name"].split(":")[0]] = {
                k: figures.get(k) for k in ("tokens_per_s_median", "peak_allocated_gib", "peak_reserved_gib",
                                            "final_train_loss")}
    stage.record["figures"]["strategies"] = by_strategy


def stage_e(round_: Round, stage: Stage) -> None:
    """zero3_offload last: DeepSpeed compiles its CPU Adam first (~85 s on CPU, JIT on the GPU machine too)."""
    if not (round_.cuda or round_.args.with_offload):
        stage.skip("zero3_offload: train 4 steps, save", "CPU rehearsal without --with-offload (DeepSpeed's CPU "
                   "Adam compiles ~85 s here)")
        return
    if round_.args.shape == "small":
        ensure_small_model(round_)
    offload = round_.work / "e" / "zero3_offload"
    stage.step("zero3_offload: train 4 steps, save",
               [round_.python, *LAUNCH_ONE, *model_args(round_), *SHORT_RUN, "strategy=zero3_offload",
                f"output_dir={offload}"],
               timeout=600, check=check_strategy_run(offload, "zero3_offload", round_.cuda),
               outputs=(offload / "metrics.json",))
    figures = stage.record["steps"][-1].get("figures") or {}
    stage.record["figures"] = {k: figures.get(k) for k in ("tokens_per_s_median", "peak_allocated_gib",
                                                           "peak_reserved_gib", "final_train_loss")}


def infer_steps(round_: Round, stage: Stage, run_dir: Path | None) -> None:
    names = ["infer.evaluate", "infer.generate nf4", "infer.generate int8", "infer.merge numeric check"]
    if run_dir is None:
        for name in names:
            stage.skip(name, "no sharded training run finished to infer from")
        return
    out = round_.work / "b" / "infer"
    stage.record["figures"]["infer_run_dir"] = str(run_dir)
    py = round_.python
    evaluation = out / "eval.json"

    def eval_check(result):
        figures = json.loads(evaluation.read_text())
        return figures.get("loss") is not None and figures["loss"] == figures["loss"], {
            k: figures.get(k) for k in ("loss", "perplexity", "tokens", "samples", "world_size")}
    stage.step(names[0], [py, "-m", "infer.evaluate", f"run_dir={run_dir}", f"evaluate.output={evaluation}"],
               timeout=300, check=eval_check, outputs=(evaluation,))
    for quant in ("nf4", "int8"):
        output = out / f"generate-{quant}.jsonl"

        def generate_check(result, output=output):
            lines = read_jsonl(output)
            summary_path = output.with_name(output.stem + ".summary.json")
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            return bool(lines) and all("response" in x for x in lines), {
                "records": len(lines), "completion_tokens": sum(x.get("completion_tokens", 0) for x in lines),
                "summary": {k: v for k, v in summary.items() if k != "settings"}}
        stage.step(names[1 if quant == "nf4" else 2],
                   [py, "-m", "infer.generate", f"run_dir={run_dir}", f"quant={quant}",
                    "generate.max_new_tokens=16", f"generate.output={output}", "generate.overwrite=true"],
                   timeout=300, check=generate_check, outputs=(output,))
    merged = out / "merged"

    def merge_check(result):
        found = re.search(r"max \|logit difference\| merged vs base\+adapter = ([0-9.eE+-]+|nan)", result["stdout"])
        info = json.loads((merged / "herd_merge.json").read_text())
        return info["max_logit_difference"] <= info["tolerance"], {
            "max_logit_difference": info["max_logit_difference"], "tolerance": info["tolerance"],
            "dtype": info.get("dtype"), "printed": found.group(1) if found else None}
    stage.step(names[3], [py, "-m", "infer.merge", f"run_dir={run_dir}", f"merge.output={merged}",
                          "merge.overwrite=true"], timeout=300, check=merge_check, outputs=(merged,))


def plan_figures(stdout: str) -> dict:
    """plan=true's breakdown: each '<component>   X GB' line and the total per GPU."""
    figures = {}
    for name, value in re.findall(r"^\s{2}(\S.*?)\s{2,}([0-9.]+) GB$", stdout, flags=re.MULTILINE):
        figures[name.strip()] = float(value)
    return figures


def stage_c(round_: Round, stage: Stage) -> None:
    """Random-init bases under strategy=single: measured peaks against plan=true, tokens/s, MFU."""
    cuda = round_.cuda
    if cuda:
        sizes = [("llama2-13b", ["model=llama2-13b"]), ("llama2-70b", ["model=llama2-70b"])]
        seq_len = 2048
    else:
        if round_.args.shape == "small":
            config_dir = round_.work / "models" / "small-config"
            config_dir.mkdir(parents=True, exist_ok=True)
            (config_dir / "config.json").write_text(json.dumps({
                "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
                "tie_word_embeddings": False, **SMALL_SHAPE}))
            sizes = [("small", ["model=local", f"model.path={config_dir}"])]
        else:
            sizes = [("tiny", ["model=tiny"])]
        seq_len = 256
    memory_gb = round_.facts.get("device_memory_gb")
    for name, model in sizes:
        run_dir = round_.work / "c" / name
        overrides = [*model, "model.random_init=true", "strategy=single", "data=sample", f"data.max_seq_len={seq_len}",
                     "train.packing=true", "train.micro_batch_size=1", "train.global_batch_size=1",
                     "train.max_steps=5", "train.logging_steps=1", "train.save_steps=1000", "train.warmup_ratio=0",
                     "train.eval_before_train=false", "data.eval_size=0", "train.gradient_checkpointing=true"]
        plan_command = [round_.python, "-m", "train", *overrides, "plan=true", f"output_dir={run_dir}-plan"]
        if memory_gb:
            plan_command.append(f"device_memory_gb={memory_gb:.1f}")
        step_name = f"{name}: random init, 5 steps at seq {seq_len}"
        plan = None
        if stage.will_run(step_name):
            # The plan needs no GPU: it runs beside the training run instead of before it.
            plan = subprocess.Popen(plan_command, cwd=REPO, env=round_.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            shutil.rmtree(run_dir, ignore_errors=True)  # a run cut earlier: start it again (no checkpoints)

        def check(result, run_dir=run_dir):
            figures = train_figures(run_dir)
            built = re.search(r"random-init base built on (\S+): (\d+) decoder layers, \S+, seed \d+, in ([0-9.]+) s",
                              result["stdout"])
            figures["build_seconds"] = float(built.group(3)) if built else None
            figures["built_layers"] = int(built.group(2)) if built else None
            ok = figures["global_step"] == 5 and figures["tokens_per_s_median"] and built is not None
            if cuda:
                ok = ok and figures["mfu_median"] is not None and figures["peak_reserved_gib"] is not None
            return ok, figures
        step = stage.step(step_name, [round_.python, "-m", "train", *overrides, f"output_dir={run_dir}"],
                          timeout=480, check=check, outputs=(run_dir / "metrics.json",))
        figures = step.get("figures") or {}
        if plan is not None:
            try:
                plan_out, plan_err = plan.communicate(timeout=max(30, min(120, round_.left())))
            except subprocess.TimeoutExpired:
                os.killpg(plan.pid, signal.SIGKILL)
                plan_out, plan_err = plan.communicate()
            planned = plan_figures(plan_out)
            figures.update(plan_command=plan_command, plan_rc=plan.returncode, plan_gb=planned,
                           plan_stderr_tail=tail(plan_err, 800) if plan.returncode else "")
            total = planned.get("total per GPU")
            if figures.get("peak_reserved_gib") is not None and total:
                measured = figures["peak_reserved_gib"] + CUDA_CONTEXT_GB
                figures.update(measured_total_gb=measured, plan_over_measured=total / measured)
            recorded = stage.record["steps"][-1]
            recorded["figures"] = figures
            if plan.returncode != 0 or not total:
                recorded["passed"] = False
                figures.setdefault("problems", []).append("plan=true printed no total")
        stage.record["figures"][name] = {k: figures.get(k) for k in (
            "tokens_per_s_median", "mfu_median", "peak_allocated_gib", "peak_reserved_gib", "build_seconds",
            "measured_total_gb", "plan_over_measured")} | {"plan_total_gb": (figures.get("plan_gb") or {}).get(
                "total per GPU")}
        stage.write()


def stage_d(round_: Round, stage: Stage) -> None:
    """bench_train's sides in one run each; the 7B on a GPU, the --shape on CPU."""
    cuda = round_.cuda
    shape = "llama2-7b" if cuda else round_.args.shape
    common = ["--shape", shape, "--device", round_.args.device, "--random-init", "--rounds", "1"]
    if cuda:
        common += ["--steps", "4", "--warmup", "2", "--seq-len", "2048", "--conversations", "2000"]
        runs = [("mb4: baseline, herd, herd-no-checkpointing", ["--micro-batch", "4", "--sides",
                                                               "baseline,herd,herd-no-checkpointing"]),
                ("mb4: herd flex_attention", ["--micro-batch", "4", "--sides", "herd", "--attn", "flex_attention"]),
                ("mb8: herd", ["--micro-batch", "8", "--sides", "herd"])]
    else:
        common += ["--steps", "2", "--warmup", "1", "--seq-len", "256", "--conversations", "200"]
        runs = [("mb4: baseline, herd, herd-no-checkpointing", ["--micro-batch", "4", "--sides",
                                                               "baseline,herd,herd-no-checkpointing"])]
        for name in ("mb4: herd flex_attention", "mb8: herd"):
            stage.skip(name, "CPU rehearsal: one bench_train run (the same script with other flags)")
    results: dict[str, dict] = {}
    for name, extra in runs:
        out = round_.work / "d" / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)

        def check(result, out=out):
            report = json.loads(out.read_text())
            sides = {r["side"] + ("-flex" if "flex" in str(out) else "") + ("-mb8" if "mb8" in str(out) else ""): r
                     for r in report["results"]}
            return all(r.get("non_padding_tokens_per_s", 0) > 0 for r in sides.values()), {
                side: {k: r.get(k) for k in ("non_padding_tokens_per_s", "step_time_s", "tokens_per_step", "mfu",
                                             "peak_allocated_gb", "peak_reserved_gb", "peak_rss_gb", "packing",
                                             "gradient_checkpointing", "lm_head", "time_to_first_step_s")}
                for side, r in sides.items()}
        step = stage.step(name, [round_.python, "benchmarks/bench_train.py", *common, *extra, "--out", str(out)],
                          timeout=540, check=check, outputs=(out,))
        results.update(step.get("figures") or {})
    baseline = (results.get("baseline") or {}).get("non_padding_tokens_per_s")
    default = (results.get("herd") or {}).get("non_padding_tokens_per_s")
    stage.record["figures"] = {
        side: {**r, "x_baseline": (r["non_padding_tokens_per_s"] / baseline) if baseline and r.get(
            "non_padding_tokens_per_s") else None,
               "x_herd_default": (r["non_padding_tokens_per_s"] / default) if default and r.get(
                   "non_padding_tokens_per_s") else None}
        for side, r in results.items() if isinstance(r, dict) and "non_padding_tokens_per_s" in r}


RUNNERS = {"a_gpu_tests": stage_a, "b_strategies": stage_b, "c_random_init": stage_c, "d_throughput": stage_d,
           "e_offload": stage_e}
MIN_START_S = {"a_gpu_tests": 30, "b_strategies": 60, "c_random_init": 60, "d_throughput": 60, "e_offload": 60}


def selected(spec: str) -> list[str]:
    chosen = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = [s for s in STAGES if s == part or s.split("_")[0] == part]
        if not match:
            sys.exit(f"gpu_round: unknown stage {part!r}; stages: {', '.join(STAGES)} (or a, b, c, d)")
        chosen += match
    return [s for s in STAGES if s in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of the stage JSON files (kept for re-runs)")
    parser.add_argument("--budget-s", type=float, required=True, help="no stage starts, and no step runs, past this")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=("tiny", "small"), default="tiny",
                        help="model of stage b (and of c and d on CPU)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, e.g. a,b (default: all)")
    parser.add_argument("--redo", action="store_true", help="run the selected stages again even if finished")
    parser.add_argument("--with-offload", action="store_true", help="CPU: run zero3_offload too (~85 s compile)")
    parser.add_argument("--work", help="run directories and logs (default: <out>-work)")
    parser.add_argument("--copy-to", help="also write each JSON here as it is written (the device's $OUT)")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels to install first (scripts/gpu-wheels)")
    parser.add_argument("--site", default="/tmp/herd-site", help="where the wheels are installed")
    parser.add_argument("--install-wheels", choices=("auto", "yes", "no"), default="auto",
                        help="auto: on --device cuda when wheels are there")
    args = parser.parse_args(argv)
    stages = selected(args.stages)
    round_ = Round(args)
    print(f"gpu_round: {args.device}, budget {args.budget_s:.0f} s, stages {', '.join(stages)}; out {round_.out}",
          flush=True)
    round_.preflight()
    summary = {}
    for name in stages:
        path = round_.out / f"{name}.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if previous.get("finished") and not args.redo:
            summary[name] = f"{previous['status']} (finished earlier; --redo to run again)"
            print(f"gpu_round: {name}: skipped, finished earlier ({previous['status']})", flush=True)
            continue
        if round_.left() < MIN_START_S[name]:
            summary[name] = "not started (budget spent)"
            print(f"gpu_round: {name}: not started, {round_.left():.0f} s of the budget left", flush=True)
            continue
        if args.redo and previous.get("finished"):
            path.unlink()
        stage = Stage(round_, name)
        try:
            RUNNERS[name](round_, stage)
        except Exception as error:  # noqa: BLE001 -- record it; the next stage still runs
            stage.record["notes"].append(f"stage raised {type(error).__name__}: {error}")
            stage.record["steps"].append({"name": "stage", "passed": False, "error": f"{type(error).__name__}: "
                                          f"{error}"})
        record = stage.finish()
        summary[name] = f"{record['status']} ({record['seconds']} s)"
    elapsed = round(time.monotonic() - round_.started, 1)
    round_.save(round_.out / "summary.json", {"date": now(), "device": round_.facts.get("device"),
                                              "elapsed_s": elapsed, "budget_s": args.budget_s, "stages": summary})
    print("gpu_round: " + "; ".join(f"{k}: {v}" for k, v in summary.items()) + f"; {elapsed} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
