"""method=dpo: config refusals, the loss of TRL's DPOTrainer used plainly, SFT -> DPO with exact resume after a
kill, the reference kinds, a 2-process run, infer on a DPO run directory, and the planner's pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from herd.cli import check_config
from herd.config.dpo import DpoConfig, Reference
from herd.config.train import (
    DataConfig,
    ModelConfig,
    PeftConfig,
    Strategy,
    StrategyConfig,
    TrainConfig,
    TrainJob,
    register_train_schema,
)
from herd.errors import ConfigError
from herd.memory import GB
from herd.training import dpo
from herd.training.plan import check_fits, plan_job
from tests.conftest import REPO, run_module
from tests.test_strategies import launch

register_train_schema()

# Small pairs: 24 of the bundled sample that fit in 384 tokens; 4 pairs per optimizer step.
DPO = ["method=dpo", "model=tiny", "data.max_samples=24", "data.max_seq_len=384", "train.global_batch_size=4",
       "train.micro_batch_size=2", "train.learning_rate=1e-3", "train.warmup_ratio=0", "train.logging_steps=1",
       "train.eval_steps=100", "train.save_steps=2"]


def metrics_jsonl(run_dir: Path, kind: str = "train") -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    latest = {e["step"]: e for e in events if e["kind"] == kind}  # a resumed run re-logs replayed steps
    return [latest[step] for step in sorted(latest)]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, expected", [
    (["dpo.beta=0"], "dpo.beta=0.0: must be > 0"),
    (["dpo.loss_type=kto"], "dpo.loss_type=kto: 'kto' is not one of: sigmoid, hinge, ipo"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5: must be in [0, 0.5)"),
    (["dpo.max_prompt_length=0"], "dpo.max_prompt_length=0: must be >= 1"),
    (["dpo.reference=copy"], "invalid value for 'dpo.reference'"),
    (["dpo.margin=1"], "unknown key 'dpo.margin'; allowed keys: beta, loss_type"),
])
def test_dpo_knobs_are_refused_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as error:
        check_config("train", ["method=dpo", *overrides])
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_method_group_selects_dpo_and_its_data():
    cfg = check_config("train", ["method=dpo"])
    assert cfg.method.value == "dpo" and cfg.data.name == "sample-pairs" and cfg.dpo.beta == 0.1
    assert check_config("train", []).method.value == "sft"
    # The command line's data wins over the group's default.
    assert check_config("train", ["method=dpo", "data=jsonl", "data.path=x.jsonl"]).data.path == "x.jsonl"


def job(**dpo_settings) -> TrainJob:
    strategy = dpo_settings.pop("strategy", Strategy.single)
    packing = dpo_settings.pop("packing", False)
    return TrainJob(model=ModelConfig(name="tiny", path="p"), peft=PeftConfig(), output_dir="o",
                    data=DataConfig(name="d", path="d.jsonl"), strategy=StrategyConfig(name=strategy),
                    train=TrainConfig(packing=packing), method="dpo", dpo=DpoConfig(**dpo_settings))


def test_runs_that_cannot_start_are_refused_in_one_line(tmp_path, tiny_model_dir):
    location = str(tiny_model_dir)
    refusals = {
        "train.packing=true is for SFT": job(packing=True),
        f"dpo.sft_run={tmp_path} is not a finished herd training run (no herd_run.json)": job(sft_run=str(tmp_path)),
    }
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "herd_run.json").write_text(json.dumps({"base_model": "meta-llama/Llama-2-7b-hf",
                                                                   "model": {}, "adapter": "adapter"}))
    (tmp_path / "other" / "adapter").mkdir()
    (tmp_path / "other" / "adapter" / "adapter_config.json").write_text("{}")
    refusals[f"dpo.sft_run={tmp_path / 'other'} trained on base meta-llama/Llama-2-7b-hf, but this run's model is"] \
        = job(sft_run=str(tmp_path / "other"))
    for message, train_job in refusals.items():
        with pytest.raises(ConfigError) as error:
            dpo.check_job(train_job, location)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


# ---------------------------------------------------------------- the loss is TRL's


def test_steps_equal_trls_dpo_trainer_used_plainly(tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from herd.config.train import Quant
    from herd.modeling import load_base_model, lora_config
    from herd.preference import split_pairs

    run_dir = tmp_path / "herd"
    run_module("train", *DPO, "train.max_steps=3", "data.eval_size=0", f"output_dir={run_dir}")

    # Plain TRL on the same pairs (conversational rows: TRL applies the chat template and tokenizes them itself),
    # the same 4-bit base, LoRA and seeds. herd's one change is reproduced: TRL casts QLoRA adapters to bf16;
    # herd keeps them as loaded (herd.training.dpo.build_trainer).
    pairs, _, _ = split_pairs(DataConfig(name="p", path=str(REPO / "data/sample/preference_sample.jsonl"),
                                         max_samples=24, max_seq_len=384, eval_size=0), DpoConfig(), tiny_tokenizer)
    rows = [{"prompt": list(p.prompt), "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    set_seed(42)
    model = load_base_model(ModelConfig(name="tiny", path=str(tiny_model_dir)), PeftConfig(quant=Quant.nf4), "cpu",
                            torch.float32, str(tiny_model_dir))
    model = get_peft_model(model, lora_config(PeftConfig()))
    loaded = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = DPOConfig(output_dir=str(tmp_path / "plain"), max_steps=3, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=0, lr_scheduler_type="cosine",
                     max_grad_norm=0.3, logging_steps=1, seed=42, data_seed=42, bf16=False, use_cpu=True,
                     gradient_checkpointing=False, max_length=384, report_to="none", save_strategy="no", beta=0.1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tiny_tokenizer)
    for name, parameter in trainer.model.named_parameters():
        if name in loaded:
            parameter.data = loaded[name]
    trainer.train()

    plain = [e for e in trainer.state.log_history if "loss" in e]
    ours = metrics_jsonl(run_dir)
    assert len(plain) == len(ours) == 3
    for theirs, mine in zip(plain, ours):
        for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            assert mine[f"train/{key}"] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            # beta x (logp - reference logp) of sums near -300: fp32's rounding there is ~3e-5
            assert mine[f"train/{key}"] == pytest.approx(theirs[key], abs=1e-5), key
    assert ours[0]["train/loss"] == pytest.approx(0.6931472)  # policy == reference at the first step
    assert ours[2]["train/loss"] < ours[0]["train/loss"] and ours[2]["train/rewards/margins"] > 0
    trained = {k.replace(".default", ""): v for k, v in trainer.model.state_dict().items()
               if "lora_" in k and ".ref." not in k}
    for name, weight in adapter(run_dir).items():
        torch.testing.assert_close(weight, trained[name], rtol=1e-5, atol=1e-7)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "dpo" and metrics["dpo"]["reference"] == "adapter switched off"


# ---------------------------------------------------------------- SFT -> DPO, checkpoints, resume


@pytest.fixture(scope="module")
def dpo_from_sft(tmp_path_factory, trained_run) -> Path:
    """4 DPO steps from the shared finished SFT run, reference: a frozen copy of its adapter; tracked in an
    offline W&B run."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    run_module("train", *DPO, "train.max_steps=4", "data.eval_size=4", "train.eval_steps=4",
               f"dpo.sft_run={trained_run}", "tracking.backend=wandb_offline", f"output_dir={run_dir}")
    return run_dir


def test_dpo_from_sft_run_directory(dpo_from_sft, trained_run):
    run_dir = dpo_from_sft
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["dpo"]["sft_run"] == str(trained_run)
    assert metrics["dpo"]["reference"] == "adapter 'ref' (frozen copy of the starting adapter)"
    before, after = metrics["eval_rewards_before"], metrics["eval_rewards_after"]
    assert before["rewards/margins"] == 0.0 and metrics["eval_loss_before"] == pytest.approx(0.6931472)
    assert after["rewards/margins"] > 0 and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # Checkpoints as SFT's, complete-marked; they carry TRL's frozen reference copy, the final adapter does not.
    assert (run_dir / "checkpoint-4" / "herd-complete").exists() and (run_dir / "checkpoint-4" / "ref").is_dir()
    assert not (run_dir / "adapter" / "ref").exists()
    sft_adapter = load_file(str(trained_run / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(run_dir / "checkpoint-4" / "ref" / "adapter_model.safetensors"))
    assert reference.keys() == sft_adapter.keys()
    assert all(torch.equal(reference[k], sft_adapter[k]) for k in reference)  # the SFT adapter, exactly
    assert any(not torch.equal(adapter(run_dir)[k], sft_adapter[k]) for k in sft_adapter)  # the policy moved
    train = metrics_jsonl(run_dir)
    assert all(f"train/rewards/{key}" in train[-1] for key in ("chosen", "rejected", "margins", "accuracies"))
    # The policy starts exactly at the SFT adapter, the reference's weights: the first step scores no margin.
    assert train[0]["train/rewards/margins"] == 0.0 and train[0]["train/loss"] == pytest.approx(0.6931472, abs=1e-7)
    info = json.loads((run_dir / "herd_run.json").read_text())
    sft_info = json.loads((trained_run / "herd_run.json").read_text())
    assert info["method"] == "dpo" and info["data"] == sft_info["data"] and info["peft"]["r"] == sft_info["peft"]["r"]
    assert info["preference_data"]["name"] == "sample-pairs"


def test_dpo_run_is_tracked_in_wandb_with_rewards_and_no_perplexity(dpo_from_sft):
    """The offline W&B run file read back: DPO's rewards, margins and accuracies at each logging step and
    evaluation; no perplexity (a DPO loss is no language model's); MFU's FLOPs count the reference forward."""
    from herd.training.tracking.metrics import flops_per_token
    from herd.training.tracking.wandb import offline_run_dirs
    from tests.wandb_reader import history_values, read_wandb_run

    [offline] = offline_run_dirs(dpo_from_sft)
    run = read_wandb_run(offline)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert sorted(history_values(run.history, f"train/{key}")) == [1, 2, 3, 4], key
        assert sorted(history_values(run.history, f"eval/{key}")) == [0, 4], key
    local = metrics_jsonl(dpo_from_sft)
    assert history_values(run.history, "train/rewards/margins") == {
        e["step"]: e["train/rewards/margins"] for e in local}
    assert history_values(run.history, "eval/rewards/margins")[4] > 0
    assert not [row for row in run.history if "eval/perplexity" in row]
    derived = run.config["derived"]
    assert derived["flops_per_token"] == flops_per_token(derived["params_base"], derived["params_lora"], 2, 64,
                                                         384, reference_forward=True)
    assert run.config["method"] == "dpo" and run.config["dpo"]["sft_run"]


def test_sigkill_after_a_step_then_same_command_resumes_exactly(dpo_from_sft, trained_run, tmp_path):
    run_dir = tmp_path / "run"
    command = [*DPO, "train.max_steps=4", "data.eval_size=4", "train.eval_steps=4", f"dpo.sft_run={trained_run}",
               f"output_dir={run_dir}"]
    killed = run_module("train", *command, env={"HERD_DEBUG_KILL_AFTER_STEP": "2"}, check=False)
    assert killed.returncode == -9 and not (run_dir / "adapter").exists()
    resumed = run_module("train", *command)
    assert "resuming from checkpoint-2" in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from"] == "checkpoint-2"
    assert_same_adapter(dpo_from_sft, run_dir)
    straight, again = metrics_jsonl(dpo_from_sft), metrics_jsonl(run_dir)
    assert [e["train/loss"] for e in again] == pytest.approx([e["train/loss"] for e in straight], rel=1e-5)
    assert [e["train/rewards/margins"] for e in again] == pytest.approx(
        [e["train/rewards/margins"] for e in straight], rel=1e-4, abs=1e-7)


def test_separate_reference_gives_the_shared_references_steps(dpo_from_sft, trained_run, tmp_path):
    # The same reference policy held twice: a second 4-bit base with the SFT adapter, against the frozen
    # copy of the adapter on the policy's own base. Two steps (cosine from step 1: the same learning rates).
    run_dir = tmp_path / "separate"
    run_module("train", *DPO, "train.max_steps=2", "data.eval_size=4", "train.eval_steps=100",
               "train.eval_before_train=false", "dpo.reference=separate", f"dpo.sft_run={trained_run}",
               f"output_dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dpo"]["reference"] == "separate model"
    shared, separate = metrics_jsonl(dpo_from_sft)[:2], metrics_jsonl(run_dir)
    for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
        assert [e[key] for e in separate] == pytest.approx([e[key] for e in shared], rel=1e-5, abs=1e-7), key


# What each strategy reports having really run (accelerate may fall back silently; herd's facts say what ran).
STRATEGY_FACTS = {
    "ddp": {"distributed_type": "MULTI_CPU", "wrapped_model": "DistributedDataParallel"},
    "fsdp": {"distributed_type": "MULTI_CPU", "fsdp": "herd FSDP2 (fully_shard per decoder layer + root)"},
    "zero2": {"distributed_type": "DEEPSPEED", "wrapped_model": "DeepSpeedEngine", "zero_stage": 2},
    "zero3": {"distributed_type": "DEEPSPEED", "wrapped_model": "DeepSpeedEngine", "zero_stage": 3},
}


@pytest.mark.parametrize("name", list(STRATEGY_FACTS))
def test_two_processes_killed_and_resumed_train_as_one_process(name, dpo_from_sft, trained_run, tmp_path):
    """Each multi-process strategy, 2 ranks, from the SFT run (the reference: the frozen copy of its adapter,
    sharded or partitioned with the policy's): SIGKILLed after step 2, the same command resumes and the run
    ends with the single process's adapter and losses (2 ranks x 2 pairs = 1 process x 2 pairs x 2 micro
    batches: the same pairs per step)."""
    run_dir = tmp_path / "run"
    command = [*DPO, f"strategy={name}", "train.max_steps=4", "data.eval_size=4", "train.eval_steps=4",
               f"dpo.sft_run={trained_run}", f"data.cache_dir={REPO / '.herd/cache/tokenized'}",
               f"output_dir={run_dir}"]
    killed = launch(tmp_path, *command, env={"HERD_DEBUG_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0 and (run_dir / "checkpoint-2" / "herd-complete").exists()
    resumed = launch(tmp_path, *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    facts = metrics["distributed"]
    assert facts["num_processes"] == 2 and facts["quantized_linear_layers"] > 0
    assert {key: facts.get(key) for key in STRATEGY_FACTS[name]} == STRATEGY_FACTS[name]
    if name in ("fsdp", "zero3"):
        assert facts.get("sharded_parameters", facts.get("partitioned_parameters")) > 0
    assert metrics["dpo"]["reference"] == "adapter 'ref' (frozen copy of the starting adapter)"
    assert not (run_dir / "adapter" / "ref").exists()
    assert_same_adapter(dpo_from_sft, run_dir, rtol=1e-4, atol=1e-6)
    for key in ("train/loss", "train/rewards/margins"):
        assert [e[key] for e in metrics_jsonl(run_dir)] == pytest.approx(
            [e[key] for e in metrics_jsonl(dpo_from_sft)], rel=1e-4, abs=1e-6), key
    assert metrics["eval_loss_after"] == pytest.approx(
        json.loads((dpo_from_sft / "metrics.json").read_text())["eval_loss_after"], rel=1e-4)


def test_zero3_offload_trains_with_deepspeeds_offload(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(tmp_path, *DPO, "strategy=zero3_offload", "train.max_steps=2", "data.eval_size=4",
                    "train.eval_steps=100", f"dpo.sft_run={trained_run}",
                    f"data.cache_dir={REPO / '.herd/cache/tokenized'}", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    facts = metrics["distributed"]
    assert facts["zero_stage"] == 3 and facts["offload_optimizer"] is True and facts["offload_params"] is True
    assert metrics["eval_rewards_after"]["rewards/margins"] > 0 and metrics["global_step"] == 2


def test_infer_evaluates_generates_merges_and_chats_from_a_dpo_run(dpo_from_sft, trained_run, tmp_path,
                                                                     monkeypatch):
    import io

    from herd.config.infer import register_infer_schema
    from infer.recipes import chat, evaluate, generate, merge

    register_infer_schema()
    run_dir = tmp_path / "run"
    shutil.copytree(dpo_from_sft, run_dir)
    metrics = evaluate.run(check_config("infer", [f"run_dir={run_dir}"]))  # on the SFT run's eval split
    assert metrics["adapter"] == str(run_dir / "adapter") and metrics["data"] == "sample"
    output = generate.run(check_config("infer", [f"run_dir={run_dir}", "generate.max_new_tokens=4"]))
    assert output.exists() and output.read_text().count("\n") > 0
    merged = merge.run(check_config("infer", [f"run_dir={run_dir}", f"merge.output={tmp_path / 'merged'}"]))
    assert json.loads((merged / "herd_merge.json").read_text())["max_logit_difference"] < 1e-3  # merge's own check
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"How do I make pancakes?\n")))  # piped
    turns = chat.run(check_config("infer", [f"run_dir={run_dir}", "chat.max_new_tokens=4"]))
    assert [turn["role"] for turn in turns] == ["user", "assistant"]


# ---------------------------------------------------------------- the planner


def plan(method: str, micro_batch: int = 1, reference: Reference = Reference.shared, sft_run: str | None = None):
    train_job = TrainJob(model=ModelConfig(name="7b", path="meta-llama/Llama-2-7b-hf"), peft=PeftConfig(),
                         data=DataConfig(name="d", path="d.jsonl", max_seq_len=2048),
                         train=TrainConfig(micro_batch_size=micro_batch, global_batch_size=16,
                                           gradient_checkpointing=False),
                         strategy=StrategyConfig(), output_dir="o", method=method,
                         dpo=DpoConfig(reference=reference, sft_run=sft_run))
    return train_job, *plan_job(train_job, 1, train_job.model.path)


def test_planner_counts_two_sequences_per_pair_and_the_reference():
    _, _, sft = plan("sft")
    _, settings, shared = plan("dpo")
    assert (settings.sequences_per_sample, settings.reference) == (2, "adapter_off")
    stored = "activations: all layers"
    assert shared.breakdown[stored] == 2 * sft.breakdown[stored]  # chosen and rejected of each pair
    assert shared.tokens_per_step == 2 * sft.tokens_per_step
    _, _, copy = plan("dpo", sft_run="runs/sft")
    _, _, separate = plan("dpo", reference=Reference.separate, sft_run="runs/sft")
    assert copy.breakdown["reference adapter (fp32)"] == sft.breakdown["LoRA params (fp32)"]
    weights = sft.breakdown["quantized linear weights"] + sft.breakdown["embeddings + lm_head + norms"]
    assert separate.breakdown["reference model weights"] == weights
    # The reference forward (no grad) runs while the policy's activations are held: one layer's working set
    # (here the MLP block: 2h + 3i per token) over 2 x 2048 tokens plus one dequantized weight; the plan's peak
    # transient is the largest of the loss, layer-backward and reference-forward phases.
    from herd.memory.model import _reference_forward

    hidden, inter, widest = 4096, 11008, 4096 * 11008
    reference = _reference_forward(shared.shape, settings, 2 * 2048)
    assert reference == 2 * 2048 * 2 * (2 * hidden + 3 * inter) + 2 * widest
    [(name, transient)] = [(k, v) for k, v in shared.breakdown.items() if k.startswith("peak transient")]
    assert transient >= reference and (transient == reference) == ("reference" in name)
    assert "DPO pairs (2 sequences each), reference adapter_off" in shared.format()


def test_planner_refuses_a_dpo_job_that_fits_as_sft(tmp_path):
    sft_job, sft_settings, sft = plan("sft", micro_batch=2)
    check_fits(sft_job, sft_settings, sft, sft_job.model.path, 48 * GB)  # SFT fits on 48 GB ...
    dpo_job, settings, pairs = plan("dpo", micro_batch=2)
    with pytest.raises(ConfigError, match=r"^the plan needs .* but the device has 48.0 GB; .* fits \("):
        check_fits(dpo_job, settings, pairs, dpo_job.model.path, 48 * GB)  # ... its DPO twin does not
    refused = run_module("train", "method=dpo", "model=llama2-7b", "device_memory_gb=48", "data.max_seq_len=2048",
                         "train.micro_batch_size=2", "train.gradient_checkpointing=false",
                         f"output_dir={tmp_path}/r", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("herd: invalid config: the plan needs")
    assert not (tmp_path / "r").exists()


def test_planner_plans_the_lora_layout_of_the_sft_run_it_starts_from(tmp_path, capsys):
    """From dpo.sft_run the run trains that run's adapter (its rank, alpha, targets), not peft.*: so does its
    plan (the targets' part needs the model's config.json, which no hub gives here: the rank shows it)."""
    sft_run = tmp_path / "sft"
    (sft_run / "adapter").mkdir(parents=True)
    (sft_run / "adapter" / "adapter_config.json").write_text("{}")
    (sft_run / "herd_run.json").write_text(json.dumps({
        "base_model": "meta-llama/Llama-2-7b-hf", "model": {"name": "llama2-7b"}, "adapter": "adapter",
        "peft": {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": ["all-linear"]}, "data": None}))
    from omegaconf import OmegaConf

    from train.recipe import resolve

    def planned(*overrides: str) -> str:  # the recipe's resolve, as `python -m train ... plan=true` runs it
        resolve(OmegaConf.to_object(check_config("train", ["method=dpo", "model=llama2-7b", "plan=true",
                                                           "peft.r=8", *overrides])))
        return capsys.readouterr().out

    from_sft, fresh = planned(f"dpo.sft_run={sft_run}"), planned()
    assert "LoRA r=64 on q,k,v,o,gate,up,down" in from_sft and "reference adapter_copy" in from_sft
    assert "LoRA r=8 on q,k,v,o,gate,up,down" in fresh and "reference adapter_off" in fresh


def test_a_separate_reference_under_zero3_is_prepared_by_trl_and_trains(tmp_path):
    """dpo.reference=separate with a sharding strategy: TRL prepares the second 4-bit base for DeepSpeed
    (prepare_deepspeed) next to the partitioned policy; 2 ranks, from the base."""
    run_dir = tmp_path / "run"
    result = launch(tmp_path, *DPO, "strategy=zero3", "dpo.reference=separate", "train.max_steps=2",
                    "data.eval_size=4", "train.eval_steps=100", f"data.cache_dir={REPO / '.herd/cache/tokenized'}",
                    f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dpo"]["reference"] == "separate model" and metrics["distributed"]["zero_stage"] == 3
    assert metrics["distributed"]["partitioned_parameters"] > 0
    assert metrics["eval_rewards_before"]["rewards/margins"] == 0.0  # policy and reference start equal
    assert metrics["eval_rewards_after"]["rewards/margins"] > 0
