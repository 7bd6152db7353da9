"""Padding-free packing (train.packing) computes the same loss as padded batches: the position ids keep
each conversation's attention to itself."""

import itertools
import json

import pytest
import torch
from datasets import Dataset
from trl.data_utils import pack_dataset
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


def per_token_losses(model, batch) -> dict[tuple[tuple[int, ...], int], tuple[int, float]]:
    """Every target of a batch, wherever its layout put it: {(conversation's token ids, position of the target
    in its conversation): (target token id, its loss)}. A row is split into conversations where the position
    ids restart (packed) or by its attention mask (padded); the prediction of a target comes from the token
    before it in the same row, as the trainer's shifted loss does."""
    batch = dict(batch)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
                       ).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0),
                                               reduction="none")
    found = {}
    for row, ids in enumerate(batch["input_ids"].tolist()):
        if "position_ids" in batch:
            positions = batch["position_ids"][row].tolist()
        else:
            positions = list(range(int(batch["attention_mask"][row].sum()))) + [0] * (
                len(ids) - int(batch["attention_mask"][row].sum()))
        starts = [t for t, position in enumerate(positions) if position == 0] + [len(ids)]
        for start, end in itertools.pairwise(starts):
            conversation = tuple(ids[start:end])
            for t in range(start, end):
                if t > 0 and labels[row, t] != -100:
                    found[(conversation, t - start)] = (int(labels[row, t]), losses[row, t - 1].item())
    return found


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    peft_cfg = PeftConfig(quant=Quant.none)
    model_cfg = ModelConfig(name="tiny", path=str(tiny_model_dir), attn_implementation="sdpa")
    return add_lora(load_base_model(model_cfg, peft_cfg, "cpu", torch.float32, str(tiny_model_dir)),
                    peft_cfg, gradient_checkpointing=False).eval()


@pytest.mark.parametrize("assistant_only_loss", [False, True])
@pytest.mark.parametrize("layout", ["row per bin", "one flattened row"])
def test_packed_targets_and_per_token_losses_equal_padded_ones(lora_model, tiny_tokenizer, assistant_only_loss,
                                                                layout):
    """Packed exactly as training packs (TRL's BFD bins of up to max_seq_len tokens, then herd's row-per-bin
    collator or TRL's one flattened row) against plain padded rows: the same targets, each with the same
    loss. With full-sequence loss (data.assistant_only_loss=false) every token is labelled, so only the
    packing rule keeps a conversation's first token from becoming a target of the conversation before it in
    its bin (in a padded row nothing precedes it)."""
    samples = tokenize_conversations(generate_conversations(6, seed=3), tiny_tokenizer, assistant_only_loss)
    bins = list(pack_dataset(Dataset.from_list(samples), 400, "bfd"))
    assert len(bins) < len(samples) and any(len(b["seq_lengths"]) > 1 for b in bins)  # bins of several
    if layout == "row per bin":
        packed = PackedRowsCollator(pad_token_id=0)(bins)
        assert packed["input_ids"].shape[0] == len(bins)
    else:
        packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(bins)
        assert packed["input_ids"].shape[0] == 1
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(samples)
    reference, found = per_token_losses(lora_model, padded), per_token_losses(lora_model, packed)
    expected_targets = sum(len(s["input_ids"]) - 1 if not assistant_only_loss else
                           sum(label != -100 for label in s["labels"]) for s in samples)
    assert len(reference) == expected_targets
    assert sorted(found) == sorted(reference)  # the same (conversation, position) pairs are targets
    for key, (target, loss) in reference.items():
        assert found[key][0] == target
        assert found[key][1] == pytest.approx(loss, rel=1e-4, abs=1e-5)


def test_packed_bins_keep_their_own_rows_except_for_one_row_kernels():
    assert keeps_bins_in_rows("sdpa") and keeps_bins_in_rows("eager")
    assert not keeps_bins_in_rows("flash_attention_2") and not keeps_bins_in_rows("flex_attention")


def test_packed_training_run_uses_a_row_per_bin(tmp_path, tiny_model_dir):
    # with full-sequence loss: the case where packing's first-token rule matters (test above)
    run_dir = tmp_path / "run"
    run_module("train", *FAST_TRAIN, "train.packing=true", "data.assistant_only_loss=false", "train.max_steps=3",
               "train.eval_steps=100", "train.logging_steps=1", "data.max_samples=48", f"output_dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["packing"] == "row per bin" and metrics["global_step"] == 3
    assert metrics["final_train_loss"] is not None and 0 < metrics["final_train_loss"] < 20
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [event for event in logged if event["kind"] == "train"]
    assert train and all(e["train/num_tokens"] == e["train/num_input_tokens_seen"] for e in train)
