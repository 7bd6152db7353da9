"""infer: evaluate, generate, merge, chat and lm_eval on the tiny trained run, 1 and 2 processes.

Multi-process cases are real `accelerate launch --multi_gpu --num_processes 2` runs on CPU (gloo), ~20-40 s
each, so there are few of them; single-process twins run in this pytest process (no import cost) and the
tests compare the two. Every 2-process test asserts it really ran 2 ranks (world size, per-rank counts).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from herd.cli import check_config
from herd.config.infer import register_infer_schema
from herd.errors import ConfigError, HerdError
from tests.conftest import OFFLINE_ENV, REPO, run_module

register_infer_schema()


def compose(*overrides: str):
    return check_config("infer", list(overrides))


def launch2(module: str, *args: str, check: bool = True, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 CPU processes, as a user runs it."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        # port 0: the launcher binds a free port itself and tells its ranks (a port picked here could be
        # taken by another process before the launcher binds it)
        "--main_process_port", "0", "-m", module, *args,
    ]
    env = {**os.environ, **OFFLINE_ENV, **(env or {})}  # no ACCELERATE_USE_CPU: herd sets it on CPU itself
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr[-4000:]}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- config refusals (no model loaded)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["generate.foo=1"], "unknown key 'generate.foo'; allowed keys: max_new_tokens"),
        (["quant=nf5"], "expected one of [nf4, fp4, int8, none]"),
        (["evaluate.split=test"], "expected one of [eval, train, all]"),
        (["model.path=/x"], "cannot set 'model.path': 'model' is not chosen; pick one first"),
        (["model=local"], "'model.path' must be set"),
    ],
)
def test_infer_config_refusals_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as error:
        compose(*overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_runtime_refusals(trained_run, tmp_path):
    from infer.recipes import evaluate, lm_eval, merge

    with pytest.raises(ConfigError, match="nothing to load: set run_dir"):
        evaluate.run(compose())
    with pytest.raises(ConfigError, match="no run_dir to write into; set evaluate.output"):
        evaluate.run(compose("model=tiny", "data=sample"))
    with pytest.raises(ConfigError, match="merge loads the base unquantized"):
        merge.run(compose(f"run_dir={trained_run}", "quant=nf4"))
    with pytest.raises(ConfigError, match="lm_eval.tasks is empty"):
        lm_eval.run(compose(f"run_dir={trained_run}"))
    # As a user sees it: exit 2 and one line, no traceback.
    result = run_module("infer.evaluate", f"run_dir={tmp_path}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"herd: invalid config: run_dir={tmp_path}: ")
    assert "is not a finished herd training run" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- evaluate


def test_evaluate_default_is_the_runs_eval_split(trained_run, tmp_path):
    from infer.recipes import evaluate

    metrics = evaluate.run(compose(f"run_dir={trained_run}"))
    written = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert written["loss"] == metrics["loss"] and written["split"] == "eval" and written["quant"] == "nf4"
    assert written["adapter"] == str(trained_run / "adapter")
    assert math.isclose(written["perplexity"], math.exp(written["loss"]))
    # Same model, same split as training's last evaluation; the Trainer averages per batch, herd per token.
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert abs(written["loss"] - trained["eval_loss_after"]) < 0.05
    base = evaluate.run(compose(f"run_dir={trained_run}", "base_only=true",
                                f"evaluate.output={tmp_path / 'base.json'}"))
    assert base["adapter"] is None and base["loss"] > written["loss"]  # training lowered the loss


def test_evaluate_two_processes_equals_one_on_an_odd_sized_set(trained_run, tmp_path):
    from infer.recipes import evaluate

    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?" + " Explain." * (i % 5)},
        {"role": "assistant", "content": f"It is {2 * i}." + " Adding is easy." * (i % 4)},
    ]}) + "\n" for i in range(37)))
    common = [f"run_dir={trained_run}", "data=jsonl", f"data.path={data}", "evaluate.split=all",
              "evaluate.batch_size=4"]
    launch2("infer.evaluate", *common, f"evaluate.output={tmp_path / 'two.json'}")
    one = evaluate.run(compose(*common, f"evaluate.output={tmp_path / 'one.json'}"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and len(two["samples_per_rank"]) == 2 and min(two["samples_per_rank"]) > 0
    assert two["samples"] == one["samples"] == 37  # every sample once: none dropped, none repeated
    assert two["tokens"] == one["tokens"]
    assert abs(two["loss"] - one["loss"]) < 1e-6


# ---------------------------------------------------------------- generate


def write_prompts(path: Path, count: int) -> list[str]:
    """A prompts JSONL mixing every accepted line form; returns each prompt's user text."""
    users, lines = [], []
    for i in range(count):
        user = f"Tell me about topic {i}" + " please" * (i % 7)
        users.append(user)
        if i % 3 == 0:
            lines.append(json.dumps(user))
        elif i % 3 == 1:
            lines.append(json.dumps([{"role": "user", "content": user}]))
        else:
            lines.append(json.dumps({"prompt": user}))
    path.write_text("\n".join(lines) + "\n")
    return users


def test_generate_two_processes_resumes_after_a_crash_and_matches_one_process(trained_run, tmp_path):
    from infer.recipes import generate

    prompts = tmp_path / "prompts.jsonl"
    users = write_prompts(prompts, 37)
    # base_only: the briefly trained adapter answers every prompt alike; the random base does not, so
    # a mix-up of order or batches would show. Greedy: the outputs must be identical.
    common = [f"run_dir={trained_run}", "base_only=true", f"generate.prompts={prompts}",
              "generate.max_new_tokens=8", "generate.batch_size=4"]
    final = tmp_path / "two.jsonl"
    parts = final.with_name("two.jsonl.parts")

    crashed = launch2("infer.generate", *common, f"generate.output={final}", check=False,
                      env={"HERD_DEBUG_EXIT_AFTER_BATCHES": "1"})
    assert crashed.returncode != 0
    assert not final.exists()  # never a partial final file
    done = [r for p in parts.glob("rank*.jsonl") for r in read_jsonl(p)]
    assert 4 <= len(done) < 37
    assert {p.name for p in parts.glob("rank*.jsonl")} == {"rank0.jsonl", "rank1.jsonl"}
    with open(parts / "rank1.jsonl", "a") as handle:  # a write torn by the crash
        handle.write('{"id": 36, "prompt": "<s>[INST] cut o')

    resumed = launch2("infer.generate", *common, f"generate.output={final}")
    assert f"{37 - len(done)} generated now, {len(done)} resumed" in resumed.stdout
    assert "over 2 process(es)" in resumed.stdout and "tok/s" in resumed.stdout
    records = read_jsonl(final)
    assert [r["id"] for r in records] == list(range(37))  # input order, no duplicates, none missing
    assert [r["prompt"] for r in records] == [f"<s>[INST] {u} [/INST]" for u in users]
    assert not parts.exists()
    for record in records:
        assert set(record) >= {"id", "prompt", "response", "prompt_tokens", "completion_tokens", "seconds"}
        assert 1 <= record["completion_tokens"] <= 8 and record["prompt_tokens"] > 5

    one = generate.run(compose(*common, f"generate.output={tmp_path / 'one.jsonl'}"))
    assert [r["response"] for r in read_jsonl(one)] == [r["response"] for r in records]
    assert len({r["response"] for r in records}) > 5
    # Finished output + same settings: nothing to do; other settings: refused, not overwritten.
    assert generate.run(compose(*common, f"generate.output={final}")) == final
    with pytest.raises(ConfigError, match="exists .made with other settings."):
        generate.run(compose(*common, f"generate.output={final}", "generate.max_new_tokens=9"))


def test_generate_defaults_to_the_runs_eval_prompts(trained_run):
    from herd.chat_format import format_llama2, prompt_messages
    from herd.data import split_conversations
    from herd.inference import load_inference_tokenizer, resolve_source
    from infer.recipes import generate

    cfg = compose(f"run_dir={trained_run}", "generate.max_new_tokens=4")
    output = generate.run(cfg)
    assert output == trained_run / "generations" / "eval.jsonl"
    source = resolve_source(OmegaConf.to_object(cfg))
    _, evaluation, _ = split_conversations(source.data_cfg, load_inference_tokenizer(source))
    records = read_jsonl(output)
    assert [r["prompt"] for r in records] == [format_llama2(prompt_messages(c)).text for c in evaluation]
    assert all(r["reference"] for r in records)


# ---------------------------------------------------------------- merge


LOGITS_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": sys.argv[2]}]
ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)["input_ids"]
with torch.no_grad():
    print(json.dumps({"ids": ids[0].tolist(), "logits": model(input_ids=ids).logits[0].tolist(),
                      "class": type(model).__name__}))
"""


def test_merge_checks_saves_and_loads_with_plain_transformers(trained_run, tmp_path):
    import torch

    from herd.chat_format import format_llama2
    from herd.inference import load_for_inference, resolve_source
    from infer.recipes import merge

    failed = tmp_path / "failed"
    with pytest.raises(HerdError, match="merge check failed"):
        merge.run(compose(f"run_dir={trained_run}", f"merge.output={failed}", "merge.tolerance=1e-12"))
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging directory is left

    output = merge.run(compose(f"run_dir={trained_run}", f"merge.output={tmp_path / 'merged'}"))
    info = json.loads((output / "herd_merge.json").read_text())
    assert info["max_logit_difference"] < 1e-3 and (output / "model.safetensors").exists()

    question = "How do I make pancakes?"
    result = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(output), question], capture_output=True,
                            text=True, env={**os.environ, **OFFLINE_ENV}, timeout=300, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "LlamaForCausalLM"

    job = OmegaConf.to_object(compose(f"run_dir={trained_run}", "quant=none"))
    model, tokenizer = load_for_inference(resolve_source(job), job, "cpu")  # base + adapter, unmerged
    text = format_llama2([{"role": "user", "content": question}]).text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded["ids"] == ids  # the saved tokenizer's chat template is herd's format
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0]
    assert float((torch.tensor(loaded["logits"]) - reference).abs().max()) < 1e-3


# ---------------------------------------------------------------- chat


def test_chat_two_turns_from_stdin_shows_the_exact_prompts(trained_run):
    result = subprocess.run(
        [sys.executable, "-m", "infer.chat", f"run_dir={trained_run}", "chat.echo_prompt=true",
         "chat.max_new_tokens=6"],
        input="hi\nagain\n/reset\nfresh start\n/exit\nnever read\n", cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **OFFLINE_ENV}, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = [json.loads(line.removeprefix("prompt: ")) for line in result.stderr.splitlines()
               if line.startswith("prompt: ")]
    assert len(prompts) == 3
    assert prompts[0] == "<s>[INST] hi [/INST]"
    head, tail = "<s>[INST] hi [/INST] ", " </s><s>[INST] again [/INST]"
    assert prompts[1].startswith(head) and prompts[1].endswith(tail)
    answer = prompts[1][len(head) : -len(tail)]
    assert answer and answer == answer.strip()
    assert answer in result.stdout  # what was streamed is what the second turn carried
    assert prompts[2] == "<s>[INST] fresh start [/INST]"  # /reset forgot the first two turns
    assert "(conversation reset)" in result.stdout


def test_chat_prompt_with_system_and_history():
    from infer.recipes.chat import chat_prompt

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert chat_prompt("Be brief.", history, "again") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] again [/INST]"
    )


# ---------------------------------------------------------------- lm-eval


def test_lm_eval_local_task_two_processes(trained_run):
    pytest.importorskip("lm_eval")
    launch2("infer.lm_eval", f"run_dir={trained_run}", "lm_eval.include_path=tests/fixtures/lm_eval",
            "lm_eval.include_defaults=false", "lm_eval.tasks=[herd_tiny]", "lm_eval.batch_size=4")
    results = json.loads((trained_run / "lm_eval" / "results.json").read_text())
    assert 0.0 <= results["results"]["herd_tiny"]["acc,none"] <= 1.0
    assert results["n-samples"]["herd_tiny"]["effective"] == 12
    herd = results["herd"]
    assert herd["world_size"] == 2 and herd["adapter"] == str(trained_run / "adapter")
    # 12 docs x 2 choices, split between the ranks (not 24 each: the silent everyone-does-all fallback)
    assert len(herd["requests_per_rank"]) == 2 and sum(herd["requests_per_rank"]) == 24
    assert min(herd["requests_per_rank"]) > 0


# ---------------------------------------------------------------- building blocks (no model)


@pytest.mark.parametrize("count, batch_size, world_size", [(37, 4, 2), (5, 8, 3), (1, 1, 4), (64, 8, 8)])
def test_batches_cover_every_index_once_whatever_the_world_size(count, batch_size, world_size):
    from herd.inference import plan_batches, rank_batches

    lengths = [(i * 7919) % 23 for i in range(count)]
    batches = plan_batches(lengths, batch_size)
    seen = [i for rank in range(world_size) for _, batch in rank_batches(batches, rank, world_size)
            for i in batch]
    assert sorted(seen) == list(range(count))
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches)  # length-sorted, longest first
    # The batches themselves do not depend on the world size: only which rank runs them does.
    assert [b for _, b in rank_batches(batches, 0, 1)] == batches


def test_resumable_parts_refuse_other_settings_and_report_missing_records(tmp_path):
    from herd import jsonl_parts

    final = tmp_path / "out.jsonl"
    assert jsonl_parts.begin(final, "settings-a", overwrite=False) is False
    writer = jsonl_parts.PartWriter(final, rank=0)
    writer.write([{"id": 0, "x": 1}, {"id": 2, "x": 3}])
    writer.close()
    with pytest.raises(ConfigError, match="unfinished results made with other settings"):
        jsonl_parts.begin(final, "settings-b", overwrite=False)
    with pytest.raises(HerdError, match=r"1 records missing .* \(first: id 1\)"):
        jsonl_parts.finalize(final, [0, 1, 2], {"fingerprint": "settings-a"})
    assert not final.exists()
    assert jsonl_parts.begin(final, "settings-a", overwrite=False) is False  # same settings: resume
    writer = jsonl_parts.PartWriter(final, rank=1)
    writer.write([{"id": 1, "x": 2}, {"id": 0, "x": 1}])  # id 0 again: kept once
    writer.close()
    assert jsonl_parts.finalize(final, [0, 1, 2], {"fingerprint": "settings-a"}) == 3
    assert [r["id"] for r in read_jsonl(final)] == [0, 1, 2]
    assert jsonl_parts.begin(final, "settings-a", overwrite=False) is True  # complete: nothing to do


def test_a_sweep_never_overwrites_an_earlier_jobs_output(trained_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 3)
    common = ["-m", f"run_dir={trained_run}", f"generate.prompts={prompts}", "generate.max_new_tokens=4",
              "generate.temperature=0.5,0.9"]
    shared = tmp_path / "shared.jsonl"
    refused = run_module("infer.generate", *common, f"generate.output={shared}", check=False)
    assert refused.returncode == 2
    suggestion = f"generate.output={tmp_path}/shared-${{hydra:job.num}}.jsonl"
    assert (f"herd: invalid config: generate.output: job 1 of this sweep would overwrite {shared}, written by job 0; "
            f"give each job its own, e.g. '{suggestion}', or sweep run_dir") in refused.stderr.splitlines()
    assert len(read_jsonl(shared)) == 3  # job 0's output, whole

    run_module("infer.generate", *common, suggestion)  # the suggested fix works as written
    for job, temperature in enumerate([0.5, 0.9]):
        assert len(read_jsonl(tmp_path / f"shared-{job}.jsonl")) == 3
        summary = json.loads((tmp_path / f"shared-{job}.summary.json").read_text())
        assert summary["settings"]["temperature"] == temperature
