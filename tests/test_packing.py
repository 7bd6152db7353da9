"""Padding-free packing (train.packing) computes the same loss as padded batches: the position ids keep
each conversation's attention to itself."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from herd.config import ModelConfig, PeftConfig, Quant
from herd.data import tokenize_conversations
from herd.modeling import add_lora, load_base_model
from herd.sample_data import generate_conversations


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
    with torch.no_grad():  # eval mode, no gradient checkpointing: the case where a cache would be built
        torch.testing.assert_close(mean_loss(model, packed), mean_loss(model, padded), rtol=1e-5, atol=1e-6)
