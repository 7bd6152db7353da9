"""Padding-free packing (train.packing) computes the same loss as padded batches: the position ids keep
each conversation's attention to itself."""

import json

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from herd.config.train import ModelConfig, PeftConfig, Quant
from herd.data import tokenize_conversations
from herd.fixtures.sample_data import generate_conversations
from herd.modeling import add_lora, load_base_model
from herd.packing import PackedRowsCollator, keeps_bins_in_rows
from tests.conftest import FAST_TRAIN, run_module


def mean_loss(model, batch) -> torch.Tensor:
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep])


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_loss_equals_padded_loss_on_herds_training_model(tiny_model_dir, tiny_tokenizer, attn):
    samples = tokenize_conversations(generate_conversations(6, seed=3), tiny_tokenizer, True)
    peft_cfg = PeftConfig(quant=Quant.none)
    model_cfg = ModelConfig(name="tiny", path=str(tiny_model_dir), attn_implementation=attn)
    model = add_lora(load_base_model(model_cfg, peft_cfg, "cpu", torch.float32, str(tiny_model_dir)),
                     peft_cfg, gradient_checkpointing=False).eval()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(samples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(samples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    # herd's collation for sdpa/eager: BFD-style bins of 3 conversations, one row each (rows of unequal
    # length, so the shorter row ends in padding).
    bins = [{key: [token for s in group for token in s[key]] for key in ("input_ids", "labels")}
            | {"seq_lengths": [len(s["input_ids"]) for s in group]} for group in (samples[:3], samples[3:])]
    rows = PackedRowsCollator(pad_token_id=0)(bins)
    assert rows["input_ids"].shape[0] == 2 and "attention_mask" not in rows
    assert len({len(b["input_ids"]) for b in bins}) == 2
    with torch.no_grad():  # eval mode, no gradient checkpointing: the case where a cache would be built
        reference = mean_loss(model, padded)
        torch.testing.assert_close(mean_loss(model, packed), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean_loss(model, rows), reference, rtol=1e-5, atol=1e-6)


def test_packed_bins_keep_their_own_rows_except_for_one_row_kernels():
    assert keeps_bins_in_rows("sdpa") and keeps_bins_in_rows("eager")
    assert not keeps_bins_in_rows("flash_attention_2") and not keeps_bins_in_rows("flex_attention")


def test_packed_training_run_uses_a_row_per_bin(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_module("train", *FAST_TRAIN, "train.packing=true", "train.max_steps=3", "train.eval_steps=100", "train.logging_steps=1",
               "data.max_samples=48", f"output_dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["packing"] == "row per bin" and metrics["global_step"] == 3
    assert metrics["final_train_loss"] is not None and 0 < metrics["final_train_loss"] < 20
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [event for event in logged if event["kind"] == "train"]
    assert train and all(e["train/num_tokens"] == e["train/num_input_tokens_seen"] for e in train)
