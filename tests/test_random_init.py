"""model.random_init=true: a base of a real shape from its config.json alone, drawn from a seed and quantized
to 4-bit one decoder layer at a time (herd.random_init). End to end through `python -m train` it runs in
tests/test_gpu_round.py's rehearsal (stage c)."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from herd.cli import check_config
from herd.config.train import (
    DataConfig,
    ModelConfig,
    PeftConfig,
    Quant,
    Strategy,
    StrategyConfig,
    TrainConfig,
    TrainJob,
    register_train_schema,
)
from herd.errors import ConfigError
from herd.memory import KNOWN_SHAPES, ModelShape, load_model_shape
from herd.modeling import add_lora, load_base_model, model_location
from herd.random_init import LLAMA2_CONFIGS, build_random_init_model, check_random_init, known_config
from herd.training.plan import plan_job
from tests.conftest import REPO

SMALL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
         "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1024, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1,
         "eos_token_id": 2, "tie_word_embeddings": False}


def small_model_cfg(tmp_path: Path, seed: int = 0, **shape) -> ModelConfig:
    directory = tmp_path / f"shape-{seed}-{len(shape)}"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**SMALL, **shape}))
    return ModelConfig(name="small", path=str(directory), random_init=True, random_init_seed=seed)


def test_shipped_llama2_configs_are_the_planners_shapes():
    for name, config in LLAMA2_CONFIGS.items():
        assert replace(ModelShape.from_config(config), name=KNOWN_SHAPES[name].name) == KNOWN_SHAPES[name]
    assert known_config("meta-llama/Llama-2-70b-chat-hf") == LLAMA2_CONFIGS["llama2-70b"]
    assert known_config("some/other-model") is None


def test_70b_location_holds_config_and_tokenizer_but_no_weights_and_plans_as_70b():
    model_cfg = ModelConfig(name="llama2-70b", path="meta-llama/Llama-2-70b-hf", random_init=True)
    location = Path(model_location(model_cfg))
    assert location.is_relative_to(REPO / ".herd" / "models" / "random-init")
    assert (location / "config.json").is_file() and (location / "tokenizer_config.json").is_file()
    assert not [p for p in location.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    assert replace(load_model_shape(str(location)), name="Llama-2-70B") == KNOWN_SHAPES["llama2-70b"]
    # plan=true reads the same shape, so it predicts what the hub model would
    job = TrainJob(model=model_cfg, peft=PeftConfig(), data=DataConfig(name="d", path="d", max_seq_len=2048),
                   train=TrainConfig(micro_batch_size=1, global_batch_size=16), strategy=StrategyConfig(),
                   output_dir="o")
    hub = replace(job, model=ModelConfig(name="llama2-70b", path="meta-llama/Llama-2-70b-hf"))
    assert (plan_job(job, 1, str(location))[1].total_per_gpu_bytes
            == plan_job(hub, 1, hub.model.path)[1].total_per_gpu_bytes)


def test_built_one_layer_at_a_time_quantized_deterministic_and_trains(tmp_path):
    import bitsandbytes as bnb

    model_cfg = small_model_cfg(tmp_path)
    location = model_location(model_cfg)
    seen = []

    def on_module(name, model):
        """After each piece: every layer so far holds 4-bit weights only, every later one is still on meta."""
        seen.append(name)
        built = sum(name.startswith("model.layers.") for name in seen)
        for index, layer in enumerate(model.model.layers):
            linears = [m for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit)]
            assert len(linears) == 7
            if index < built:
                assert all(m.weight.bnb_quantized and m.weight.device.type == "cpu" for m in linears)
            else:
                assert all(p.device.type == "meta" for p in layer.parameters())

    model = build_random_init_model(model_cfg, PeftConfig(), "cpu", torch.float32, location, on_module=on_module)
    assert seen == ["model.embed_tokens", *[f"model.layers.{i}" for i in range(4)], "model.norm", "lm_head"]
    assert model.is_loaded_in_4bit and model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])

    again = load_base_model(model_cfg, PeftConfig(), "cpu", torch.float32, location)
    other = load_base_model(replace(model_cfg, random_init_seed=1), PeftConfig(), "cpu", torch.float32, location)
    same = model.state_dict()
    assert all(torch.equal(same[k], v) for k, v in again.state_dict().items())
    assert not torch.equal(same["model.layers.0.self_attn.q_proj.weight"],
                           other.state_dict()["model.layers.0.self_attn.q_proj.weight"])

    torch.manual_seed(0)
    peft_model = add_lora(again, PeftConfig(), gradient_checkpointing=True)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 1000, (2, 64))
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_unquantized_random_init_builds_plain_weights(tmp_path):
    model_cfg = small_model_cfg(tmp_path)
    model = load_base_model(model_cfg, PeftConfig(quant=Quant.none), "cpu", torch.float32,
                            model_location(model_cfg))
    assert not getattr(model, "is_quantized", False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


PEAK_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from herd.config.train import ModelConfig, PeftConfig
    from herd.modeling import load_base_model, model_location
    from transformers import AutoConfig, AutoModelForCausalLM
    model_cfg = ModelConfig(name="peak", path=sys.argv[1], random_init=True)
    location = model_location(model_cfg)
    import bitsandbytes  # every import and the skeleton once before the baseline
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(location))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load_base_model(model_cfg, PeftConfig(), "cpu", torch.float32, location)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = 0
    for p in model.parameters():
        held += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            extra = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            held += sum(t.numel() * t.element_size() for t in extra)
    print(json.dumps({"peak_growth": peak, "model_bytes": held}))
""")


def test_builder_peak_memory_is_the_4bit_model_plus_about_one_layer(tmp_path):
    """Physical check that no whole-model unquantized copy exists: peak RSS growth of a 24-layer build is the
    4-bit model plus about one fp32 layer, far below the 312 MB its fp32 linears would take. (glibc keeps
    freed blocks mapped by default; a fixed mmap threshold returns them, so RSS follows what is alive.)"""
    layers, hidden, intermediate = 24, 512, 1536
    model_cfg = small_model_cfg(tmp_path, hidden_size=hidden, intermediate_size=intermediate,
                                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    layer_bytes = (4 * hidden * hidden + 3 * hidden * intermediate) * 4
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, model_cfg.path], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["peak_growth"] < measured["model_bytes"] + 3 * layer_bytes, (measured, layer_bytes)
    assert measured["peak_growth"] < 0.4 * layers * layer_bytes


@pytest.mark.parametrize("change, message", [
    ({"peft": PeftConfig(quant=Quant.int8)}, "int8 is not supported"),
    ({"strategy": StrategyConfig(name=Strategy.zero3, zero_stage=3)}, "strategy=zero3 loads and shards"),
    ({"strategy": StrategyConfig(name=Strategy.fsdp)}, "strategy=fsdp loads and shards"),
    ({"strategy": StrategyConfig(device_map="auto")}, "drop strategy.device_map"),
])
def test_refused_in_one_line_where_it_cannot_apply(change, message):
    job = TrainJob(model=ModelConfig(name="m", path="meta-llama/Llama-2-7b-hf", random_init=True),
                   peft=PeftConfig(), data=DataConfig(name="d", path="d"), strategy=StrategyConfig(),
                   output_dir="o")
    check_random_init(job)  # nf4 + single: fine
    check_random_init(replace(job, peft=PeftConfig(quant=Quant.none), strategy=StrategyConfig(name=Strategy.ddp)))
    with pytest.raises(ConfigError, match=message) as error:
        check_random_init(replace(job, **change))
    assert "\n" not in str(error.value)


def test_random_init_keys_are_typed_in_the_schema():
    register_train_schema()
    job = check_config("train", ["model=llama2-70b", "model.random_init=true", "model.random_init_seed=3"])
    assert job.model.random_init is True and job.model.random_init_seed == 3
    with pytest.raises(ConfigError):
        check_config("train", ["model=llama2-70b", "model.random_init=maybe"])
