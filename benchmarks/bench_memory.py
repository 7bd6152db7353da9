"""Planner calibration: predicted against measured peak memory of real QLoRA training steps.

On a GPU: a random-init model of the shape is trained a few steps through herd's loading path; measured =
peak reserved + the CUDA context (what nvidia-smi shows). On CPU: peak RSS growth of the process for small
shapes (the planner models GPU memory, so CPU pairs are a sanity check, not a calibration).

    python benchmarks/bench_memory.py --shape llama2-7b --seq-len 2048 --micro-batch 1 --out results/m.json
    python benchmarks/bench_memory.py --shape small --device cpu --seq-len 512 --micro-batch 2 --out ...
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import SHAPES, build_model

from herd.config.train import ModelConfig, PeftConfig
from herd.memory import CUDA_CONTEXT, GB, estimate, load_model_shape
from herd.modeling import add_lora, load_base_model


def measure(model_dir: Path, device: str, seq_len: int, micro_batch: int, steps: int,
            checkpointing: bool) -> int:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peft_cfg = PeftConfig()
    model = load_base_model(ModelConfig(name="m", path=str(model_dir)), peft_cfg,
                            "cuda:0" if device == "cuda" else "cpu", dtype, str(model_dir))
    model = add_lora(model, peft_cfg, checkpointing)
    for parameter in model.parameters():  # fp32 LoRA weights, as train.recipe keeps them
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 1000, (micro_batch, seq_len), device=model.device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        return torch.cuda.max_memory_reserved() + CUDA_CONTEXT
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model_dir = Path(tempfile.gettempdir()) / f"herd-bench-{args.shape}"
    if not (model_dir / "config.json").exists():
        build_model(args.shape, model_dir, vocab=32000)
    checkpointing = not args.no_checkpointing
    measured = measure(model_dir, args.device, args.seq_len, args.micro_batch, args.steps, checkpointing)
    predicted = estimate(load_model_shape(str(model_dir)), seq_len=args.seq_len, micro_batch=args.micro_batch,
                         gradient_checkpointing=checkpointing).total_per_gpu_bytes
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (peak RSS growth)"
    result = {"date": datetime.now(UTC).isoformat(), "device": device, "settings": vars(args),
              "predicted_gb": predicted / GB, "measured_gb": measured / GB, "ratio": predicted / measured}
    print(json.dumps(result))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
