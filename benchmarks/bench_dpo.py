"""herd's DPO against the plain TRL + PEFT DPO script, same model, same pairs, in one run.

The model and the measuring are bench_train.py's (a random-init Llama of the chosen shape, NF4 + double quant,
LoRA r=16 on all linear layers, each side in its own process). The pairs are herd's bundled sample
(data/sample/preference_sample.jsonl, what `method=dpo` trains on by default). Sides:

- baseline: benchmarks/baseline_dpo.py, given the pairs as Llama-2 chat text; TRL tokenizes them, attaches LoRA
  from its peft_config and truncates pairs longer than --seq-len.
- herd: herd's path as train/recipe.py builds a DPO run: herd.preference tokenizes and caches the pairs
  (dropping those longer than --seq-len), herd.training.dpo loads the policy and builds the trainer.

Reported per side: pair tokens/s (non-padding tokens of the chosen and rejected sequences, prompt included:
what the trainer counts), step time, peak RSS (CPU) or peak allocated memory (GPU), time to the first
finished step, the final loss, and what really ran (reference, gradient checkpointing, adapter dtype, who
tokenized the pairs and attached LoRA). Warm-up steps are left out of the timings.

    python benchmarks/bench_dpo.py --shape small --device cpu --seq-len 1024 --rounds 2 --out results/cpu_small_dpo.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from baseline_dpo import build_baseline_dpo_trainer, load_4bit
from bench_train import SHAPES, StepTimer, add_side_arguments, bench_model, run_sides, write_report

from herd.chat_format import format_llama2
from herd.preference import COLUMNS, Pair, row_to_pair

SIDES = {
    "baseline": "the plain TRL + PEFT DPO script, benchmarks/baseline_dpo.py",
    "herd": "herd's pair cache, loading and DPO trainer, as `python -m train method=dpo` builds them",
    "herd-no-checkpointing": "herd without gradient checkpointing (herd's auto setting on CPU)",
}
PAIRS = REPO / "data" / "sample" / "preference_sample.jsonl"
SEED = 42  # herd's data.seed and both trainers' seed: the same pair order and sampler on both sides


class StepClock(StepTimer):
    """StepTimer plus each step's CPU time (all of the process's threads): on a shared machine other work
    stretches a step's wall time far more than its CPU time."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.cpu_steps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        self.cpu_started = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.cpu_steps.append(time.process_time() - self.cpu_started)


def read_pairs(path: Path) -> list[Pair]:
    """The data's pairs, shuffled as herd.preference.select_pairs shuffles them before it drops long ones:
    where it drops none, both sides' trainers draw the same pairs into the same batches."""
    pairs = [row_to_pair(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    random.Random(SEED).shuffle(pairs)
    return pairs


def text_rows(pairs: list[Pair]) -> list[dict]:
    """The pairs as the baseline's user writes them: Llama-2 chat text (herd.chat_format, the format herd
    trains in), the prompt ending in "[/INST]", each answer " ... </s>". The prompt's leading <s> is left to
    the tokenizer, which adds one itself (kept, every sequence would start with two)."""
    rows = []
    for pair in pairs:
        prompt = format_llama2(list(pair.prompt)).text
        answers = [format_llama2(pair.conversation(a)).text[len(prompt):] for a in (pair.chosen, pair.rejected)]
        rows.append({"prompt": prompt.removeprefix("<s>"), "chosen": answers[0], "rejected": answers[1]})
    return rows


def herd_trainer(args, model_dir: Path, tokenizer, output_dir: str, callbacks, checkpointing: bool = True):
    """(the model handed to the trainer, the trainer, the data report): herd's DPO as train/recipe.py's load_data
    and build phases do it, with the run directory's records, tracking and checkpoint callbacks left out."""
    from herd.config.dpo import DpoConfig, Method
    from herd.config.train import DataConfig, ModelConfig, PeftConfig, StrategyConfig, TrainConfig, TrainJob
    from herd.preference import load_pair_splits
    from herd.training import dpo
    from herd.training.strategy import setup_for

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    job = TrainJob(
        model=ModelConfig(name=args.shape, path=str(model_dir)),
        # A fresh cache per side process: the first run's cost (tokenize, write, read back) is what is timed.
        data=DataConfig(name="sample-pairs", path=args.pairs, max_seq_len=args.seq_len, eval_size=0,
                        seed=SEED, cache_dir=str(Path(output_dir) / "cache")),
        peft=PeftConfig(),
        train=TrainConfig(max_steps=args.warmup + args.steps, micro_batch_size=args.micro_batch,
                          global_batch_size=args.micro_batch, learning_rate=5e-5, warmup_ratio=0.1,
                          logging_steps=1, save_steps=10**6, seed=SEED,
                          optimizer="paged_adamw_32bit" if args.device == "cuda" else "adamw_torch",
                          gradient_checkpointing=checkpointing),
        strategy=StrategyConfig(), output_dir=output_dir, method=Method.dpo, dpo=DpoConfig(beta=args.beta),
    )
    decided = setup_for(job, args.device, dtype, local_rank=0)  # strategy=single in this one process
    train_data, _, report = load_pair_splits(job.data, job.dpo, tokenizer)
    training_args = dpo.training_arguments(job, Path(output_dir), dtype, 1, has_eval=False,
                                           gradient_checkpointing=checkpointing, strategy_setup=decided)
    training_args.disable_tqdm = True
    # The fields of the recipe's RunSetup that dpo.load_policy / load_reference read.
    peft_cfg = dataclasses.replace(dpo.policy_peft(job, str(model_dir)), quant_storage=decided.quant_storage)
    setup = SimpleNamespace(job=job, strategy=decided, dtype=dtype, location=str(model_dir),
                            gradient_checkpointing=checkpointing, peft=peft_cfg)
    model = dpo.load_policy(setup)
    trainer = dpo.build_trainer(model, dpo.load_reference(setup), training_args, train_data, None,
                                tokenizer, callbacks, decided, from_sft=False)
    return model, trainer, report


def pairs_tokenized_by(dataset) -> str:
    """TRL's own tokenization keeps the text columns beside the ids; herd's cache holds the ids alone, read
    back from its pairs-<key> directory."""
    if {"prompt", "chosen", "rejected"} <= set(dataset.column_names):
        return "TRL (text tokenized by DPOTrainer)"
    files = [Path(f["filename"]) for f in dataset.cache_files]
    if set(dataset.column_names) == set(COLUMNS) and files and all(
            any(part.startswith("pairs-") for part in f.parts) for f in files):
        return "herd.preference cache"
    return "unknown"


def what_ran(trainer, given) -> dict:
    """What a side really trained with, read back from its trainer (and the model it was handed)."""
    from peft import PeftModel

    from herd.training.dpo import reference_in_use

    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "pairs_tokenized_by": pairs_tokenized_by(trainer.train_dataset),
        # herd hands DPOTrainer a PeftModel (herd.modeling.add_lora); the plain script a base and a peft_config.
        "lora_attached_by": "herd.modeling.add_lora" if isinstance(given, PeftModel) else "TRL (peft_config)",
        "reference": reference_in_use(trainer),
        "gradient_checkpointing": model.get_base_model().is_activation_checkpointing,
        "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
        "trainable_parameters": sum(p.numel() for p in trainable),
    }


def pair_counts(trainer, total: int, max_length: int, report=None) -> dict:
    """How many of the data's pairs each side trains on: herd drops those longer than max_length, TRL's
    collator truncates them (keep_start: the ends of the longer answers are cut)."""
    data = trainer.train_dataset
    longest = [len(p) + max(len(c), len(r))
               for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    return {"in_data": total, "trained_from": len(data),
            "dropped_too_long": report.bad.get("too_long", 0) if report else 0,
            "truncated": sum(n > max_length for n in longest)}


def measure(side: str, args, model_dir: Path, tokenizer) -> dict:
    timer = StepClock(args.device)
    started = time.perf_counter()
    pairs = read_pairs(Path(args.pairs))
    with tempfile.TemporaryDirectory() as output_dir:
        if side == "baseline":
            given, report = load_4bit(str(model_dir), args.device), None
            trainer = build_baseline_dpo_trainer(str(model_dir), text_rows(pairs), output_dir,
                                                 steps=args.warmup + args.steps, micro_batch=args.micro_batch,
                                                 max_length=args.seq_len, beta=args.beta, device=args.device,
                                                 callbacks=[timer], tokenizer=tokenizer, model=given)
        else:
            given, trainer, report = herd_trainer(args, model_dir, tokenizer, output_dir, [timer],
                                                  checkpointing=side != "herd-no-checkpointing")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        ran = what_ran(trainer, given)
        counts = pair_counts(trainer, len(pairs), args.seq_len, report)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        peak_allocated = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        del trainer, given
    gc.collect()
    measured = timer.steps[args.warmup:]
    seconds = sum(t for t, _ in measured)
    tokens = sum(n for _, n in measured)
    cpu_seconds = sum(timer.cpu_steps[args.warmup:])
    result = {
        "side": side, "steps_measured": len(measured), "step_time_s": seconds / len(measured),
        "pair_tokens_per_s": tokens / seconds, "pair_tokens_per_step": tokens / len(measured),
        "pairs_per_s": args.micro_batch * len(measured) / seconds,
        "step_cpu_s": cpu_seconds / len(measured), "pair_tokens_per_cpu_s": tokens / cpu_seconds,
        "time_to_first_step_s": timer.first_step_at - started,  # from this side's setup, imports done
        "first_step_wall_clock": timer.first_step_wall,
        "final_loss": losses[-1], "first_loss": losses[0], **ran, "pairs": counts,
        "peak_allocated_gb": peak_allocated,
        # ru_maxrss: KiB on Linux, the whole side process (imports, loading, tokenization, training)
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_average_1m": os.getloadavg()[0],  # other work on the machine while this side ran
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512, help="longest prompt + answer, tokens")
    parser.add_argument("--micro-batch", type=int, default=2, help="pairs per step (two sequences each)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--pairs", default=str(PAIRS), help="JSONL of prompt / chosen / rejected rows")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--sides", default="baseline,herd", help="comma-separated: " + "; ".join(
        f"{side} ({meaning})" for side, meaning in SIDES.items()))
    parser.add_argument("--out", required=True)
    add_side_arguments(parser)
    args = parser.parse_args()
    unknown = [side for side in args.sides.split(",") if side not in SIDES]
    if unknown:
        sys.exit(f"bench_dpo: unknown side {unknown[0]!r} in --sides; allowed: {', '.join(SIDES)}")

    tokenizer, model_dir = bench_model(args.shape, args.model_dir)
    results = run_sides(args, args.sides.split(","), lambda side: measure(side, args, model_dir, tokenizer),
                        __file__)
    if results is not None:
        write_report(args, results, tokenizer_note="herd's tiny tokenizer (1024 tokens) over the model's "
                     "embedding; pair lengths come from herd's bundled preference sample")


if __name__ == "__main__":
    main()
