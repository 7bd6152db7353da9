"""The trainer settings every herd run shares, SFT and DPO alike: train.*, the precision, the strategy's own."""

from __future__ import annotations

from pathlib import Path

import torch

from herd.config.train import TrainJob
from herd.console import interactive
from herd.training.strategy import StrategySetup


def shared_trainer_arguments(job: TrainJob, run_dir: Path, dtype: torch.dtype, accumulation: int, *,
                             has_eval: bool, gradient_checkpointing: bool, strategy_setup: StrategySetup) -> dict:
    """Keyword arguments of TRL's SFTConfig and DPOConfig (TrainingArguments) that herd sets the same way."""
    t = job.train
    return dict(
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
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,  # TRL turns bf16 on by default; CPU runs need it off
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        # The baseline evaluation runs inside train(), in fresh and resumed runs alike: the distributed eval
        # loader moves the data order, so both must do it for a resume to be exact.
        eval_on_start=has_eval and t.eval_before_train and strategy_setup.evaluates_before_training,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=job.data.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",
        max_length=job.data.max_seq_len,
        report_to="none",
        disable_tqdm=not interactive(),  # bars on a terminal only; herd's line per logging step either way
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter is used in every step
        **strategy_setup.trainer_arguments,  # device use (use_cpu, accelerator state), FSDP / DeepSpeed
    )
