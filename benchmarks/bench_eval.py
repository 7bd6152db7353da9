"""Evaluation loss: herd's labelled-positions head (herd.inference.token_loss_sum) against the plain way
(the model's full logits, cast to fp32, cross-entropy), same model, same batches, each side in its own
process. Reported per side: seconds, peak memory growth during scoring (GPU: peak allocated; CPU: peak
RSS), the loss (both must agree).

    python benchmarks/bench_eval.py --shape small --device cpu --seq-len 1024 --out results/eval.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import SHAPES, add_side_arguments, bench_model, conversations, run_sides, write_report

from herd.config.train import ModelConfig, PeftConfig
from herd.data import tokenize_conversations
from herd.inference import plan_batches, right_padded, token_loss_sum
from herd.lm_head import full_logits_loss_sum
from herd.modeling import add_lora, load_base_model


def full_logits(model, samples: list[dict], pad_id: int, device: str) -> tuple[float, int]:
    """The plain way, as herd did before herd.lm_head: the whole (batch x seq x vocab) logits."""
    ids, mask, labels = right_padded(samples, pad_id)
    return full_logits_loss_sum(model, ids.to(device), mask.to(device), labels)


def rows(tokenizer, seq_len: int, count: int) -> list[dict]:
    """Eval rows of about seq_len tokens: consecutive generated conversations joined, as a long chat is."""
    samples = tokenize_conversations(conversations(count * 8), tokenizer, True)
    joined, current = [], {"input_ids": [], "labels": []}
    for sample in samples:
        if len(current["input_ids"]) + len(sample["input_ids"]) > seq_len:
            joined.append(current)
            current = {"input_ids": [], "labels": []}
        current = {key: current[key] + sample[key] for key in current}
    return joined[:count]


def proc_status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024  # kB


def measure(side: str, args, model_dir: Path, tokenizer) -> dict:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peft_cfg = PeftConfig()
    model = load_base_model(ModelConfig(name=args.shape, path=str(model_dir)), peft_cfg,
                            "cuda:0" if device == "cuda" else "cpu", dtype, str(model_dir))
    model = add_lora(model, peft_cfg, gradient_checkpointing=False).eval()
    samples = rows(tokenizer, args.seq_len, args.rows)
    score = token_loss_sum if side == "herd" else full_logits
    score(model, samples[:1], tokenizer.pad_token_id, device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # Linux: reset the peak RSS to the current RSS, so loading's own peak does not hide the scoring's
        Path("/proc/self/clear_refs").write_text("5")
        before = proc_status_bytes("VmRSS")
    started = time.perf_counter()
    loss_sum, tokens = 0.0, 0
    for batch in plan_batches([len(s["input_ids"]) for s in samples], args.batch_size):
        batch_loss, batch_tokens = score(model, [samples[i] for i in batch], tokenizer.pad_token_id, device)
        loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    if device == "cuda":
        torch.cuda.synchronize()
        peak_growth = torch.cuda.max_memory_allocated() - before
    else:
        peak_growth = proc_status_bytes("VmHWM") - before
    return {"side": side, "seconds": time.perf_counter() - started, "loss": loss_sum / tokens,
            "labelled_tokens": tokens, "rows": len(samples),
            "peak_memory_growth_gb": peak_growth / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True)
    add_side_arguments(parser)
    parser.set_defaults(rounds=2)
    args = parser.parse_args()

    tokenizer, model_dir = bench_model(args.shape)
    results = run_sides(args, ["full-logits", "herd"], lambda side: measure(side, args, model_dir, tokenizer),
                        __file__)
    if results is not None:
        write_report(args, results)


if __name__ == "__main__":
    main()
