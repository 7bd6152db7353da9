"""`make mutants`: deliberate bugs that the suite must catch, each applied to a scratch copy of the repository
and run against the tests meant to catch it. Passes when every mutant makes its tests fail.

    python -m tests.mutants              # all of them (a few minutes on 2 cores)
    python -m tests.mutants --list       # names, files, tests
    python -m tests.mutants label-mask-plus-one packing-first-token

Each mutant is an exact text replacement that must match once in its file, so a mutant whose code moved
fails loudly instead of silently testing nothing; update it with the code. The tests first run on the
unchanged copy and must pass there, or nothing a mutant does would mean anything. Not part of the default
suite (`make test`): run it when a change touches the code or the tests below.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str


MUTANTS = [
    Mutant("label-mask-plus-one", "src/herd/data.py",
           "inside = (span >= 0) & (begins < ends[np.maximum(span, 0)])",
           "inside = (span >= 0) & (begins <= ends[np.maximum(span, 0)])",
           ("tests/test_label_masks.py",),
           "the assistant mask lets one more token through at an answer's end: the next turn's <s>"),
    Mutant("packing-first-token", "src/herd/packing.py",
           'batch["labels"][batch["position_ids"] == 0] = -100',
           "pass",
           ("tests/test_packing.py", "-k", "per_token"),
           "packed rows keep a conversation's first token as a target of the conversation before it"),
    Mutant("redaction-no-lists", "src/herd/redaction.py",
           "return type(value)(redact(v, secrets) for v in value)",
           "return value",
           ("tests/test_redaction.py", "-k", "not no_file"),
           "redaction does not look inside lists (or tuples)"),
    Mutant("redaction-token-secret-only", "src/herd/redaction.py",
           '''CREDENTIAL_WORDS = frozenset({
    "token", "secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials",
    "auth", "authorization", "apikey", "key", "cookie", "bearer",
})''',
           'CREDENTIAL_WORDS = frozenset({"token", "secret"})',
           ("tests/test_redaction.py", "-k", "not no_file"),
           "redaction recognises only token/secret key names"),
    Mutant("redaction-multirun-yaml", "src/herd/cli.py",
           "        redact_sweep_config()\n", "",
           ("tests/test_redaction.py", "-k", "no_file"),
           "Hydra's multirun.yaml is written with the secrets typed on the command line"),
    Mutant("planner-zero2-grads-unsharded", "src/herd/memory/model.py",
           'b["LoRA grads (fp32)"] = keep * z.lora_g // (w if sharded or s.strategy == "zero2" else 1)',
           'b["LoRA grads (fp32)"] = keep * z.lora_g // (w if sharded else 1)',
           ("tests/test_memory.py", "-k", "term"),
           "the planner does not divide gradients by the world size under ZeRO-2"),
    Mutant("planner-ddp-buckets-missing", "src/herd/memory/model.py",
           '    if s.strategy == "ddp":\n        b["DDP gradient buckets"] = z.lora_g',
           '    if s.strategy == "ddp":\n        pass',
           ("tests/test_memory.py", "-k", "term"),
           "the planner forgets DDP's gradient buckets"),
    Mutant("planner-ddp-buckets-everywhere", "src/herd/memory/model.py",
           '    if s.strategy == "ddp":\n        b["DDP gradient buckets"] = z.lora_g',
           '    if s.strategy != "single":\n        b["DDP gradient buckets"] = z.lora_g',
           ("tests/test_memory.py", "-k", "term"),
           "the planner counts DDP's buckets under strategies that have none"),
    Mutant("planner-deepspeed-buckets-missing", "src/herd/memory/model.py",
           'b["DeepSpeed reduce buckets"] = DS_REDUCE_BUFFERS[s.strategy] * DS_REDUCE_BUCKET * s.compute_dtype_bytes',
           'b["DeepSpeed reduce buckets"] = 0',
           ("tests/test_memory.py", "-k", "term"),
           "the planner forgets DeepSpeed's gradient reduction buckets"),
    Mutant("tokenization-cache-ignores-code", "src/herd/data.py",
           '"code": code_fingerprint(code),', '"code": 1,',
           ("tests/test_data.py",),
           "tokenized data made by other code is reused"),
    Mutant("tokenization-cache-ignores-bad-rows", "src/herd/data.py",
           'if k not in ("name", "cache_dir")', 'if k not in ("name", "cache_dir", "bad_rows")',
           ("tests/test_data.py",),
           "a warm cache lets bad_rows=error pass"),
    Mutant("tokenization-cache-ignores-source-data", "src/herd/data.py",
           '"data": source_fingerprint(s)', '"data": s.path',
           ("tests/test_data_sources.py", "-k", "cache_key"),
           "a mix whose source file changed reuses the samples of the old file"),
    Mutant("mix-eval-from-the-first-source", "src/herd/data.py",
           "evals = apportion(_eval_count(data_cfg.eval_size, sum(counts)), counts)",
           "evals = [_eval_count(data_cfg.eval_size, sum(counts)), *[0] * (len(counts) - 1)]",
           ("tests/test_data_sources.py", "-k", "weighted_mix or max_samples"),
           "a mix's eval split comes from its first source instead of every source in proportion"),
    Mutant("mix-weights-rounded-down", "src/herd/data.py",
           "    for i in by_remainder[: total - sum(counts)]:\n        counts[i] += 1\n", "",
           ("tests/test_data_sources.py", "-k", "apportion or weighted_mix"),
           "weighted counts are floored, so a mix is smaller than data.max_samples"),
    Mutant("pairs-cache-ignores-prompt-length", "src/herd/preference.py",
           '"max_prompt_length": dpo_cfg.max_prompt_length}', '"max_prompt_length": None}',
           ("tests/test_preference.py", "-k", "cache"),
           "tokenized pairs filtered under one dpo.max_prompt_length are reused under another"),
    Mutant("pairs-cache-ignores-code", "src/herd/preference.py",
           "data.cache_key(data_cfg, tokenizer, TOKENIZATION_CODE,", "data.cache_key(data_cfg, tokenizer, None,",
           ("tests/test_preference.py", "-k", "cache"),
           "tokenized pairs made by other pair code (herd.preference) are reused"),
    Mutant("pairs-identical-allowed", "src/herd/preference.py",
           'if answers[0].strip() == answers[1].strip():', 'if False:',
           ("tests/test_preference.py", "-k", "bad"),
           "a pair whose chosen and rejected answers are the same is trained on"),
    Mutant("dpo-adapter-rounded-to-bf16", "src/herd/training/dpo.py",
           "parameter.data = loaded[name].to(strategy_setup.adapter_dtype)",
           "parameter.data = parameter.data.to(strategy_setup.adapter_dtype)",
           ("tests/test_dpo.py", "-k", "plainly"),
           "DPO keeps TRL's bf16 cast of the LoRA weights: the policy no longer starts where it was loaded"),
    Mutant("planner-dpo-one-sequence-per-pair", "src/herd/training/plan.py",
           'return {"sequences_per_sample": 2, "reference": reference}',
           'return {"sequences_per_sample": 1, "reference": reference}',
           ("tests/test_dpo.py", "-k", "planner"),
           "the planner counts a DPO pair as one sequence"),
    Mutant("tiny-model-cache-ignores-code", "src/herd/fixtures/tiny.py",
           'marker.get("build") == build_fingerprint()', '"build" in marker',
           ("tests/test_tiny.py",),
           "a tiny model built by other code is reused"),
    Mutant("user-file-shadowed-silently", "src/herd/cli.py",
           "                shadowed = _shadowed_file(config_name, dict(cfg.hydra.runtime.choices), search_path)",
           "                shadowed = None",
           ("tests/test_user_configs.py", "-k", "shadow"),
           "a user's model/tiny.yaml is never read (conf/ is searched first) and nobody says so"),
    Mutant("wandb-environment-over-config", "src/herd/training/tracking/wandb.py",
           "    if configured:\n        return (list(configured) if key == \"tags\" else configured), f\"tracking.{key}\"",
           "    if configured and not env.get(ENV_VARS[key]):\n"
           "        return (list(configured) if key == \"tags\" else configured), f\"tracking.{key}\"",
           ("tests/test_wandb_env.py", "-k", "config_wins"),
           "WANDB_PROJECT and the rest override what the tracking config sets"),
    Mutant("deepspeed-file-over-herd", "src/herd/config/launch.py",
           "    return _merge(_merge({\"zero_optimization\": dict(_HERD_ZERO_DEFAULTS)}, user), herds)",
           "    return _merge(_merge({\"zero_optimization\": dict(_HERD_ZERO_DEFAULTS)}, herds), user)",
           ("tests/test_launch_files.py", "-k", "templates or agreeing"),
           "the user's DeepSpeed JSON overrides herd's decisions (ZeRO-3 adapters saved without gathering)"),
    Mutant("accelerate-ds-fields-kept", "src/herd/training/strategy.py",
           "        os.environ.pop(ACCELERATE_DS_FIELDS, None)",
           "        pass",
           ("tests/test_launch_files.py", "-k", "dropped_once_checked"),
           "an accelerate DeepSpeed config (TRL's zero2.yaml) makes accelerate refuse herd's DeepSpeed config"),
    Mutant("merge-by-tensor-half-lora", "src/herd/tensor_merge.py",
           "part[ADAPTER_NAME].weight = Parameter(tensor.to(device=device, dtype=torch.float32), requires_grad=False)",
           "part[ADAPTER_NAME].weight = Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)",
           ("tests/test_merge.py", "-k", "same_files"),
           "the low-memory merge takes LoRA factors in the output dtype, not fp32 as PEFT loads them: bf16 weights "
           "that differ from the in-memory merge's"),
    Mutant("console-trainer-prints-dicts", "src/herd/training/tracking/progress.py",
           "for kind in (PrinterCallback, ProgressCallback):", "for kind in (ProgressCallback,):",
           ("tests/test_console.py", "-k", "non_tty"),
           "off a terminal the Trainer's PrinterCallback stays: every logging step printed twice (its dict too)"),
]


def scratch_copy(destination: Path) -> None:
    """The working tree as it is (tracked and untracked files git does not ignore), without .git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(copy: Path, args: tuple[str, ...], env: dict) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "slow or not slow", *args],
                            cwd=copy, env=env, capture_output=True, text=True)
    return result.returncode, (result.stdout + result.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if unknown := set(args.names) - {m.name for m in MUTANTS}:
        parser.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="herd-mutants-") as scratch:
        copy = Path(scratch)
        scratch_copy(copy)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy / "src"), str(copy)])}
        env.pop("HERD_RUN_ID", None)
        where = subprocess.run([sys.executable, "-c", "import herd; print(herd.__file__)"], cwd=copy, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(copy.resolve()):
            print(f"mutants: herd imports from {where}, not the scratch copy {copy}", file=sys.stderr)
            return 2
        print(f"mutants: scratch copy {copy}; first the tests on the unchanged copy", flush=True)
        for tests in dict.fromkeys(m.tests for m in chosen):
            code, output = run_tests(copy, tests, env)
            if code != 0:
                print(f"mutants: the unchanged copy fails {' '.join(tests)}: fix that first\n{output}",
                      file=sys.stderr)
                return 2

        results = []
        for m in chosen:
            path = copy / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"mutants: {m.name}: its text occurs {original.count(m.old)} times in {m.path}, not once: "
                      "update the mutant with the code", file=sys.stderr)
                results.append((m, "stale"))
                continue
            path.write_text(original.replace(m.old, m.new))
            started = time.monotonic()
            try:
                code, output = run_tests(copy, m.tests, env)
            finally:
                path.write_text(original)
            verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"error (pytest exit {code})")
            results.append((m, verdict))
            print(f"mutants: {m.name:<38} {verdict:<10} {time.monotonic() - started:5.0f} s  ({m.why})", flush=True)
            if code not in (0, 1):
                print(output, file=sys.stderr)

    caught = sum(verdict == "caught" for _, verdict in results)
    print(f"mutants: {caught}/{len(results)} caught")
    for m, verdict in results:
        if verdict != "caught":
            print(f"  {m.name}: {verdict}: {m.why} (tests: {' '.join(m.tests)})")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
