"""The comparison point: the QLoRA script a user writes by hand from the Hugging Face QLoRA blog.

TRL SFTTrainer + PEFT + bitsandbytes with default settings: a "text" column, padded batches, no packing.
Kept deliberately plain; the benchmarks run it side by side with herd on the same data and model.

    python benchmarks/baseline_sft.py MODEL_DIR DATA.jsonl OUT_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer


def build_baseline_trainer(model_dir: str, texts: list[str], output_dir: str, *, steps: int,
                           micro_batch: int = 4, max_length: int = 2048, device: str = "cuda",
                           callbacks=None, tokenizer=None, model=None) -> SFTTrainer:
    """`model`: an NF4 base already built (the benchmark's --random-init: the same 4-bit modules this
    script's from_pretrained makes, without weights on disk); None loads `model_dir` as the blog does."""
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config, dtype=dtype,
                                                     device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        max_steps=steps,
        max_length=max_length,
        bf16=cuda,
        use_cpu=not cuda,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataset_text_field="text",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                      peft_config=peft_config, processing_class=tokenizer, callbacks=callbacks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data", help="JSONL with a 'text' column")
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args()
    with open(options.data) as lines:
        rows = [json.loads(line) for line in lines]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_baseline_trainer(options.model_dir, [r["text"] for r in rows], options.output_dir,
                           steps=options.steps, device=device).train()
