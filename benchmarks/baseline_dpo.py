"""The comparison point for DPO: the QLoRA DPO script a user writes by hand from TRL's docs.

The base loaded 4-bit (BitsAndBytesConfig: NF4, double quant), prepare_model_for_kbit_training, a LoraConfig
handed to TRL's DPOTrainer as peft_config (TRL wraps the model and, the adapter being fresh, gets the reference
by switching the adapter off), pairs as prompt / chosen / rejected text that TRL tokenizes itself, TRL's
defaults otherwise (DPOConfig: gradient checkpointing on, pairs longer than max_length truncated). Kept
deliberately plain; benchmarks/bench_dpo.py runs it side by side with herd's DPO on the same pairs and model.

    python benchmarks/baseline_dpo.py MODEL_DIR PAIRS.jsonl OUT_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer


def load_4bit(model_dir: str, device: str = "cuda"):
    """The base in NF4 + double quant, ready for k-bit training (PEFT's recipe)."""
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"})
    return prepare_model_for_kbit_training(model)


def build_baseline_dpo_trainer(model_dir: str, rows: list[dict], output_dir: str, *, steps: int,
                               micro_batch: int = 2, max_length: int = 1024, beta: float = 0.1,
                               device: str = "cuda", callbacks=None, tokenizer=None, model=None) -> DPOTrainer:
    """`rows`: {"prompt", "chosen", "rejected"} text. `model`: a base from load_4bit (None loads model_dir)."""
    cuda = device == "cuda"
    model = model if model is not None else load_4bit(model_dir, device)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch,  # pairs: each is two sequences, chosen and rejected
        gradient_accumulation_steps=1,
        learning_rate=5e-5,
        max_steps=steps,
        max_length=max_length,
        beta=beta,
        bf16=cuda,
        use_cpu=not cuda,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data", help="JSONL with 'prompt', 'chosen' and 'rejected' text columns")
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args()
    with open(options.data) as lines:
        rows = [json.loads(line) for line in lines]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_baseline_dpo_trainer(options.model_dir, rows, options.output_dir, steps=options.steps,
                               device=device).train()
