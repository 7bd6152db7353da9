"""One QLoRA SFT run, in phases: resolve -> prepare the run directory -> build the trainer -> train and finish.

Called by `python -m train`. Every decision is made once, in `resolve`, and carried by a frozen RunSetup; the
later phases read it and change nothing in it (nor in the job config).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from herd import dist, lm_head, packing, rundir
from herd.config.checks import check_library_names
from herd.config.dpo import Method
from herd.config.train import PeftConfig, TrainJob, gradient_accumulation
from herd.data import DataReport, check_source, load_splits
from herd.errors import HerdError
from herd.modeling import (
    add_lora,
    check_target_modules,
    load_base_model,
    load_tokenizer,
    model_location,
    resolve_device,
    resolve_precision,
)
from herd.paths import share_per_umask
from herd.preference import load_pair_splits
from herd.random_init import check_random_init
from herd.training import dpo, strategy
from herd.training.arguments import shared_trainer_arguments
from herd.training.checkpoints import CompleteMarker, finished_run, resume_point, set_aside
from herd.training.faults import DebugFaults
from herd.training.manifest import MANIFEST, build_manifest
from herd.training.plan import check_fits, device_memory_bytes, launch_commands, plan_job
from herd.training.preempt import Preemption
from herd.training.run_lock import RunLock
from herd.training.strategy import StrategySetup
from herd.training.tracking.callback import HerdTracker
from herd.training.tracking.progress import print_line, use_herd_console

log = logging.getLogger("herd.train")


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    eval_loss_before: float | None
    eval_loss_after: float | None


@dataclass(frozen=True)
class RunSetup:
    """What a run decides once, before anything loads; every later phase reads it, none changes it."""

    job: TrainJob  # as configured: the plan's decisions are here, not written back into it
    device: str  # cpu | cuda
    dtype: torch.dtype  # the training precision
    location: str  # the base model: a local directory or a hub id
    gradient_checkpointing: bool  # train.gradient_checkpointing, or the plan's choice where it is null
    checkpointing: str  # that decision as printed and recorded in metrics.json: "on", "off (auto)" ...
    state: PartialState  # this process in the launch: rank, number of processes, barriers
    accumulation: int  # gradient accumulation steps: the global batch over micro batch x processes
    strategy: StrategySetup  # placement, adapter dtype, quant storage, trainer class and arguments
    peft: PeftConfig  # the LoRA layout trained (a DPO run's: its SFT run's), quant storage resolved
    run_dir: Path
    finished: dict | None  # the metrics of a run that had already finished: nothing to redo
    resume_from: Path | None  # the checkpoint to resume from
    passed_over: tuple[Path, ...]  # final checkpoints to set aside before training rewrites them


@dataclass
class Data:
    """The tokenizer and the tokenized splits, with the report of what was dropped."""

    tokenizer: object
    train: object
    eval: object | None
    report: DataReport


@dataclass
class Built:
    """What the build phase hands to training and finishing."""

    trainer: SFTTrainer  # a DPOTrainer with method=dpo (herd.training.dpo)
    model: torch.nn.Module  # the PEFT model the trainer trains
    tokenizer: object
    tracker: HerdTracker
    report: DataReport
    has_eval: bool


def run(cfg: DictConfig) -> RunResult | None:
    """The run, phase by phase; None for plan=true."""
    cfg.output_dir = rundir.job_run_dir(cfg.output_dir)  # config.yaml records where the job really ran
    job: TrainJob = OmegaConf.to_object(cfg)
    preemption = Preemption()  # first: a USR1 that arrives while loading is kept for the first step
    setup = resolve(job)
    if setup is None:  # plan=true: the plan is printed, nothing runs
        return None
    if setup.finished is not None:  # e.g. a requeued job whose run had already ended: nothing to redo
        return already_finished(setup)
    lock = lock_run_dir(setup)
    try:
        data = load_data(setup)  # before anything is written: bad data leaves the run directory as it was
        prepare_run_dir(setup, cfg)
        built = build(setup, cfg, preemption, data)
        return train_and_finish(setup, cfg, built, preemption)
    finally:
        if lock is not None:
            lock.release()
            if not any(setup.run_dir.iterdir()):  # only the lock was ever there: leave no empty run behind
                setup.run_dir.rmdir()


def resolve(job: TrainJob) -> RunSetup | None:
    """Device, precision, strategy, memory plan, processes, run directory and resume point, each decided
    once. With plan=true the plan is printed instead and nothing starts (None)."""
    device = resolve_device(job.device)
    dtype = resolve_precision(job.train.precision, device)
    world_size = dist.world_size()
    strategy.check_compatibility(job, world_size, dtype, device)
    check_random_init(job)
    location = model_location(job.model)
    peft = check_inputs(job, location)
    planned = dataclasses.replace(job, peft=peft)  # the LoRA layout the run really trains
    device_bytes = device_memory_bytes(job, device)
    settings, plan = plan_job(planned, world_size, location, device_bytes)
    checkpointing = ("on" if settings.gradient_checkpointing else "off") + (
        " (auto)" if job.train.gradient_checkpointing is None else "")
    if job.plan:
        print(plan.format(device_bytes))
        print(f"gradient checkpointing {checkpointing}")
        print("launch with:\n  " + "\n  ".join(launch_commands(world_size)), flush=True)
        return None
    check_fits(planned, settings, plan, location, device_bytes)
    state = strategy.start_processes(job, device)
    accumulation = gradient_accumulation(job.train.global_batch_size, job.train.micro_batch_size,
                                         state.num_processes)
    strategy_setup = strategy.setup_for(job, device, dtype, state.local_process_index)
    run_dir = Path(job.output_dir).resolve()
    finished = finished_run(run_dir, job.train.max_steps)
    resume_from, passed_over = (resume_point(run_dir, job.train.max_steps) if finished is None and run_dir.exists()
                                else (None, []))
    return RunSetup(
        job=job, device=device, dtype=dtype, location=location,
        gradient_checkpointing=settings.gradient_checkpointing, checkpointing=checkpointing,
        state=state, accumulation=accumulation, strategy=strategy_setup,
        peft=dataclasses.replace(peft, quant_storage=strategy_setup.quant_storage),
        run_dir=run_dir, finished=finished, resume_from=resume_from, passed_over=tuple(passed_over),
    )


def check_inputs(job: TrainJob, location: str) -> PeftConfig:
    """What the schema alone cannot check, on every rank before anything is written: the names only the
    libraries know, the data file, a DPO run's SFT run, the LoRA targets against the model's layers.
    Returns the LoRA layout the run trains: peft, or the SFT run's (dpo.sft_run)."""
    check_library_names(job.train.optimizer, job.train.lr_scheduler, job.model.attn_implementation)
    check_source(job.data)
    peft = job.peft
    if job.method == Method.dpo:
        dpo.check_job(job, location)
        peft = dpo.policy_peft(job, location)
    check_target_modules(job.model, peft, location)
    return peft


def lock_run_dir(setup: RunSetup) -> RunLock | None:
    """Rank 0 takes the run directory's lock (herd.training.run_lock); every rank learns the outcome, so a
    refused launch ends on all ranks alike, in one line, before anything is written."""
    lock, refusal = None, None
    if setup.state.is_main_process:
        lock = RunLock(setup.run_dir)
        try:
            lock.acquire()
        except HerdError as error:
            refusal = str(error)
    refusal = dist.all_gather_objects(refusal)[0]
    if refusal:
        raise HerdError(refusal)
    return lock


def already_finished(setup: RunSetup) -> RunResult:
    run_dir, finished = setup.run_dir, setup.finished
    if setup.state.is_main_process:
        print(f"herd: run {run_dir} already finished at step {finished['global_step']}; nothing to do "
              f"(adapter: {run_dir / rundir.ADAPTER_DIR})", flush=True)
    return RunResult(run_dir, run_dir / rundir.ADAPTER_DIR, finished.get("eval_loss_before"),
                     finished.get("eval_loss_after"))


def prepare_run_dir(setup: RunSetup, cfg: DictConfig) -> None:
    """Passed-over checkpoints set aside, config.yaml written, the run announced."""
    state = setup.state
    state.wait_for_everyone()  # every rank has decided before the passed-over checkpoints move
    if setup.passed_over and state.is_main_process:
        set_aside(list(setup.passed_over))
    state.wait_for_everyone()
    if state.is_main_process:
        rundir.write_config(setup.run_dir, cfg)
        print(f"herd: run directory {setup.run_dir}; strategy {setup.job.strategy.name.value}, "
              f"{state.num_processes} process(es), {setup.device}; gradient checkpointing {setup.checkpointing}"
              + (f"; dpo, reference {dpo.reference_description(setup.job)}" if setup.job.method == Method.dpo else "")
              + (f"; resuming from {setup.resume_from.name}" if setup.resume_from else ""),
              flush=True)


def load_data(setup: RunSetup) -> Data:
    """The tokenizer and the tokenized splits (rank 0 tokenizes and caches; the others read its cache)."""
    tokenizer = load_tokenizer(setup.job.model, setup.location)
    refusal = None
    with setup.state.main_process_first():
        try:
            if setup.job.method == Method.dpo:  # preference pairs (herd.preference)
                train_data, eval_data, report = load_pair_splits(setup.job.data, setup.job.dpo, tokenizer)
            else:
                train_data, eval_data, report = load_splits(setup.job.data, tokenizer)
        except HerdError as error:  # rank 0 still reaches the barrier; the others then refuse the same data
            refusal = error
    if refusal is not None:
        raise refusal
    if setup.state.is_main_process:
        print(report.summary(), flush=True)
    return Data(tokenizer, train_data, eval_data, report)


def build(setup: RunSetup, cfg: DictConfig, preemption: Preemption, data: Data) -> Built:
    """Training arguments, model and trainer; the run's manifest written."""
    job, state = setup.job, setup.state
    tokenizer, train_data, eval_data, report = data.tokenizer, data.train, data.eval, data.report
    # The arguments come before the model: under ZeRO-3 they switch on sharded loading (zero.Init).
    arguments = dpo.training_arguments if job.method == Method.dpo else training_arguments
    args = arguments(job, setup.run_dir, setup.dtype, setup.accumulation, has_eval=eval_data is not None,
                     gradient_checkpointing=setup.gradient_checkpointing, strategy_setup=setup.strategy)
    tracker = HerdTracker(job.tracking, setup.run_dir, cfg, seq_len=job.data.max_seq_len,
                          dpo=job.method == Method.dpo)
    shared = [CompleteMarker(setup.run_dir, state), DebugFaults(), preemption, tracker]
    if job.method == Method.dpo:
        model = dpo.load_policy(setup)
        trainer = dpo.build_trainer(model, dpo.load_reference(setup), args, train_data, eval_data,
                                    tokenizer, [EvalSummary(), *shared], setup.strategy,
                                    from_sft=bool(job.dpo.sft_run))
    else:
        model = load_model(setup)
        trainer = build_trainer(model, args, train_data, eval_data, tokenizer, [EvalSummary(), *shared],
                                setup.strategy, job.model.attn_implementation)
    if state.is_main_process:
        manifest = build_manifest(rundir.resolved_config(cfg), state.num_processes, job.strategy.name.value,
                                  strategy.distributed_type(trainer))
        rundir.write_json(setup.run_dir / MANIFEST, manifest)
        tracker.add_manifest(manifest, setup.run_dir / MANIFEST)  # + where the W&B run went, once it starts
    return Built(trainer, model, tokenizer, tracker, report, has_eval=eval_data is not None)


def load_model(setup: RunSetup) -> torch.nn.Module:
    """The base model where the strategy places it, in its 4-bit storage, with LoRA attached."""
    job = setup.job
    set_seed(job.train.seed)  # LoRA's A matrices are drawn at creation, before the trainer seeds anything
    model = load_base_model(job.model, setup.peft, setup.strategy.placement, setup.dtype, setup.location,
                            job.strategy.device_map)
    return add_lora(model, setup.peft, setup.gradient_checkpointing)


def train_and_finish(setup: RunSetup, cfg: DictConfig, built: Built, preemption: Preemption) -> RunResult:
    """Train (from the resume point), evaluate, save the adapter and write the run's records."""
    trainer, state, run_dir = built.trainer, setup.state, setup.run_dir
    trainer.train(resume_from_checkpoint=str(setup.resume_from) if setup.resume_from else None)
    preemption.exit_if_stopped()  # checkpoint saved on every rank: exit 124, the SLURM job requeues
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    first = evaluations[0] if trainer.args.eval_on_start and evaluations else None
    final = trainer.evaluate() if built.has_eval else None
    before, after = (first or {}).get("eval_loss"), (final or {}).get("eval_loss")

    adapter_dir = run_dir / rundir.ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    facts = strategy.distributed_facts(trainer, state.num_processes)
    if state.is_main_process:
        if setup.job.method == Method.dpo:
            dpo.keep_policy_adapter_only(adapter_dir)
        built.tokenizer.save_pretrained(str(adapter_dir))
        share_per_umask(adapter_dir)
        write_records(setup, cfg, built, (first, final), facts)
        if after is not None:  # no eval split (data.eval_size=0): nothing to report
            print(f"eval loss {before} -> {after}" if before is not None else f"eval loss {after}")
        if setup.job.method == Method.dpo and final:
            print(dpo.margin_line(first, final))
        print(f"adapter: {adapter_dir}\nrun directory: {run_dir}", flush=True)
    built.tracker.finish(adapter_dir)
    state.wait_for_everyone()
    return RunResult(run_dir, adapter_dir, before, after)


def write_records(setup: RunSetup, cfg: DictConfig, built: Built, evaluations: tuple[dict | None, dict | None],
                  facts: dict) -> None:
    """metrics.json (what ran and how it went) and herd_run.json (what infer needs to rebuild the model);
    evaluations: the metrics of the evaluations before and after training (None where none ran)."""
    trainer, resume_from = built.trainer, setup.resume_from
    before, after = ((e or {}).get("eval_loss") for e in evaluations)
    method = dpo.records(trainer, setup.job, *evaluations) if setup.job.method == Method.dpo else {}
    rundir.write_json(setup.run_dir / rundir.METRICS, {
        "eval_loss_before": before, "eval_loss_after": after, "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "final_train_loss": last_train_loss(trainer), "resumed_from": resume_from.name if resume_from else None,
        "data": built.report.summary(), "distributed": facts,
        "gradient_checkpointing": setup.checkpointing,
        # herd's head runs on CPU only, TRL's fused head elsewhere; DPO: herd.training.dpo.records
        **(method or {"packing": packing.packed_layout(trainer), "lm_head": lm_head.head_that_ran(built.model)}),
    })
    data = OmegaConf.to_container(cfg.data, enum_to_str=True)
    rundir.write_json(setup.run_dir / rundir.RUN_INFO, {
        "base_model": setup.location, "model": OmegaConf.to_container(cfg.model, enum_to_str=True),
        "peft": OmegaConf.to_container(cfg.peft, enum_to_str=True), "adapter": rundir.ADAPTER_DIR,
        "data": data,
        **(dpo.run_info(setup.job, setup.location,
                        dataclasses.replace(setup.peft, quant_storage=setup.job.peft.quant_storage), data)
           if setup.job.method == Method.dpo else {}),
    })


def last_train_loss(trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else None


# ---------------------------------------------------------------- the trainer (the benchmark builds it too)


class EvalSummary(TrainerCallback):
    """One line per evaluation: step, eval loss, perplexity (DPO: reward margin and accuracy) and training
    throughput so far. The final evaluation of a run whose last step was just evaluated repeats that line:
    not printed twice."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.last: tuple[int, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:
            return
        elapsed = time.perf_counter() - self.started
        tokens_per_s = state.num_input_tokens_seen / elapsed if state.global_step else 0.0
        loss = metrics["eval_loss"]
        if self.last == (state.global_step, loss):
            return
        self.last = (state.global_step, loss)
        if "eval_rewards/margins" in metrics:  # DPO's loss is no language model's: its rewards instead
            scores = (f"dpo loss {loss:.4f}  reward margin {metrics['eval_rewards/margins']:.4f}  "
                      f"accuracy {metrics.get('eval_rewards/accuracies', math.nan):.3f}")
        else:
            scores = f"loss {loss:.4f}  ppl {math.exp(min(loss, 50)):.2f}"
        print_line(f"eval step {state.global_step}: {scores}  train {tokens_per_s:.0f} tok/s")


def training_arguments(job: TrainJob, run_dir: Path, dtype: torch.dtype, accumulation: int, *, has_eval: bool,
                       gradient_checkpointing: bool, strategy_setup: StrategySetup) -> SFTConfig:
    shared = shared_trainer_arguments(job, run_dir, dtype, accumulation, has_eval=has_eval,
                                      gradient_checkpointing=gradient_checkpointing, strategy_setup=strategy_setup)
    return SFTConfig(**shared, packing=job.train.packing, packing_strategy="bfd")


def build_trainer(model, args: SFTConfig, train_data, eval_data, tokenizer, callbacks: list,
                  strategy_setup: StrategySetup, attn_implementation: str, *, row_per_bin: bool = True,
                  herd_head: bool = True) -> SFTTrainer:
    """The trainer as herd trains: the strategy's trainer class, herd's changes (adapt_trainer, whose flags
    the benchmark switches off one at a time), and the model sharded where herd shards it itself."""
    trainer = strategy_setup.trainer_class(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                           processing_class=tokenizer, callbacks=callbacks)
    trainer.add_callback(strategy.WrappedModelProbe(trainer))
    use_herd_console(trainer)  # the Trainer prints no logs dict; its bar only on a terminal
    adapt_trainer(trainer, attn_implementation, strategy_setup.adapter_dtype, row_per_bin, herd_head)
    strategy_setup.shard(trainer.model)  # herd's FSDP2 only: after adapt_trainer, before train()
    return trainer


def adapt_trainer(trainer: SFTTrainer, attn_implementation: str, adapter_dtype: torch.dtype,
                  row_per_bin: bool = True, herd_head: bool = True) -> None:
    """herd's changes to a built SFTTrainer, in one place (the benchmark switches them off one at a time to
    measure each).

    - Packed bins keep a row each instead of TRL's one flattened row (herd.packing).
    - On CPU herd's loss head scores labelled positions only (herd.lm_head); TRL's fused head elsewhere.
    - TRL casts QLoRA adapters to bf16, but a resumed run reloads them from the checkpoint in fp32: the two
      would train differently. herd keeps LoRA weights in `adapter_dtype`, the strategy's choice
      (StrategySetup.adapter_dtype).
    """
    if row_per_bin:
        packing.collate_packed_bins_per_row(trainer, attn_implementation)
    if herd_head:
        lm_head.score_labelled_positions_on_cpu(trainer)
    for parameter in trainer.model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(adapter_dtype)
