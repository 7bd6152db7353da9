"""Preference tuning (method=dpo): TRL's DPOTrainer run the way herd runs SFT.

train/recipe.py calls into this module where a DPO run differs from an SFT run; everything else (the frozen
RunSetup, the run lock, the strategy's process group and trainer arguments, complete-marked checkpoints and
exact resume, preemption, tracking, metrics.json / herd_run.json / adapter/) is the recipe's, shared.

- The starting policy: a fresh LoRA adapter on the 4-bit base, or the adapter of a finished SFT run
  (dpo.sft_run), loaded into the same LoRA layout (its LoRA settings replace peft.r/alpha/dropout/targets).
- The reference (dpo.reference): `shared`, no second base in memory: from the base, the base with the adapter
  switched off (TRL's disable_adapter); from an SFT run, the base with a frozen copy of the SFT adapter (TRL's
  "ref" adapter: LoRA-sized). `separate`: a second 4-bit base (+ the SFT adapter, frozen), passed to TRL as
  its ref_model.
- The pairs are tokenized and cached by herd.preference; the trainer takes them as they are.
- LoRA weights keep the dtype the strategy chose (TRL casts QLoRA adapters to bf16; herd restores the exact
  weights it loaded, so a DPO run starts exactly at its SFT adapter and a resumed run trains like a fresh one).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from herd import rundir
from herd.config.dpo import Reference
from herd.config.train import PeftConfig, TrainJob
from herd.errors import ConfigError
from herd.modeling import add_lora, load_base_model
from herd.paths import resolve_path
from herd.training.arguments import shared_trainer_arguments
from herd.training.strategy import HerdFsdp2Checkpoints
from herd.training.tracking.progress import use_herd_console

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a pretrained adapter
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")  # what an SFT run's adapter decides


# ---------------------------------------------------------------- checks and the SFT run to start from


def check_job(job: TrainJob, location: str) -> None:
    """What a DPO run needs beyond an SFT run's checks, in one line each, before anything loads."""
    if job.train.packing:
        raise ConfigError("train.packing=true is for SFT; method=dpo pads each pair (set train.packing=false)")
    if job.dpo.sft_run:
        sft_start(job, location)


def sft_start(job: TrainJob, location: str) -> tuple[Path, dict] | None:
    """(the SFT run's adapter directory, its herd_run.json) for dpo.sft_run, checked; None without one."""
    if not job.dpo.sft_run:
        return None
    run = resolve_path(job.dpo.sft_run, must_exist=False)
    try:
        info = rundir.read_run_info(run)
    except FileNotFoundError:
        raise ConfigError(f"dpo.sft_run={job.dpo.sft_run} is not a finished herd training run (no "
                          f"{rundir.RUN_INFO}); give the output_dir of a finished SFT run") from None
    adapter = run / info.get("adapter", rundir.ADAPTER_DIR)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"dpo.sft_run={job.dpo.sft_run} has no adapter ({adapter}/adapter_config.json missing)")
    if _same_model(info["base_model"]) != _same_model(location):
        raise ConfigError(f"dpo.sft_run={job.dpo.sft_run} trained on base {info['base_model']}, but this run's "
                          f"model is {location}; set model=... to the SFT run's base")
    return adapter, info


def _same_model(location: str) -> str:
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def policy_peft(job: TrainJob, location: str) -> PeftConfig:
    """peft as this run trains it: from an SFT run, that run's LoRA layout (its adapter is loaded into it)."""
    start = sft_start(job, location)
    if start is None:
        return job.peft
    sft_peft = start[1].get("peft") or {}
    return dataclasses.replace(job.peft, **{key: sft_peft[key] for key in LORA_KEYS if key in sft_peft})


def sft_data(job: TrainJob, location: str) -> dict | None:
    """The SFT run's data config (herd_run.json "data"): what infer evaluates and prompts a DPO run with."""
    start = sft_start(job, location)
    return start[1].get("data") if start else None


def reference_description(job: TrainJob) -> str:
    if job.dpo.reference == Reference.separate:
        return "separate: a second 4-bit base" + (" + the SFT adapter, frozen" if job.dpo.sft_run else "")
    return ("shared base: a frozen copy of the SFT adapter" if job.dpo.sft_run
            else "shared base: the adapter switched off")


# ---------------------------------------------------------------- model and reference


def load_policy(setup) -> torch.nn.Module:
    """The PEFT model DPO trains: herd's LoRA on the base (modeling.add_lora), with the SFT run's adapter
    weights loaded into it when dpo.sft_run is set."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    job = setup.job
    set_seed(job.train.seed)  # LoRA's A matrices are drawn at creation
    model = load_base_model(job.model, setup.peft, setup.strategy.placement, setup.dtype, setup.location,
                            job.strategy.device_map)
    model = add_lora(model, setup.peft, setup.gradient_checkpointing)
    start = sft_start(job, setup.location)
    if start is not None:
        weights = load_file(str(start[0] / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        lora_missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or lora_missing:
            raise ConfigError(f"dpo.sft_run={job.dpo.sft_run}: its adapter does not fit the LoRA layout "
                              f"({(result.unexpected_keys or lora_missing)[0]})")
    return model


def load_reference(setup) -> torch.nn.Module | None:
    """dpo.reference=separate: a second 4-bit base with the SFT adapter (if any) active and frozen; None for
    shared (TRL then takes the reference from the policy's own base)."""
    job = setup.job
    if job.dpo.reference != Reference.separate:
        return None
    reference = load_base_model(job.model, setup.peft, setup.strategy.placement, setup.dtype, setup.location,
                                job.strategy.device_map)
    start = sft_start(job, setup.location)
    if start is not None:
        from peft import PeftModel

        # The LoRA-injected base model: TRL's fused LM head patches a transformers model, not a PeftModel.
        reference = PeftModel.from_pretrained(reference, str(start[0]), is_trainable=False).get_base_model()
    reference.config.use_cache = False
    reference.eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


# ---------------------------------------------------------------- the trainer


def training_arguments(job: TrainJob, run_dir: Path, dtype: torch.dtype, accumulation: int, *, has_eval: bool,
                       gradient_checkpointing: bool, strategy_setup) -> DPOConfig:
    """The DPOConfig of a run: what every herd run sets (train.*: micro batches count pairs, two sequences
    each; herd.preference dropped longer pairs, so nothing is truncated) and the dpo.* knobs."""
    shared = shared_trainer_arguments(job, run_dir, dtype, accumulation, has_eval=has_eval,
                                      gradient_checkpointing=gradient_checkpointing, strategy_setup=strategy_setup)
    d = job.dpo
    return DPOConfig(**shared, beta=d.beta, loss_type=[d.loss_type], label_smoothing=d.label_smoothing)


class HerdDPOTrainer(DPOTrainer):
    """DPOTrainer over pairs herd tokenized and cached (herd.preference): taken as they are."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class ShardedDPOTrainer(HerdFsdp2Checkpoints, HerdDPOTrainer):
    """HerdDPOTrainer for a model herd sharded itself (strategy=fsdp on CPU: herd's FSDP2 checkpoints)."""


def build_trainer(model, reference, args: DPOConfig, train_data, eval_data, tokenizer, callbacks: list,
                  strategy_setup, from_sft: bool) -> HerdDPOTrainer:
    """The DPO trainer with the reference the job asked for and the LoRA weights exactly as loaded."""
    from herd.training import strategy

    loaded = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer_class = ShardedDPOTrainer if strategy_setup.herd_fsdp2 else HerdDPOTrainer
    trainer = trainer_class(model=model, ref_model=reference, args=args, train_dataset=train_data,
                             eval_dataset=eval_data, processing_class=tokenizer, callbacks=callbacks)
    trainer.add_callback(strategy.WrappedModelProbe(trainer))
    use_herd_console(trainer)  # the Trainer prints no logs dict; its bar only on a terminal
    peft_model = trainer.model
    if not from_sft and REFERENCE_ADAPTER in peft_model.peft_config:
        # TRL copies any adapter it is given into a frozen "ref" one; a fresh adapter's reference is the base
        # itself: without the copy TRL switches the adapter off for the reference forward.
        peft_model.delete_adapter(REFERENCE_ADAPTER)
        peft_model.set_adapter("default")
    for name, parameter in peft_model.named_parameters():
        if name in loaded:  # TRL cast them to bf16; back to the exact weights, in the strategy's dtype
            parameter.data = loaded[name].to(strategy_setup.adapter_dtype)
    strategy_setup.shard(peft_model)  # herd's FSDP2 only: after the adapters are final, before train()
    return trainer


def reference_in_use(trainer) -> str:
    """What the trainer really uses as reference, for metrics.json and the tests."""
    if trainer.ref_model is not None:
        return "separate model"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in model.peft_config:
        return f"adapter '{REFERENCE_ADAPTER}' (frozen copy of the starting adapter)"
    return "adapter switched off"


def keep_policy_adapter_only(adapter_dir: Path) -> None:
    """The final adapter/ holds the trained adapter alone (PEFT also saves TRL's "ref" copy in a subdirectory;
    checkpoints keep it)."""
    shutil.rmtree(adapter_dir / REFERENCE_ADAPTER, ignore_errors=True)


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def rewards(metrics: dict | None, prefix: str = "eval_") -> dict | None:
    """The reward metrics of one evaluation (TRL's eval_rewards/*), unprefixed."""
    if not metrics:
        return None
    found = {key: metrics[prefix + key] for key in REWARD_KEYS if prefix + key in metrics}
    return found or None


def records(trainer, job: TrainJob, before: dict | None, after: dict | None) -> dict:
    """metrics.json's DPO part."""
    return {
        "method": "dpo",
        "dpo": {"beta": job.dpo.beta, "loss_type": job.dpo.loss_type, "sft_run": job.dpo.sft_run,
                "reference": reference_in_use(trainer)},
        "eval_rewards_before": rewards(before), "eval_rewards_after": rewards(after),
        "packing": None,
        "lm_head": "TRL fused head (log-probs of answer tokens)",
    }


def run_info(job: TrainJob, location: str, peft_cfg: PeftConfig, data_cfg: dict) -> dict:
    """herd_run.json's DPO part: infer rebuilds the model from `peft` (the LoRA layout trained); `data` is the
    SFT run's conversations (infer evaluates and prompts with them), or null from the base: pass data=..."""
    peft = {key: (value.value if hasattr(value, "value") else value)
            for key, value in dataclasses.asdict(peft_cfg).items()}
    return {"method": "dpo", "peft": peft, "data": sft_data(job, location), "preference_data": data_cfg,
            "sft_run": str(resolve_path(job.dpo.sft_run, must_exist=False)) if job.dpo.sft_run else None}


def margin_line(before: dict | None, after: dict) -> str:
    """The run's outcome: eval reward margin and accuracy, before -> after."""
    def show(metrics: dict | None, key: str) -> str:
        return f"{metrics[key]:.4f}" if metrics and key in metrics else "-"

    return (f"eval reward margin {show(before, 'eval_rewards/margins')} -> {show(after, 'eval_rewards/margins')}, "
            f"accuracy {show(before, 'eval_rewards/accuracies')} -> {show(after, 'eval_rewards/accuracies')}")
