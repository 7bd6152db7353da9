"""How packed conversations reach the model (train.packing).

TRL's BFD packing fills bins of up to max_seq_len tokens and then flattens the whole micro batch into ONE
row (padding-free). That row is what flash attention's varlen kernel wants, but sdpa and eager attention
evaluate its block-diagonal mask densely: a micro batch of b bins of L tokens costs (b*L)^2 attention
instead of b*L^2 (measured on H100: sdpa got slower per token from micro batch 4 to 8). For those
implementations herd keeps each bin in its own row; position ids that restart at every conversation still
keep conversations apart (transformers builds a per-row block-diagonal mask from them when there is no
attention mask), and the few pad tokens at a row's end form their own blocks with no loss.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

# Kept as TRL's one flattened row: flash attention's varlen kernels need it (transformers detects packing
# for them at batch size 1 only); flex_attention skips masked blocks either way and was measured so.
ONE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """One row per packed bin, padded to the longest bin of the batch, with per-conversation position ids
    and no attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        super().__init__(pad_token_id=pad_token_id, padding_free=False, return_position_ids=True)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        # An attention mask would make transformers ignore the position ids, and with them the boundaries.
        del batch["attention_mask"]
        # The first token of a conversation must not be a target of the previous conversation's last token.
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


class PackedRowsTokenCount(TrainerCallback):
    """TRL counts a batch without attention mask as one row (`position_ids.size(1)`): with a row per bin its
    logged `num_tokens` would be one bin's share. The trainer's own count of non-padding tokens (all
    ranks) is the right one; it replaces TRL's before anything prints or records the logs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("num_tokens", "eval_num_tokens"):
            if logs is not None and key in logs:
                logs[key] = state.num_input_tokens_seen


def keeps_bins_in_rows(attn_implementation: str) -> bool:
    return attn_implementation not in ONE_ROW_ATTENTION


def collate_packed_bins_per_row(trainer, attn_implementation: str) -> None:
    """Swap TRL's one-row collator for PackedRowsCollator where the attention implementation benefits.
    TRL refuses a custom collator when packing, so it is replaced after construction, before train()
    builds its data loaders."""
    if not trainer.args.packing or not keeps_bins_in_rows(attn_implementation):
        return
    trainer.data_collator = PackedRowsCollator(pad_token_id=trainer.processing_class.pad_token_id)
    trainer.callback_handler.callbacks.insert(0, PackedRowsTokenCount())  # before the printer and trackers


def packed_layout(trainer) -> str | None:
    """How the trainer lays out packed bins, as run records name it; None when it does not pack."""
    if not trainer.args.packing:
        return None
    return "row per bin" if isinstance(trainer.data_collator, PackedRowsCollator) else "one flattened row"
