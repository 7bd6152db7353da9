"""herd against the plain TRL+PEFT QLoRA script, same model, same conversations, in one run.

A random-init Llama of the chosen shape (weights do not change throughput) is saved once and loaded in
4-bit NF4 + double quant by both sides; LoRA r=16 on all linear layers; gradient checkpointing on.
The baseline pads each batch (benchmarks/baseline_sft.py); herd packs conversations into max_seq_len
rows, padding-free. Each side runs in its own process. Reported per side: non-padding tokens/s, step time,
MFU, peak memory (GPU allocated/reserved; CPU peak RSS), time from the command to the first finished step.

    python benchmarks/bench_train.py --shape llama2-7b --device cuda --steps 10 --out results.json
    python benchmarks/bench_train.py --shape small --device cpu --steps 6 --seq-len 512 --micro-batch 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from baseline_sft import build_baseline_trainer
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from herd.chat_format import format_llama2, guanaco_to_messages
from herd.fixtures.sample_data import generate_guanaco_rows
from herd.fixtures.tiny import MODEL_SHAPE, ensure_tiny_model
from herd.training.tracking.metrics import count_parameters, device_peak_flops, flops_per_token

SIDES = {
    "baseline": "the plain TRL + PEFT script, benchmarks/baseline_sft.py",
    "herd": "herd's data, loading and trainer changes, as `python -m train` runs them",
    "herd-one-row": "herd with TRL's one flattened packed row instead of a row per bin",
    "herd-no-checkpointing": "herd without gradient checkpointing",
    "herd-trl-head": "herd with TRL's fused LM head instead of herd's on CPU",
    "herd-2-workers": "herd with 2 data loader workers",
}

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    # herd's own tiny test model (herd.fixtures.tiny: its 1024-token vocabulary, built with its tokenizer)
    "tiny": tuple(MODEL_SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads")),
    "small": (256, 688, 4, 4, 4),
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-13b": (5120, 13824, 40, 40, 40),
}


class StepTimer(TrainerCallback):
    """Wall time and non-padding tokens of each optimizer step (device synchronized at the edges)."""

    def __init__(self, device: str) -> None:
        self.device, self.steps, self.first_step_at = device, [], None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started, self.tokens_before = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at, self.first_step_wall = now, time.time()
        self.steps.append((now - self.started, state.num_input_tokens_seen - self.tokens_before))


def build_model(shape: str, path: Path, vocab: int) -> None:
    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def write_config(shape: str, path: Path, vocab: int) -> None:
    """The shape's config.json alone, for --random-init (herd.random_init draws the weights on the device)."""
    hidden, inter, layers, heads, kv = SHAPES[shape]
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, bos_token_id=1,
                eos_token_id=2, pad_token_id=0).save_pretrained(path)


def random_init_base(model_dir: Path, device: str, dtype: torch.dtype, attn: str = "sdpa"):
    """The NF4 base of model_dir's config.json drawn by herd's random-init builder (seed 0): both sides of a
    --random-init benchmark get the same weights without a model on disk."""
    from herd.config.train import ModelConfig, PeftConfig
    from herd.modeling import load_base_model

    model_cfg = ModelConfig(name="bench", path=str(model_dir), attn_implementation=attn, random_init=True)
    return load_base_model(model_cfg, PeftConfig(), "cuda:0" if device == "cuda" else "cpu", dtype,
                           str(model_dir))


def conversations(n: int) -> list[list[dict]]:
    return [guanaco_to_messages(row["text"]) for row in generate_guanaco_rows(n, seed=1)]


def herd_trainer(model_dir: Path, convs, output_dir: str, args, callbacks, tokenizer, one_row: bool = False,
                 checkpointing: bool = True, trl_head: bool = False, workers: int = 0):
    """herd's own path: herd.data tokenization with assistant-only labels, herd.modeling loading,
    train.recipe's trainer arguments and trainer, packing on."""
    from datasets import Dataset

    from herd.config.train import DataConfig, ModelConfig, PeftConfig, StrategyConfig, TrainConfig, TrainJob
    from herd.data import tokenize_conversations
    from herd.modeling import add_lora, load_base_model
    from herd.training.strategy import setup_for
    from train.recipe import build_trainer, training_arguments

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    job = TrainJob(
        model=ModelConfig(name=args.shape, path=str(model_dir), attn_implementation=args.attn,
                          random_init=args.random_init),
        data=DataConfig(name="bench", path="-", max_seq_len=args.seq_len),
        peft=PeftConfig(),
        train=TrainConfig(max_steps=args.warmup + args.steps, micro_batch_size=args.micro_batch,
                          global_batch_size=args.micro_batch, logging_steps=1, save_steps=10**6,
                          optimizer="paged_adamw_32bit" if device == "cuda" else "adamw_torch",
                          packing=not args.no_packing, gradient_checkpointing=checkpointing,
                          dataloader_num_workers=workers),
        strategy=StrategyConfig(), output_dir=output_dir,
    )
    decided = setup_for(job, device, dtype, local_rank=0)  # strategy=single in this one process
    samples = [s for s in tokenize_conversations(convs, tokenizer, True) if len(s["input_ids"]) <= args.seq_len]
    training_args = training_arguments(job, Path(output_dir), dtype, 1, has_eval=False,
                                       gradient_checkpointing=checkpointing, strategy_setup=decided)
    training_args.disable_tqdm = True
    torch.manual_seed(0)
    model = load_base_model(job.model, job.peft, decided.placement, dtype, str(model_dir))
    model = add_lora(model, job.peft, checkpointing)
    # "herd-one-row" keeps TRL's flattened row, "herd-trl-head" TRL's fused LM head, for comparison.
    return build_trainer(model, training_args, Dataset.from_list(samples), None, tokenizer, callbacks, decided,
                         args.attn, row_per_bin=not one_row, herd_head=not trl_head)


def what_ran(trainer) -> dict:
    """What a side really trained with, read back from its trainer: a side's name says what it meant to."""
    from herd.lm_head import head_that_ran
    from herd.packing import packed_layout

    return {
        "lm_head": head_that_ran(trainer.model),
        "packing": packed_layout(trainer) or "none (padded)",
        "gradient_checkpointing": bool(trainer.args.activation_checkpointing),
        "dataloader_workers": trainer.args.dataloader_num_workers,
    }


def measure(side: str, args, model_dir: Path, convs, tokenizer) -> dict:
    timer = StepTimer(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        if side == "baseline":
            texts = [format_llama2(c).text for c in convs]
            base = None
            if args.random_init:
                base = random_init_base(model_dir, args.device,
                                        torch.bfloat16 if args.device == "cuda" else torch.float32)
            trainer = build_baseline_trainer(str(model_dir), texts, output_dir, steps=args.warmup + args.steps,
                                             micro_batch=args.micro_batch, max_length=args.seq_len,
                                             device=args.device, callbacks=[timer], tokenizer=tokenizer,
                                             model=base)
        else:
            trainer = herd_trainer(model_dir, convs, output_dir, args, [timer], tokenizer,
                                   one_row=side == "herd-one-row",
                                   checkpointing=side != "herd-no-checkpointing",
                                   trl_head=side == "herd-trl-head",
                                   workers=2 if side == "herd-2-workers" else 0)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        ran = what_ran(trainer)
        n_base, n_lora = count_parameters(trainer.model)
        peak_allocated = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
        peak_reserved = torch.cuda.max_memory_reserved() if args.device == "cuda" else None
        del trainer
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    measured = timer.steps[args.warmup:]
    seconds = sum(t for t, _ in measured)
    tokens = sum(n for _, n in measured)
    hidden, _, layers, _, _ = SHAPES[args.shape]
    peak = device_peak_flops() if args.device == "cuda" else None
    tokens_per_s = tokens / seconds
    result = {
        "side": side, "steps_measured": len(measured), "step_time_s": seconds / len(measured),
        "non_padding_tokens_per_s": tokens_per_s, "tokens_per_step": tokens / len(measured),
        "time_to_first_step_s": timer.first_step_at - started,  # from this side's setup, imports done
        "first_step_wall_clock": timer.first_step_wall,
        "n_base": n_base, "n_lora": n_lora, **ran,
        "peak_allocated_gb": peak_allocated / 2**30 if peak_allocated else None,
        "peak_reserved_gb": peak_reserved / 2**30 if peak_reserved else None,
    }
    if peak:
        result["mfu"] = tokens_per_s * flops_per_token(n_base, n_lora, layers, hidden, args.seq_len) / peak
    if args.device == "cpu":
        import resource

        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result), flush=True)
    return result


def add_side_arguments(parser: argparse.ArgumentParser) -> None:
    """--rounds, and the hidden arguments run_sides gives the process that measures one side."""
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all sides, order alternating")
    parser.add_argument("--one-side", help=argparse.SUPPRESS)
    parser.add_argument("--one-side-result", help=argparse.SUPPRESS)


def run_sides(args, sides: list[str], measure_one, script: str) -> list[dict] | None:
    """Every side in its own process (measure_in_own_process), `args.rounds` rounds alternating the order.
    In such a child (--one-side) it measures that one side, writes the result for its parent, and returns
    None."""
    if args.one_side:
        Path(args.one_side_result).write_text(json.dumps(measure_one(args.one_side)))
        return None
    return [{"round": round_index, **measure_in_own_process(side, script)}
            for round_index in range(args.rounds)
            for side in (sides if round_index % 2 == 0 else sides[::-1])]


def measure_in_own_process(side: str, script: str = __file__) -> dict:
    """Each side in a fresh process (`script` run again with --one-side): its own peak RSS and allocator
    state, and the time from the command (interpreter start, imports, loading) to its first finished step."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        launched = time.time()
        subprocess.run([sys.executable, script, *sys.argv[1:], "--one-side", side,
                        "--one-side-result", result.name], check=True)
        measured = json.loads(Path(result.name).read_text())
    if "first_step_wall_clock" in measured:
        measured["command_to_first_step_s"] = measured.pop("first_step_wall_clock") - launched
    return measured


def bench_model(shape: str, model_dir: str | None = None, random_init: bool = False):
    """herd's tiny tokenizer and the model directory of `shape` (a random-init Llama, built once; with
    random_init its config.json alone, the weights drawn on the device by each side)."""
    from transformers import AutoTokenizer

    tokenizer_dir = ensure_tiny_model(Path(tempfile.gettempdir()) / "herd-bench-tiny")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if random_init and shape != "tiny":
        path = Path(model_dir or Path(tempfile.gettempdir()) / f"herd-bench-{shape}-config")
        if not (path / "config.json").exists():
            write_config(shape, path, vocab=32000)
        return tokenizer, path
    default = tokenizer_dir if shape == "tiny" else Path(tempfile.gettempdir()) / f"herd-bench-{shape}"
    path = Path(model_dir or default)
    if not (path / "config.json").exists():
        built = time.perf_counter()
        build_model(shape, path, vocab=32000)
        print(f"built random {shape} in {time.perf_counter() - built:.0f} s", flush=True)
    return tokenizer, path


def write_report(args, results: list[dict], **extra) -> None:
    """The results file: date, device, settings and versions with the measured results."""
    import importlib.metadata as md

    report = {
        "date": datetime.now(UTC).isoformat(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("one_side")},
        "versions": {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
        **extra,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--attn", default="sdpa", help="herd's attention: sdpa | flex_attention | eager")
    parser.add_argument("--random-init", action="store_true",
                        help="draw the weights on the device with herd's random-init builder (model.random_init): "
                             "no model on disk (a 7B in bf16 is 13 GB to write and read back per side)")
    parser.add_argument("--sides", default="baseline,herd", help="comma-separated: " + "; ".join(
        f"{side} ({meaning})" for side, meaning in SIDES.items()))
    parser.add_argument("--out", required=True)
    add_side_arguments(parser)
    args = parser.parse_args()
    unknown = [side for side in args.sides.split(",") if side not in SIDES]
    if unknown:
        sys.exit(f"bench_train: unknown side {unknown[0]!r} in --sides; allowed: {', '.join(SIDES)}")

    tokenizer, model_dir = bench_model(args.shape, args.model_dir, args.random_init)
    convs = conversations(args.conversations)

    results = run_sides(args, args.sides.split(","),
                        lambda side: measure(side, args, model_dir, convs, tokenizer), __file__)
    if results is not None:
        write_report(args, results, tokenizer_note="herd's tiny tokenizer (1024 tokens) over the model's 32000-token"
                     " embedding: sequence lengths come from herd's generated guanaco-style conversations")


if __name__ == "__main__":
    main()
