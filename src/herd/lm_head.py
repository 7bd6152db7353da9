"""The loss head: only labelled positions, a chunk of tokens at a time, never the whole logits.

Training on CPU, and evaluation (herd.inference) everywhere.

TRL's SFTTrainer scores the loss with a fused LM head (`model(..., fused_lm_head=True)`) that never holds
the (tokens x vocab) logits. On CUDA it projects only the labelled positions, with Triton kernels. On CPU it
projects every position (prompt and padding included), folds each tile with about ten elementwise torch
passes and re-runs the projection in backward: measured 2.8x slower than a plain linear + cross-entropy
for Llama-2's 32000-token head, on a model shape where the head is 70% of a training step
(benchmarks/README.md).

With a frozen head (QLoRA), a token's log-probability depends only on its own hidden state, so its
gradient, (onehot - softmax) @ W, can be computed during the forward pass, a chunk of tokens at a time,
and scaled by the incoming gradient in backward: one projection and one gradient product per token, for
the labelled positions only, and at most one (chunk x vocab) buffer alive. Everywhere else (CUDA, a
trainable head, scaled or soft-capped logits, MoE) TRL's own head runs unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

TOKENS_PER_CHUNK = 1024
# Config attributes TRL applies to the logits before the softmax; herd's head handles plain logits only.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling", "output_router_logits")


class LabelledLogProbs(torch.autograd.Function):
    """log p(target) for each row of `hidden` under `hidden @ weight.T`, with the entropy and whether the
    target is the first argmax (both for metrics, no gradient; zeros when `metrics` is False, which saves
    two passes over each chunk's logits). The weight gets no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, metrics: bool = True):
        n = hidden.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(log_probs)
        is_top1 = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        wants_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if wants_grad else None
        # The projection in the head's own dtype (as the model's logits are), the softmax over the vocabulary in
        # fp32; autocast (precision=bf16 on CPU) is off so that these dtypes hold.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, TOKENS_PER_CHUNK):
                end = min(start + TOKENS_PER_CHUNK, n)
                rows = torch.arange(end - start, device=hidden.device)
                target = targets[start:end]
                logits = (hidden[start:end].to(weight.dtype) @ weight.t()).float()
                if metrics:
                    is_top1[start:end] = logits.argmax(-1) == target
                log_z = torch.logsumexp(logits, -1)
                log_probs[start:end] = logits[rows, target] - log_z
                if not (metrics or wants_grad):
                    continue
                probs = logits.sub_(log_z[:, None]).exp_()  # in place: one (chunk x vocab) buffer
                if metrics:
                    entropy[start:end] = -torch.special.xlogy(probs, probs).sum(-1)
                if wants_grad:
                    probs[rows, target] -= 1  # softmax - onehot = -d log p(target) / d logits
                    grad_hidden[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *unused):
        (grad_hidden,) = ctx.saved_tensors
        # grad_hidden holds -d log p / d hidden (see the sign above)
        return (-grad_hidden * grad_log_probs[:, None]).to(ctx.hidden_dtype), None, None, None


def score_next_tokens(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, metrics: bool):
    """LabelledLogProbs for each position's next token (`labels` shifted by one), labelled positions only,
    on the head's device; and the (batch, seq - 1) mask of those positions."""
    targets = labels[:, 1:].to(weight.device)
    mask = targets != -100
    return LabelledLogProbs.apply(hidden[:, :-1].to(weight.device)[mask], weight, targets[mask], metrics), mask


def plain_head(model) -> bool:
    """Whether the model's logits are just hidden @ W.T through an unquantized, bias-free head (what herd's
    head computes): no softcapping, scaling or MoE router loss on top."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    return (head is not None and head.bias is None
            and head.weight.is_floating_point()  # a quantized head projects only through its own forward
            and all(getattr(config, name, None) in (None, False) for name in LOGIT_TRANSFORMS))


def applies(model) -> bool:
    """Whether herd's head can stand in for TRL's in training: a plain head that does not train (checked
    again on every call for the device: the model may move after the trainer is built)."""
    return plain_head(model) and not model.get_output_embeddings().weight.requires_grad


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_labelled_positions_on_cpu(trainer) -> bool:
    """Put herd's head in front of the fused LM head TRL's SFTTrainer installed on the trainer's model.
    Returns whether it applies to this model (on CPU it then runs; elsewhere TRL's head does)."""
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    model = causal_lm(trainer.model)
    if not applies(model):
        return False
    trl_forward = model.forward  # TRL's fused forward, bound to the model

    @functools.wraps(trl_forward)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = model.get_output_embeddings()
        if not fused_lm_head or shift_labels is not None or head.weight.device.type != "cpu":
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        forward.scored_batches += 1
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        weight = head.weight.full_tensor() if isinstance(head.weight, DTensor) else head.weight
        with maybe_gather_lm_head_ctx(head.weight):  # ZeRO-3: the head is partitioned outside its forward
            scored, mask = score_next_tokens(hidden, labels, weight, metrics=True)
        # masked_scatter keeps an all-ignored batch connected to the graph: a zero loss that still backpropagates
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in scored)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    forward.scored_batches = 0
    model.forward = forward
    return True


def scored_batches(model) -> int:
    """How many batches herd's head scored on `model` (the model given to the trainer) in this process;
    0: TRL's head ran, or nothing yet."""
    return getattr(causal_lm(model).forward, "scored_batches", 0)


def head_that_ran(model) -> str:
    """Which head scored the training loss of `model`, as run records name it."""
    return "herd: labelled positions, CPU" if scored_batches(model) else "TRL fused"


@torch.no_grad()
def labelled_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> tuple[float, int]:
    """Sum of the next-token negative log-likelihood over the labelled positions, and their count. Only
    those positions go through the head, TOKENS_PER_CHUNK at a time (softmax in fp32): evaluation never holds a
    batch's (tokens x vocab) logits (8 x 2048 tokens on Llama-2: 8 x 2048 x 32000 x (2 + 4 + 4) bytes, ~5 GB
    for the logits in bf16, in fp32 and their log-softmax)."""
    lm = causal_lm(model)  # PEFT injects LoRA into the layers: the backbone runs with the adapter
    if not plain_head(lm):
        return full_logits_loss_sum(model, input_ids, attention_mask, labels)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    (log_probs, _, _), mask = score_next_tokens(hidden, labels, lm.get_output_embeddings().weight, metrics=False)
    return -log_probs.double().sum().item(), int(mask.sum())


@torch.no_grad()
def full_logits_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[float, int]:
    """The same sum through the model's own full logits: for heads herd's cannot stand in for (and the
    plain alternative the benchmark compares against)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss.item(), int((targets != -100).sum())
