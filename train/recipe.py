"""One QLoRA SFT run: setup -> evaluate -> train -> evaluate -> save. Called by `python -m train`."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from herd import lm_head, packing, rundir
from herd.config.train import Strategy, TrainJob, gradient_accumulation
from herd.data import load_splits
from herd.modeling import (
    add_lora,
    load_base_model,
    load_tokenizer,
    model_location,
    resolve_device,
    resolve_precision,
)
from herd.paths import share_per_umask
from herd.random_init import check_random_init
from herd.training import strategy
from herd.training.checkpoints import CompleteMarker, discard_checkpoints, finished_run, resume_point
from herd.training.faults import DebugFaults
from herd.training.manifest import MANIFEST, build_manifest
from herd.training.plan import check_fits, device_memory_bytes, launch_commands, plan_job
from herd.training.preempt import Preemption
from herd.training.tracking.callback import HerdTracker

log = logging.getLogger("herd.train")


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    eval_loss_before: float | None
    eval_loss_after: float | None


class WrappedModelProbe(TrainerCallback):
    """Records what the model was wrapped in while training (DistributedDataParallel, DeepSpeedEngine,
    FSDP ...): the trainer unwraps it again when training ends."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        trainer.wrapped_model_seen = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.wrapped_model_seen = type(self.trainer.model_wrapped).__name__


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
        use_cpu=device == "cpu" and not strategy.deepspeed_on_cpu(job, device),
        # DeepSpeed on CPU needs the PartialState herd set up (strategy.distributed_state); elsewhere the
        # trainer builds its own, as it always has.
        accelerator_config={"use_configured_state": strategy.deepspeed_on_cpu(job, device)},
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
        packing=t.packing,
        packing_strategy="bfd",
        report_to="none",
        disable_tqdm=False,
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter is used in every step
        **strategy.trainer_kwargs(job, dtype, device),
    )


def adapt_trainer(trainer: SFTTrainer, attn_implementation: str, adapter_dtype: torch.dtype,
                  row_per_bin: bool = True, herd_head: bool = True) -> None:
    """herd's changes to a built SFTTrainer, in one place (the benchmark switches them off one at a time to
    measure each).

    - Packed bins keep a row each instead of TRL's one flattened row (herd.packing).
    - On CPU herd's loss head scores labelled positions only (herd.lm_head); TRL's fused head elsewhere.
    - TRL casts QLoRA adapters to bf16, but a resumed run reloads them from the checkpoint in fp32: the two
      would train differently. herd keeps LoRA weights in `adapter_dtype`: fp32 (PEFT's own default;
      autocast still runs the matmuls in the compute dtype) except where a sharded strategy flattens them
      together with the base weights (the training dtype: bf16 on GPU, fp32 on CPU; herd's CPU FSDP2 and
      DeepSpeed on CPU are all fp32, 4-bit storage included).
    """
    if row_per_bin:
        packing.collate_packed_bins_per_row(trainer, attn_implementation)
    if herd_head:
        lm_head.score_labelled_positions_on_cpu(trainer)
    for parameter in trainer.model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(adapter_dtype)


class ShardedSFTTrainer(SFTTrainer):
    """SFTTrainer for a model herd sharded itself with FSDP2 (strategy=fsdp on CPU, where accelerate has no
    FSDP): the adapter is gathered whole on every rank and written by rank 0; each rank checkpoints its
    own optimizer shard."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        state_dict = strategy.full_trainable_state_dict(self.model)  # collective: all ranks
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        full = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
        strategy.load_full_trainable_state_dict(self.model, full)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        torch.save(strategy.local_optimizer_state(self.optimizer.state_dict()),
                   os.path.join(output_dir, f"optimizer-rank{self.args.process_index}.pt"))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        self.optimizer.load_state_dict(torch.load(
            os.path.join(checkpoint, f"optimizer-rank{self.args.process_index}.pt"), weights_only=True))
        strategy.reshard_optimizer_state(self.optimizer)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))


def distributed_facts(trainer, state: PartialState) -> dict:
    """What really ran, for the manifest and the tests: accelerate can fall back silently."""
    accelerator = trainer.accelerator
    facts = {
        "distributed_type": str(accelerator.distributed_type).rpartition(".")[2],
        "num_processes": state.num_processes,
        "wrapped_model": trainer.wrapped_model_seen,
    }
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        facts["zero_stage"] = plugin.zero_stage
        # ZeRO-3 parameters are DeepSpeed-partitioned tensors (ds_id); each rank holds a slice of each.
        facts["partitioned_parameters"] = sum(hasattr(p, "ds_id") for p in trainer.model.parameters())
        engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None:  # what the engine really did, not what herd asked for
            facts["offload_optimizer"] = bool(engine.engine.zero_offload_optimizer())
            facts["offload_params"] = bool(engine.engine.zero_offload_param())
    facts["devices"] = sorted({str(p.device) for p in trainer.model.parameters()})
    facts["quantized_linear_layers"] = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                                           for m in trainer.model.modules())
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())
    if facts["distributed_type"] == "FSDP" or sharded:
        facts["sharded_parameters"] = sharded
    if isinstance(trainer, ShardedSFTTrainer):
        facts["fsdp"] = "herd FSDP2 (fully_shard per decoder layer + root)"
    return facts


def run(cfg: DictConfig) -> RunResult | None:
    cfg.output_dir = rundir.job_run_dir(cfg.output_dir)  # config.yaml records where the job really ran
    job: TrainJob = OmegaConf.to_object(cfg)
    preemption = Preemption()  # first: a USR1 that arrives while loading is kept for the first step
    device = resolve_device(job.device)
    dtype = resolve_precision(job.train.precision, device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    strategy.check_compatibility(job, world_size, dtype, device)
    check_random_init(job)
    location = model_location(job.model)
    device_bytes = device_memory_bytes(job, device)
    settings, plan = plan_job(job, world_size, location, device_bytes)
    checkpointing = ("on" if settings.gradient_checkpointing else "off") + (
        " (auto)" if job.train.gradient_checkpointing is None else "")
    job.train.gradient_checkpointing = settings.gradient_checkpointing  # auto decided by the plan
    if job.plan:
        print(plan.format(device_bytes))
        print(f"gradient checkpointing {checkpointing}")
        print("launch with:\n  " + "\n  ".join(launch_commands(world_size)), flush=True)
        return None
    check_fits(job, settings, plan, location, device_bytes)
    strategy.prepare_launch(device, job)
    state = strategy.distributed_state(job, device)
    accumulation = gradient_accumulation(job.train.global_batch_size, job.train.micro_batch_size,
                                         state.num_processes)
    run_dir = Path(job.output_dir).resolve()
    finished = finished_run(run_dir, job.train.max_steps)
    if finished is not None:  # e.g. a requeued job whose run had already ended: nothing to redo
        if state.is_main_process:
            print(f"herd: run {run_dir} already finished at step {finished['global_step']}; nothing to do "
                  f"(adapter: {run_dir / rundir.ADAPTER_DIR})", flush=True)
        return RunResult(run_dir, run_dir / rundir.ADAPTER_DIR, finished.get("eval_loss_before"),
                         finished.get("eval_loss_after"))
    resume_from, passed_over = resume_point(run_dir, job.train.max_steps) if run_dir.exists() else (None, [])
    state.wait_for_everyone()  # every rank has decided before the passed-over checkpoints go
    if passed_over and state.is_main_process:
        discard_checkpoints(passed_over)
    state.wait_for_everyone()
    if state.is_main_process:
        rundir.write_config(run_dir, cfg)
        print(f"herd: run directory {run_dir}; strategy {job.strategy.name.value}, {state.num_processes} "
              f"process(es), {device}; gradient checkpointing {checkpointing}"
              + (f"; resuming from {resume_from.name}" if resume_from else ""),
              flush=True)

    tokenizer = load_tokenizer(job.model, location)
    with state.main_process_first():  # rank 0 tokenizes and caches; the others read its cache
        train_data, eval_data, report = load_splits(job.data, tokenizer)
    if state.is_main_process:
        print(report.summary(), flush=True)

    # The arguments come before the model: under ZeRO-3 they switch on sharded loading (zero.Init).
    args = training_arguments(job, run_dir, device, dtype, accumulation, eval_data is not None)
    # The baseline evaluation runs inside train() (eval_on_start), in fresh and resumed runs alike: the
    # distributed eval loader moves the data order, so both must do it for a resume to be exact.
    # DeepSpeed evaluates before its engine exists only under ZeRO-3, so ZeRO-2 runs skip it.
    args.eval_on_start = (eval_data is not None and job.train.eval_before_train
                          and job.strategy.name != Strategy.zero2)
    manual_fsdp2 = strategy.manual_fsdp2(job, device)
    placement = None if job.strategy.name in strategy.SHARDED and not manual_fsdp2 else (
        f"cuda:{state.local_process_index}" if device == "cuda" else "cpu")
    peft_cfg = dataclasses.replace(job.peft, quant_storage=strategy.quant_storage(job, dtype))
    set_seed(job.train.seed)  # LoRA's A matrices are drawn at creation, before the trainer seeds anything
    model = load_base_model(job.model, peft_cfg, placement, dtype, location, job.strategy.device_map)
    model = add_lora(model, peft_cfg, job.train.gradient_checkpointing)

    tracker = HerdTracker(job.tracking, run_dir, cfg, seq_len=job.data.max_seq_len)
    trainer = (ShardedSFTTrainer if manual_fsdp2 else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[EvalSummary(), CompleteMarker(run_dir, state), DebugFaults(), preemption, tracker],
    )
    trainer.add_callback(WrappedModelProbe(trainer))
    # Adapters that a sharded strategy flattens together with the base weights need its one dtype.
    adapter_dtype = dtype if job.strategy.name in strategy.SHARDED and not manual_fsdp2 else torch.float32
    adapt_trainer(trainer, job.model.attn_implementation, adapter_dtype)
    if manual_fsdp2:
        # After TRL's constructor (which re-assigns the adapters' .data: that must not touch FSDP's shards)
        # and before train() builds the optimizer over the sharded parameters.
        strategy.fully_shard_model(trainer.model)
    if state.is_main_process:
        manifest = build_manifest(
            rundir.resolved_config(cfg), state.num_processes, job.strategy.name.value,
            str(trainer.accelerator.distributed_type).rpartition(".")[2])
        rundir.write_json(run_dir / MANIFEST, manifest)
        tracker.add_manifest(manifest)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    preemption.exit_if_stopped()  # checkpoint saved on every rank: exit 124, the SLURM job requeues
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    before = evaluations[0]["eval_loss"] if args.eval_on_start and evaluations else None
    after = trainer.evaluate()["eval_loss"] if eval_data is not None else None

    adapter_dir = run_dir / rundir.ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    facts = distributed_facts(trainer, state)
    if state.is_main_process:
        tokenizer.save_pretrained(str(adapter_dir))
        share_per_umask(adapter_dir)
        rundir.write_json(run_dir / rundir.METRICS, {
            "eval_loss_before": before, "eval_loss_after": after, "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "final_train_loss": last_train_loss(trainer), "resumed_from": resume_from.name if resume_from else None,
            "data": report.summary(), "distributed": facts,
            "packing": packing.packed_layout(trainer),
            "gradient_checkpointing": checkpointing,
            "lm_head": lm_head.head_that_ran(model),  # herd's head runs on CPU only, TRL's fused head elsewhere
        })
        rundir.write_json(run_dir / rundir.RUN_INFO, {
            "base_model": location, "model": OmegaConf.to_container(cfg.model, enum_to_str=True),
            "peft": OmegaConf.to_container(cfg.peft, enum_to_str=True), "adapter": rundir.ADAPTER_DIR,
            "data": OmegaConf.to_container(cfg.data, enum_to_str=True),
        })
        print(f"eval loss {before} -> {after}" if before is not None else f"eval loss {after}")
        print(f"adapter: {adapter_dir}\nrun directory: {run_dir}", flush=True)
    tracker.finish(adapter_dir)
    state.wait_for_everyone()
    return RunResult(run_dir, adapter_dir, before, after)


def last_train_loss(trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else None
