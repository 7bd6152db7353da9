"""infer.merge for big models: sharded safetensors with an index, the low-memory (by tensor) merge, and the memory
plan that picks between them or refuses (herd.memory.merge, herd.tensor_merge), on the tiny trained run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from herd.cli import check_config
from herd.config.infer import register_infer_schema
from herd.errors import ConfigError
from herd.memory import GB, KNOWN_SHAPES, load_model_shape
from herd.memory.merge import BY_TENSOR, IN_MEMORY, choose_way, merge_plan, parse_size
from tests.conftest import OFFLINE_ENV
from tests.test_infer import LOGITS_SCRIPT

register_infer_schema()

SMALL_SHARDS = "300KB"  # the tiny model is 0.9 MB in fp32: four files


def compose(*overrides: str):
    return check_config("infer", list(overrides))


def merge(trained_run: Path, output: Path, *overrides: str) -> Path:
    from infer.recipes import merge as recipe

    return recipe.run(compose(f"run_dir={trained_run}", f"merge.output={output}", *overrides))


def weight_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


# ---------------------------------------------------------------- the plan (pure)


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("300KB", 300_000), ("1048576", 2**20),
    ("1.5GB", 1_500_000_000),
])
def test_sizes_parse_as_save_pretrained_reads_them(text, expected):
    assert parse_size(text) == expected


def test_a_bad_shard_size_is_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        compose("merge.max_shard_size=5 gigs")
    assert "merge.max_shard_size" in str(error.value) and "use e.g. 5GB" in str(error.value)
    assert "\n" not in str(error.value)


def test_llama2_70b_plan_against_counts_written_here():
    """bf16 on one 80 GB GPU: the whole model does not fit, one weight at a time does."""
    shape = KNOWN_SHAPES["llama2-70b"]
    params = 68_976_648_192  # Llama-2-70B's parameter count, as the hub reports it
    largest_linear = 8192 * 28672  # gate/up/down
    embed = 32000 * 8192
    lora = 828_375_040  # bytes of an r=16 all-linear adapter in fp32
    plan = merge_plan(shape, 2, lora, 5 * 10**9, "cuda")
    assert shape.param_counts()["total"] == params
    assert plan.model_bytes == 2 * params
    assert plan.in_memory == 2 * params + 2 * lora + 2 * largest_linear * 4 + 650 * 2**20
    assert plan.by_tensor_device == largest_linear * (2 + 8) + 650 * 2**20
    assert plan.by_tensor_host("cuda") == 5 * 10**9 + embed * (4 + 2) + lora
    way, line = choose_way(plan, "cuda", 79 * GB, 500 * GB, None, "5GB")
    assert line == ("merge plan: in memory 132.4 GB of cuda (79.0 GB free); by tensor 2.8 GB of cuda + 6.9 GB of "
                    "RAM (500.0 GB free); output 128.5 GB in shards of at most 5GB -> by tensor")
    assert way == BY_TENSOR
    assert choose_way(plan, "cuda", 148 * GB, 500 * GB, None, "5GB")[0] == IN_MEMORY  # with 10% to spare
    with pytest.raises(ConfigError, match="in memory does not fit; merge.low_memory=true fits") as error:
        choose_way(plan, "cuda", 79 * GB, 500 * GB, False, "5GB")
    assert "\n" not in str(error.value)
    # 7 GB of RAM: a 5 GB shard does not fit beside a tensor being read and the adapter, 1 GiB shards do
    with pytest.raises(ConfigError, match="merge.low_memory=true merge.max_shard_size=1GiB fits"):
        choose_way(plan, "cuda", 79 * GB, 7 * GB, None, "5GB")
    with pytest.raises(ConfigError, match="no setting fits"):
        choose_way(plan, "cuda", 1 * GB, 500 * GB, None, "5GB")


# ---------------------------------------------------------------- real merges of the tiny run


def test_sharded_merge_has_an_index_and_loads_with_plain_transformers(trained_run, tmp_path):
    from herd.chat_format import format_llama2
    from herd.inference import load_for_inference, resolve_source

    output = merge(trained_run, tmp_path / "merged", f"merge.max_shard_size={SMALL_SHARDS}")
    files = weight_files(output)
    assert len(files) == 4 and not (output / "model.safetensors").exists()
    assert all(len(data) <= parse_size(SMALL_SHARDS) for data in files.values())
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    info = json.loads((output / "herd_merge.json").read_text())
    assert info["way"] == IN_MEMORY and info["shards"] == 4 and info["max_logit_difference"] < 1e-3

    question = "How do I make pancakes?"
    result = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(output), question], capture_output=True,
                            text=True, env={**os.environ, **OFFLINE_ENV}, timeout=300, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    job = OmegaConf.to_object(compose(f"run_dir={trained_run}", "quant=none"))
    model, tokenizer = load_for_inference(resolve_source(job), job, "cpu")  # base + adapter, unmerged
    ids = tokenizer(format_llama2([{"role": "user", "content": question}]).text, add_special_tokens=False)["input_ids"]
    assert loaded["ids"] == ids
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0]
    assert float((torch.tensor(loaded["logits"]) - reference).abs().max()) < 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_low_memory_merge_writes_the_same_files_as_the_in_memory_merge(trained_run, tmp_path, precision):
    shards = f"merge.max_shard_size={SMALL_SHARDS}"
    in_memory = merge(trained_run, tmp_path / "in-memory", shards, f"precision={precision}")
    by_tensor = merge(trained_run, tmp_path / "by-tensor", shards, f"precision={precision}", "merge.low_memory=true")
    assert weight_files(by_tensor) == weight_files(in_memory)  # byte for byte: same weights, same layout
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert (by_tensor / name).read_text() == (in_memory / name).read_text(), name
    info = json.loads((by_tensor / "herd_merge.json").read_text())
    assert info["way"] == BY_TENSOR and info["lora_layers_merged"] == 14
    assert info["shards"] == len(weight_files(by_tensor)) == (4 if precision == "fp32" else 2)


def test_the_plan_picks_the_low_memory_merge_or_refuses_before_writing(trained_run, tmp_path):
    adapter = trained_run / "adapter" / "adapter_model.safetensors"
    plan = merge_plan(load_model_shape(str(json.loads((trained_run / "herd_run.json").read_text())["base_model"])),
                      4, adapter.stat().st_size, parse_size(SMALL_SHARDS), "cpu")
    assert plan.by_tensor_host("cpu") < plan.in_memory
    between = f"merge.memory_gb={(plan.by_tensor_host('cpu') + plan.in_memory) / 2 / 0.9 / GB:.6f}"
    output = merge(trained_run, tmp_path / "auto", f"merge.max_shard_size={SMALL_SHARDS}", between)
    assert json.loads((output / "herd_merge.json").read_text())["way"] == BY_TENSOR

    with pytest.raises(ConfigError, match="in memory does not fit; merge.low_memory=true fits"):
        merge(trained_run, tmp_path / "forced", f"merge.max_shard_size={SMALL_SHARDS}", between,
              "merge.low_memory=false")
    with pytest.raises(ConfigError, match="by tensor does not fit; no setting fits"):
        merge(trained_run, tmp_path / "tiny-memory", f"merge.max_shard_size={SMALL_SHARDS}", "merge.memory_gb=1e-6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto"]  # refused before anything was written


def test_low_memory_merge_refuses_what_is_not_plain_lora(trained_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "dora"
    shutil.copytree(trained_run / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="merges plain LoRA on linear layers; the adapter's .*lora_magnitude_vector"):
        merge(trained_run, tmp_path / "merged", f"adapter={adapter}", "merge.low_memory=true")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
