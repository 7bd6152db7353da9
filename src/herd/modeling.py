"""Load the base model and tokenizer (hub id or local path), quantize, attach or load LoRA adapters.

Shared by train and infer. The HF token is read by huggingface_hub from the environment (HF_TOKEN) and
never passed through a config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from herd.chat_format import LLAMA2_CHAT_TEMPLATE
from herd.config.train import ModelConfig, PeftConfig, Precision, Quant
from herd.errors import ConfigError
from herd.paths import resolve_path

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device '{device}' is not one of: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return device


def resolve_precision(precision: Precision, device: str) -> torch.dtype:
    """Dtype of the trainable/unquantized parameters: bf16 on GPUs that have it, fp32 on CPU."""
    if precision == Precision.fp32 or (precision == Precision.auto and device == "cpu"):
        return torch.float32
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision=bf16 needs a GPU with bfloat16 (Ampere or newer); use precision=fp32")
    return torch.bfloat16


def model_location(model_cfg: ModelConfig) -> str:
    """A local directory for the model, or the hub id as given; builds the tiny model on first use."""
    if model_cfg.random_init:  # a weightless directory: config.json + tokenizer (herd.random_init)
        from herd.random_init import random_init_location

        return str(random_init_location(model_cfg))
    if model_cfg.build_tiny:
        from herd.fixtures.tiny import ensure_tiny_model

        return str(ensure_tiny_model(resolve_path(model_cfg.path, must_exist=False)))
    local = resolve_path(model_cfg.path, must_exist=False)
    return str(local) if local.exists() else model_cfg.path


def load_tokenizer(model_cfg: ModelConfig, location: str | None = None):
    location = location or model_location(model_cfg)
    tokenizer = AutoTokenizer.from_pretrained(
        location, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Llama-2 ships without a pad token; <unk> never appears in real text, so padding with it is safe.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if model_cfg.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def compute_dtype(peft_cfg: PeftConfig, dtype: torch.dtype) -> torch.dtype:
    return dtype if peft_cfg.compute_dtype == "auto" else torch_dtype(peft_cfg.compute_dtype)


def quantization_config(peft_cfg: PeftConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if peft_cfg.quant == Quant.none:
        return None
    if peft_cfg.quant == Quant.int8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant.value,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(peft_cfg, dtype),
        bnb_4bit_quant_storage=torch_dtype("uint8" if peft_cfg.quant_storage == "auto" else peft_cfg.quant_storage),
    )


def disable_bnb_cpu_inference_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with avx512_bf16, any no-grad eval-mode forward (evaluation, generate) repacks the weights in
    place; training steps after that compute silently wrong gradients (PLATFORM_NOTES). Returns the number
    of 4-bit layers touched.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base_model(
    model_cfg: ModelConfig, peft_cfg: PeftConfig, device: str | None, dtype: torch.dtype,
    location: str | None = None, device_map: str | None = None,
) -> PreTrainedModel:
    """The frozen base, quantized as `peft_cfg.quant` says, placed whole on `device`; device None leaves
    placement to FSDP / ZeRO-3, which shard the weights themselves; a named `device_map` ("auto", ...)
    spreads the layers over the process's devices instead."""
    location = location or model_location(model_cfg)
    if model_cfg.random_init:  # no weights to load: drawn from the seed and quantized layer by layer
        from herd.random_init import build_random_init_model

        model = build_random_init_model(model_cfg, peft_cfg, device, dtype, location)
        disable_bnb_cpu_inference_repack(model)
        return model
    quant = quantization_config(peft_cfg, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        location,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        quantization_config=quant,
        dtype=compute_dtype(peft_cfg, dtype) if quant is not None else dtype,
        attn_implementation=model_cfg.attn_implementation,
        device_map=device_map or ({"": device} if device is not None else None),
    )
    disable_bnb_cpu_inference_repack(model)
    return model


def lora_config(peft_cfg: PeftConfig):
    from peft import LoraConfig

    targets = list(peft_cfg.target_modules)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        # "all-linear" is PEFT's own spelling for every linear layer except the output head.
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
        bias="none",
    )


def check_target_modules(model_cfg: ModelConfig, peft_cfg: PeftConfig, location: str) -> None:
    """peft.target_modules must each name linear layers of this model (PEFT matches a name or a dotted
    suffix of one), checked on a weightless copy built from its config before anything loads."""
    targets = list(peft_cfg.target_modules)
    if "all-linear" in targets:
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    linear = [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in linear)]
    if unknown:
        names = sorted({name.rpartition(".")[2] for name in linear})
        raise ConfigError(f"peft.target_modules: {', '.join(unknown)} name no linear layer of {model_cfg.name}; "
                          f"allowed: all-linear, {', '.join(names)}")


def add_lora(model: PreTrainedModel, peft_cfg: PeftConfig, gradient_checkpointing: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training

    # Training never reuses a KV cache, and with one transformers stops detecting packed sequences from
    # position ids: packed conversations would attend to each other (tests/test_packing.py).
    model.config.use_cache = False
    if peft_cfg.quant != Quant.none:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(peft_cfg))


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
