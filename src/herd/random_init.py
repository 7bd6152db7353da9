"""Random-init base models (`model.random_init=true`): a model of a real shape without downloading weights.

The shape comes from a config.json alone: the Llama-2 7B/13B/70B ones are below (hubs need not be reachable),
a local directory's, or a hub repo's config.json (nothing else is fetched). The weights are drawn from a
seed (`model.random_init_seed`), so a run, its evaluation and its generation see the same base on the same
device type (CUDA's and the CPU's random streams differ).

How the model is built, so that 70B (140 GB in bf16) fits a GPU and never touches the disk:
  1. the skeleton on the meta device (no memory), its linear layers swapped for bitsandbytes 4-bit ones by
     transformers' own quantizer, as from_pretrained does;
  2. one module at a time on the target device: the embeddings, then each decoder layer in the compute
     dtype (bf16 on GPU, fp32 on CPU), drawn from the seed and quantized to NF4 in place (the unquantized
     weight is freed as each linear is quantized), then the final norm and the LM head.
At most one decoder layer is ever unquantized. `peft.quant=none` builds the same way without quantizing
(the model is then as large as its unquantized weights); `int8` is refused.

Layout on disk: `.herd/models/random-init/<name>-<hash of config.json>/` holds config.json and a tokenizer
(the source directory's, else herd's tiny one: 1024 pieces, ids valid in any Llama-2 vocabulary), so the
planner, the tokenizer loading and herd_run.json treat it like any model directory. It holds no weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from herd.errors import ConfigError
from herd.paths import resolve_path

if TYPE_CHECKING:
    import torch

    from herd.config.train import ModelConfig, PeftConfig, TrainJob

RANDOM_INIT_DIR = ".herd/models/random-init"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def _llama2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    """The meta-llama/Llama-2-*-hf config.json values (the three differ only in these five)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": 4096, "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
        "vocab_size": 32000,
    }


# Keyed like herd.memory's KNOWN_SHAPES (tests check that the two agree).
LLAMA2_CONFIGS: dict[str, dict] = {
    "llama2-7b": _llama2(4096, 11008, 32, 32, 32),
    "llama2-13b": _llama2(5120, 13824, 40, 40, 40),
    "llama2-70b": _llama2(8192, 28672, 80, 64, 8),
}


def known_config(path: str) -> dict | None:
    """The shipped config.json for a Llama-2 hub id (any of the base/chat repos) or short name."""
    import re

    key = path.lower()
    hub = re.fullmatch(r"meta-llama/llama-2-(7b|13b|70b)(-chat)?-hf", key)
    return LLAMA2_CONFIGS.get(f"llama2-{hub.group(1)}" if hub else key)


def source_config(model_cfg: ModelConfig) -> tuple[dict, Path | None]:
    """The config.json dict of `model.path`, and the local directory it came from (None: shipped or hub)."""
    known = known_config(model_cfg.path)
    if known is not None:
        return dict(known), None
    local = resolve_path(model_cfg.path, must_exist=False)
    if model_cfg.build_tiny:
        from herd.fixtures.tiny import ensure_tiny_model

        local = ensure_tiny_model(local)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.random_init=true needs a config.json in {local}")
        return json.loads((local / "config.json").read_text()), local
    try:  # a hub id: its config.json only (a few KB), never the weights
        import os

        from huggingface_hub import hf_hub_download

        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        downloaded = hf_hub_download(model_cfg.path, "config.json", revision=model_cfg.revision, token=token)
    except Exception as error:  # noqa: BLE001 -- offline, gated without a token, no such repo ...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"model.random_init=true cannot read the config.json of model.path={model_cfg.path}: "
                          f"{first}; known offline: {', '.join(LLAMA2_CONFIGS)}") from None
    return json.loads(Path(downloaded).read_text()), None


def random_init_location(model_cfg: ModelConfig) -> Path:
    """The weightless model directory of a random-init model (config.json + tokenizer), made on first use."""
    config, source_dir = source_config(model_cfg)
    if config.get("model_type") != "llama":
        raise ConfigError(f"model.random_init=true builds Llama models; {model_cfg.path} has model_type "
                          f"{config.get('model_type')!r}")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_cfg.name)
    target = resolve_path(f"{RANDOM_INIT_DIR}/{name}-{digest}", must_exist=False)
    if (target / "config.json").is_file():
        return target
    tokenizer_dir = source_dir if source_dir and (source_dir / "tokenizer_config.json").is_file() else None
    if tokenizer_dir is None:
        from herd.fixtures.tiny import ensure_tiny_model

        tokenizer_dir = ensure_tiny_model(resolve_path(".herd/models/tiny-llama", must_exist=False))
    staging = target.with_name(f".{target.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).is_file():
            shutil.copy2(tokenizer_dir / file, staging / file)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / "herd-random-init.json").write_text(json.dumps(
        {"config_from": str(source_dir) if source_dir else model_cfg.path, "tokenizer_from": str(tokenizer_dir),
         "weights": "none: drawn from model.random_init_seed when the model is built"}, indent=2) + "\n")
    try:
        staging.rename(target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_random_init(job: TrainJob) -> None:
    """Where random init cannot apply, refused in one line before anything loads."""
    from herd.config.train import Quant, Strategy

    if not job.model.random_init:
        return
    if job.peft.quant == Quant.int8:
        raise ConfigError("model.random_init=true builds 4-bit (peft.quant=nf4|fp4) or unquantized "
                          "(peft.quant=none) bases; int8 is not supported")
    if job.strategy.name not in (Strategy.single, Strategy.ddp):
        raise ConfigError(f"model.random_init=true builds the model in each process (strategy=single or ddp); "
                          f"strategy={job.strategy.name.value} loads and shards weights from files")
    if job.strategy.device_map is not None:
        raise ConfigError("model.random_init=true builds the model on one device; drop strategy.device_map")


def _seed_for(seed: int, name: str) -> int:
    """A per-tensor seed: each tensor is the same whatever order or subset the builder materializes."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def build_random_init_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, device: str, dtype: torch.dtype,
                            location: str,
                            on_module: Callable[[str, torch.nn.Module], None] | None = None):
    """The base model of `location`'s config.json on `device`, weights drawn from model_cfg.random_init_seed,
    quantized as `peft_cfg` says, built one module at a time (module docstring). `on_module(name, model)` is
    called after each top-level piece (embeddings, each decoder layer, norm, head) is built."""
    import os
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from herd.config.train import Quant
    from herd.modeling import compute_dtype, quantization_config

    if peft_cfg.quant == Quant.int8:
        raise ConfigError("model.random_init=true builds 4-bit or unquantized bases; int8 is not supported")
    if device is None or str(device) in ("auto", "meta"):
        raise ConfigError("model.random_init=true needs one device to build on (strategy=single or ddp)")
    started = time.perf_counter()
    quant = quantization_config(peft_cfg, dtype)
    weight_dtype = compute_dtype(peft_cfg, dtype) if quant is not None else dtype
    config = AutoConfig.from_pretrained(location)
    config.use_cache = False if getattr(config, "use_cache", None) is None else config.use_cache
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype,
                                                 attn_implementation=model_cfg.attn_implementation)
    hf_quantizer = None
    if quant is not None:
        from transformers.quantizers.auto import AutoHfQuantizer

        model.config.quantization_config = quant
        hf_quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
        hf_quantizer.validate_environment(device_map={"": device})
        # Swaps nn.Linear for bnb.nn.Linear4bit on the meta skeleton, exactly as from_pretrained does.
        hf_quantizer.preprocess_model(model=model, dtype=weight_dtype, device_map={"": device},
                                      checkpoint_files=None, use_kernels=False)
    std = getattr(config, "initializer_range", 0.02) or 0.02
    seed = model_cfg.random_init_seed
    torch_device = torch.device(device)
    decoder = model.model
    pieces: list[tuple[str, torch.nn.Module]] = [("model.embed_tokens", decoder.embed_tokens)]
    pieces += [(f"model.layers.{i}", layer) for i, layer in enumerate(decoder.layers)]
    pieces += [("model.norm", decoder.norm), ("lm_head", model.lm_head)]
    for name, piece in pieces:
        _materialize(piece, name, torch_device, weight_dtype, std, seed)
        if on_module is not None:
            on_module(name, model)
    with torch.device(torch_device):  # non-persistent buffers (RoPE frequencies) are computed, not drawn
        decoder.rotary_emb = type(decoder.rotary_emb)(config=model.config)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"random init left {len(left)} tensors unbuilt, e.g. {left[0]}")
    if hf_quantizer is not None:
        model.hf_quantizer = hf_quantizer
        hf_quantizer.postprocess_model(model)
    model.name_or_path = location
    model.eval()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"herd: random-init base built on {device}: {len(decoder.layers)} decoder layers, "
              f"{peft_cfg.quant.value}, seed {seed}, in {time.perf_counter() - started:.1f} s", flush=True)
    return model


def _materialize(module, prefix: str, device, weight_dtype, std: float, seed: int) -> None:
    """Every parameter under `module` drawn on `device`; 4-bit linears quantized as soon as drawn."""
    import torch

    try:
        import bitsandbytes as bnb
        params4bit = bnb.nn.Params4bit
    except ImportError:
        params4bit = ()
    generator = torch.Generator(device=device)
    for module_name, sub in module.named_modules(prefix=prefix):
        for param_name, param in list(sub.named_parameters(recurse=False)):
            full = f"{module_name}.{param_name}"
            generator.manual_seed(_seed_for(seed, full))
            kind = type(sub).__name__
            if params4bit and isinstance(param, params4bit):
                weight = torch.empty(param.shape, dtype=weight_dtype, device=device)
                weight.normal_(0.0, std, generator=generator)
                # Params4bit(...).to(device) quantizes (bitsandbytes' own path, as transformers loads weights)
                quantized = params4bit(weight, requires_grad=False, **param.__dict__).to(device)
                del weight
                sub._parameters[param_name] = quantized
                continue
            value = torch.empty(param.shape, dtype=param.dtype, device=device)
            if "Norm" in kind:
                value.fill_(1.0)
            elif param_name == "bias":
                value.zero_()
            else:
                value.normal_(0.0, std, generator=generator)
                padding = getattr(sub, "padding_idx", None)
                if padding is not None:
                    value[padding].zero_()
            sub._parameters[param_name] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
