"""Tokenization throughput: herd's pipeline against what the plain TRL script does, same rows, one run.

herd: conversations parsed, formatted once, tokenized in batches of 1000 by the fast tokenizer, with
assistant-only labels from character offsets (herd.data.tokenize_conversations).
baseline: TRL SFTTrainer's own preparation of a "text" column (its dataset.map tokenization, labels and
truncation), as the plain script triggers it.

    python benchmarks/bench_tokenize.py --rows 10000 --out benchmarks/results/cpu_tokenize.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets import Dataset, disable_caching
from transformers import AutoTokenizer

from herd.chat_format import format_llama2, guanaco_to_messages
from herd.data import tokenize_conversations
from herd.fixtures.sample_data import generate_guanaco_rows
from herd.fixtures.tiny import ensure_tiny_model


def herd_side(rows, tokenizer) -> int:
    conversations = [guanaco_to_messages(row["text"]) for row in rows]
    tokens = 0
    for start in range(0, len(conversations), 1000):
        for sample in tokenize_conversations(conversations[start:start + 1000], tokenizer, True):
            tokens += len(sample["input_ids"])
    return tokens


def baseline_side(rows, tokenizer, model_dir) -> int:
    """TRL's dataset preparation, run the way SFTTrainer runs it for a text column."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    texts = [format_llama2(guanaco_to_messages(row["text"])).text for row in rows]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=2048, use_cpu=True, bf16=False, report_to="none",
                         dataset_text_field="text", max_steps=1)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        started = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                             processing_class=tokenizer)
        baseline_side.seconds = time.perf_counter() - started
        return sum(len(ids) for ids in trainer.train_dataset["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    disable_caching()  # every round tokenizes for real
    model_dir = ensure_tiny_model(Path(tempfile.gettempdir()) / "herd-bench-tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = generate_guanaco_rows(args.rows, seed=2)
    results = []
    for round_index in range(args.rounds):
        for side in (("herd", "baseline") if round_index % 2 == 0 else ("baseline", "herd")):
            started = time.perf_counter()
            tokens = herd_side(rows, tokenizer) if side == "herd" else baseline_side(rows, tokenizer, model_dir)
            seconds = time.perf_counter() - started if side == "herd" else baseline_side.seconds
            results.append({"round": round_index, "side": side, "rows": len(rows), "tokens": tokens,
                            "seconds": seconds, "rows_per_s": len(rows) / seconds})
            print(json.dumps(results[-1]), flush=True)
    report = {"date": datetime.now(UTC).isoformat(), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
