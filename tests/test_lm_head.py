"""herd's CPU loss head (herd.lm_head) computes what TRL's fused LM head computes: the same per-token
log-probabilities, entropy and top-1 flags, the same loss and the same gradients."""

import json
from operator import itemgetter

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.kernels import ChunkedLogProbFunction

from herd import lm_head
from herd.config.train import ModelConfig, PeftConfig, Quant
from herd.data import tokenize_conversations
from herd.fixtures.sample_data import generate_conversations
from herd.inference import token_loss_sum
from herd.modeling import add_lora, load_base_model
from tests.conftest import FAST_TRAIN, run_module


def test_labelled_log_probs_match_trls_kernel_across_chunks():
    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 2 * lm_head.TOKENS_PER_CHUNK + 300, 32, 1000
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[:50] = (hidden[:50] @ weight.t()).argmax(-1)  # some targets are the top-1 token
    upstream = torch.randn(tokens, generator=generator)  # any weighting of the tokens, not just a mean

    def run(fn, *args):
        leaf = hidden.clone().requires_grad_()
        log_probs, entropy, is_top1 = fn(leaf, *args)
        (log_probs * upstream).sum().backward()
        return log_probs.detach(), entropy, is_top1, leaf.grad

    ours = run(lm_head.LabelledLogProbs.apply, weight, targets)
    trls = run(lambda h: itemgetter(0, 1, 4)(ChunkedLogProbFunction.apply(
        h, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy", "is_top1"))))
    torch.testing.assert_close(ours[0], trls[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours[1], trls[1], rtol=1e-5, atol=1e-4)
    assert torch.equal(ours[2], trls[2]) and ours[2][:50].all() and not ours[2][50:].all()
    # Gradients are O(1); summing 1000 vocabulary terms in another order moves a cancelling element by a few
    # 1e-6 on some CPUs' kernels (seen on this machine's Xeon: 2.1e-6 on 2 of 75,136 elements).
    torch.testing.assert_close(ours[3], trls[3], rtol=1e-4, atol=1e-5)


def test_labelled_log_probs_without_gradient_and_without_tokens():
    weight = torch.randn(50, 8)
    hidden = torch.randn(5, 8)
    with torch.no_grad():
        log_probs, _, _ = lm_head.LabelledLogProbs.apply(hidden, weight, torch.arange(5))
        without_metrics = lm_head.LabelledLogProbs.apply(hidden, weight, torch.arange(5), False)
    assert log_probs.shape == (5,) and (log_probs < 0).all()
    assert torch.equal(without_metrics[0], log_probs) and not without_metrics[1].any() and not without_metrics[2].any()
    empty = torch.zeros(0, 8, requires_grad=True)
    log_probs, entropy, is_top1 = lm_head.LabelledLogProbs.apply(empty, weight, torch.zeros(0, dtype=torch.long))
    log_probs.sum().backward()
    assert log_probs.shape == entropy.shape == is_top1.shape == (0,) and empty.grad.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_labelled_log_probs_under_cpu_autocast(dtype):
    """precision=bf16 on CPU trains under autocast: the head projects in its own dtype, takes the softmax in
    fp32, and the gradient comes back in the hidden states' dtype."""
    hidden = torch.randn(7, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, _, _ = lm_head.LabelledLogProbs.apply(hidden, weight, torch.arange(7))
    log_probs.sum().backward()
    logits = (hidden.detach().to(torch.bfloat16) @ weight.t()).float()
    reference = torch.log_softmax(logits, -1)[torch.arange(7), torch.arange(7)]
    assert log_probs.dtype == torch.float32 and hidden.grad.dtype == dtype
    torch.testing.assert_close(log_probs, reference, rtol=1e-5, atol=1e-5)


def lora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path) -> SFTTrainer:
    peft_cfg = PeftConfig(quant=Quant.none)
    model_cfg = ModelConfig(name="tiny", path=str(tiny_model_dir))
    torch.manual_seed(0)
    model = add_lora(load_base_model(model_cfg, peft_cfg, "cpu", torch.float32, str(tiny_model_dir)),
                     peft_cfg, gradient_checkpointing=False)
    samples = tokenize_conversations(generate_conversations(8, seed=5), tiny_tokenizer, True)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, report_to="none",
                     max_length=512)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(samples),
                      processing_class=tiny_tokenizer)


def loss_and_gradients(trainer, batch, num_items_in_batch):
    trainer.model.zero_grad()
    torch.manual_seed(0)  # the same LoRA dropout masks in both passes
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {key: values[-1] for key, values in trainer._metrics["train"].items()
                                  if key in ("entropy", "mean_token_accuracy")}


# None: the loss is this batch's mean; a count: gradient accumulation, where the trainer passes the labelled
# tokens of all micro batches of the step
@pytest.mark.parametrize("num_items_in_batch", [None, 1000])
def test_trainer_loss_gradients_and_metrics_equal_trls_head(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                            num_items_in_batch):
    trainer = lora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts and padding ignored
    reference = loss_and_gradients(trainer, batch, num_items_in_batch)
    calls = []
    real_apply = lm_head.LabelledLogProbs.apply
    assert lm_head.score_labelled_positions_on_cpu(trainer)
    lm_head.LabelledLogProbs.apply = lambda *args: calls.append(args[0].shape) or real_apply(*args)
    try:
        ours = loss_and_gradients(trainer, batch, num_items_in_batch)
    finally:
        lm_head.LabelledLogProbs.apply = real_apply
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert calls == [torch.Size([labelled, trainer.model.config.hidden_size])]  # only labelled positions
    assert lm_head.scored_batches(trainer.model) == 1
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == reference[1].keys() and len(ours[1]) > 0
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], rtol=1e-4, atol=1e-7, 
                                   msg=lambda message, name=name: f"{name}: {message}")
    assert ours[2] == pytest.approx(reference[2], rel=1e-5)


def test_head_that_trains_or_transforms_logits_stays_trls(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = lora_trainer(tiny_model_dir, tiny_tokenizer, tmp_path)
    base = trainer.model.get_base_model()
    base.config.final_logit_softcapping = 30.0
    assert not lm_head.score_labelled_positions_on_cpu(trainer)
    # evaluation then takes the model's own logits
    trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    spy = []
    real = lm_head.full_logits_loss_sum
    lm_head.full_logits_loss_sum = lambda *args: spy.append(1) or real(*args)
    try:
        summed = lm_head.labelled_loss_sum(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    finally:
        lm_head.full_logits_loss_sum = real
    assert spy and summed == real(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    base.config.final_logit_softcapping = None
    base.get_output_embeddings().weight.requires_grad_(True)
    assert not lm_head.score_labelled_positions_on_cpu(trainer)


@pytest.mark.parametrize("quant", [Quant.nf4, Quant.none])
def test_evaluation_loss_sum_equals_the_full_logits_one(tiny_model_dir, tiny_tokenizer, quant):
    """herd.inference scores eval loss through herd's head; the plain way (full logits, cross-entropy over
    them) must give the same sum, with a LoRA adapter that changes the output and padded rows."""
    peft_cfg = PeftConfig(quant=quant)
    model_cfg = ModelConfig(name="tiny", path=str(tiny_model_dir))
    torch.manual_seed(0)
    model = add_lora(load_base_model(model_cfg, peft_cfg, "cpu", torch.float32, str(tiny_model_dir)),
                     peft_cfg, gradient_checkpointing=False).eval()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    samples = tokenize_conversations(generate_conversations(5, seed=9), tiny_tokenizer, True)
    assert len({len(s["input_ids"]) for s in samples}) > 1  # rows of unequal length: padding is ignored
    loss_sum, tokens = token_loss_sum(model, samples, tiny_tokenizer.pad_token_id, "cpu")
    reference_sum, reference_tokens = 0.0, 0
    with torch.no_grad():
        for sample in samples:  # one unpadded row at a time, through the model's own logits
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(sample["labels"][1:])
            reference_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            reference_tokens += int((targets != -100).sum())
    assert tokens == reference_tokens > 0
    assert loss_sum == pytest.approx(reference_sum, rel=1e-5)
    with model.disable_adapter():  # the adapter really took part in herd's sum
        assert token_loss_sum(model, samples, tiny_tokenizer.pad_token_id, "cpu")[0] != pytest.approx(loss_sum)


def test_cpu_training_run_records_herds_head(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["lm_head"] == "herd: labelled positions, CPU"


def test_bf16_training_on_cpu(tmp_path, tiny_model_dir):
    """CPU sibling of tests/test_gpu.py's bf16 run: precision=bf16 on CPU trains under autocast, herd's head
    included."""
    run_dir = tmp_path / "run"
    run_module("train", *FAST_TRAIN, "train.precision=bf16", "train.max_steps=3", "train.eval_steps=100", "train.logging_steps=1",
               f"output_dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["lm_head"] == "herd: labelled positions, CPU" and metrics["global_step"] == 3
    assert 0 < metrics["final_train_loss"] < 20
