"""QLoRA training on the tiny model end to end, the adapter reloaded by plain PEFT, the bnb CPU trap."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import FAST_TRAIN, OFFLINE_ENV, REPO, run_module


def test_training_lowers_eval_loss_and_writes_the_run(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["global_step"] == 20
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    adapter = trained_run / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer.json").exists()
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["model"]["name"] == "tiny" and config["train"]["max_steps"] == 20
    assert sorted(p.name for p in trained_run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    # transformers writes safetensors 0600; on a shared cluster the group must be able to read the outputs.
    umask = os.umask(0)
    os.umask(umask)
    for weights in (adapter / "adapter_model.safetensors", trained_run / "checkpoint-20" / "adapter_model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask, weights


RELOAD = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, adapter_dir = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I cook rice?"}],
                                    tokenize=True, return_tensors="pt")["input_ids"]
base = AutoModelForCausalLM.from_pretrained(base_dir)
with torch.no_grad():
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    after = tuned(ids).logits
print((after - before).abs().max().item())
"""


def test_adapter_loads_with_plain_peft_in_a_new_process_and_changes_output(trained_run, tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_model_dir), str(trained_run / "adapter")],
        capture_output=True, text=True, env={**OFFLINE_ENV, "PATH": "/usr/bin:/bin"}, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) > 1e-3


@pytest.fixture(scope="module")
def aligned_tiny_model(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with layer widths divisible by 32: the shapes bitsandbytes' CPU repack accepts, as
    every real Llama's are. (herd's tiny model has intermediate 176, which the repack would refuse.)"""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size = 128
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("aligned")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def gradients_after_second_step(model_dir, evaluate_between: bool) -> dict[str, torch.Tensor]:
    from herd.config.train import ModelConfig, PeftConfig
    from herd.modeling import add_lora, load_base_model

    peft_cfg = PeftConfig()
    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(name="t", path=str(model_dir)), peft_cfg, "cpu",
                                     torch.float32, str(model_dir)), peft_cfg, False)
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()
    if evaluate_between:  # what Trainer.evaluate and generate do: eval mode, no grad
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_evaluation_between_steps_leaves_gradients_unchanged(aligned_tiny_model):
    """The bitsandbytes CPU trap (PLATFORM_NOTES): on avx512_bf16 CPUs an eval forward repacks 4-bit
    weights and later gradients go silently wrong. herd turns the repack off at load time."""
    import bitsandbytes as bnb

    from herd.config.train import ModelConfig, PeftConfig
    from herd.modeling import load_base_model

    model = load_base_model(ModelConfig(name="t", path=str(aligned_tiny_model)), PeftConfig(), "cpu",
                            torch.float32, str(aligned_tiny_model))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)

    evaluated = gradients_after_second_step(aligned_tiny_model, evaluate_between=True)
    twin = gradients_after_second_step(aligned_tiny_model, evaluate_between=False)
    assert evaluated.keys() == twin.keys() and len(evaluated) > 0
    for name in twin:
        torch.testing.assert_close(evaluated[name], twin[name], rtol=0, atol=0, msg=name)


def test_each_job_of_a_sweep_trains_in_its_own_run_directory(tmp_path):
    """`-m` sweeps: <output_dir>/<job number> per job (as herd.slurm's job arrays), or runs/sweep-<id>/<n>.
    All jobs once shared one run directory, and every job after the first found it finished and did nothing."""
    sweep = tmp_path / "lr-sweep"
    quick = [*FAST_TRAIN, "train.max_steps=1", "train.eval_steps=100", "data.max_samples=16"]
    run_module("train", "-m", *quick, "train.learning_rate=1e-3,2e-3", f"output_dir={sweep}")
    for job, learning_rate in enumerate([1e-3, 2e-3]):
        run_dir = sweep / str(job)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["learning_rate"] == learning_rate and config["output_dir"] == str(run_dir)
        assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (sweep / "multirun.yaml").exists()  # Hydra's record of the sweep, next to its jobs

    run_module("train", "-m", *quick, cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})  # no output_dir
    [default_sweep] = (tmp_path / "runs").iterdir()
    assert default_sweep.name.startswith("sweep-") and (default_sweep / "0" / "metrics.json").exists()
    assert not (tmp_path / "multirun").exists()  # Hydra's own default sweep dir is not used
