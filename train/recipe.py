"""One QLoRA SFT run: setup -> evaluate -> train -> evaluate -> save. Called by `python -m train`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from herd import rundir
from herd.config import ConfigError, TrainJob
from herd.data import load_splits
from herd.modeling import (
    add_lora,
    load_base_model,
    load_tokenizer,
    model_location,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger("herd.train")


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    eval_loss_before: float | None
    eval_loss_after: float | None


def gradient_accumulation(job: TrainJob, world_size: int) -> int:
    """The user sets the global batch and the micro batch; accumulation follows, or the batch is refused."""
    per_step = job.train.micro_batch_size * world_size
    if job.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={job.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size x processes = {job.train.micro_batch_size} x {world_size}; "
            f"use a multiple of {per_step}"
        )
    return job.train.global_batch_size // per_step


class EvalSummary(TrainerCallback):
    """One line per evaluation: step, eval loss, perplexity and training throughput so far."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
            return
        elapsed = time.perf_counter() - self.started
        tokens_per_s = state.num_input_tokens_seen / elapsed if state.global_step else 0.0
        loss = metrics["eval_loss"]
        print(
            f"eval step {state.global_step}: loss {loss:.4f}  ppl {math.exp(min(loss, 50)):.2f}  "
            f"train {tokens_per_s:.0f} tok/s",
            flush=True,
        )


def training_arguments(job: TrainJob, run_dir: Path, device: str, dtype: torch.dtype, accumulation: int,
                       has_eval: bool) -> SFTConfig:
    t = job.train
    return SFTConfig(
        output_dir=str(run_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,  # TRL turns bf16 on by default; CPU runs need it off
        use_cpu=device == "cpu",
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=job.data.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",
        max_length=job.data.max_seq_len,
        report_to="none",
        disable_tqdm=False,
    )


def run(cfg: DictConfig) -> RunResult:
    job: TrainJob = OmegaConf.to_object(cfg)
    state = PartialState()
    accumulation = gradient_accumulation(job, state.num_processes)
    device = resolve_device(job.device)
    dtype = resolve_precision(job.train.precision, device)
    run_dir = Path(job.output_dir).resolve()
    if state.is_main_process:
        rundir.write_config(run_dir, cfg)

    location = model_location(job.model)
    tokenizer = load_tokenizer(job.model, location)
    with state.main_process_first():  # rank 0 tokenizes and caches; the others read its cache
        train_data, eval_data, report = load_splits(job.data, tokenizer)
    if state.is_main_process:
        print(report.summary(), flush=True)

    model = load_base_model(job.model, job.peft, device, dtype, location)
    model = add_lora(model, job.peft, job.train.gradient_checkpointing)

    trainer = SFTTrainer(
        model=model,
        args=training_arguments(job, run_dir, device, dtype, accumulation, eval_data is not None),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[EvalSummary()],
    )
    before = trainer.evaluate()["eval_loss"] if eval_data is not None and job.train.eval_before_train else None
    trainer.train()
    after = trainer.evaluate()["eval_loss"] if eval_data is not None else None

    adapter_dir = run_dir / rundir.ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        tokenizer.save_pretrained(str(adapter_dir))
        rundir.write_json(run_dir / rundir.METRICS, {
            "eval_loss_before": before, "eval_loss_after": after, "global_step": trainer.state.global_step,
            "data": report.summary(),
        })
        rundir.write_json(run_dir / rundir.RUN_INFO, {
            "base_model": location, "model": OmegaConf.to_container(cfg.model, enum_to_str=True),
            "peft": OmegaConf.to_container(cfg.peft, enum_to_str=True), "adapter": rundir.ADAPTER_DIR,
            "data": OmegaConf.to_container(cfg.data, enum_to_str=True),
        })
        print(f"eval loss {before} -> {after}" if before is not None else f"eval loss {after}")
        print(f"adapter: {adapter_dir}\nrun directory: {run_dir}", flush=True)
    return RunResult(run_dir, adapter_dir, before, after)
