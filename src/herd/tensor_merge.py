"""The low-memory LoRA merge (infer.merge with merge.low_memory): one weight at a time, never the whole model.

The base's safetensors are read one tensor at a time; each LoRA-targeted weight is merged on the device by
PEFT's own `merge()` on that one layer (the arithmetic merge_and_unload uses: scaling, rank and alpha
patterns, rsLoRA, fan_in_fan_out, fp32 adapter factors as PEFT loads them onto a half-precision base); every
tensor is cast to the output dtype and written into shards laid out as transformers' save_pretrained lays
them out (huggingface_hub's splitter over the same state dict keys, tied weights left out, the same index).
The model itself exists only on the meta device, for its keys, shapes and PEFT's layers.

Takes plain LoRA on linear layers (what herd trains); an adapter with anything else (DoRA magnitudes, LoRA
biases, modules_to_save, embedding LoRA) is refused in one line before anything is written: merge it in
memory (merge.low_memory=false) where it fits.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from herd.errors import ConfigError, HerdError

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "default"
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


def base_weight_files(location: str) -> dict[str, Path]:
    """{tensor name: safetensors file} of the base (a local directory, or a hub id fetched into the HF cache)."""
    from huggingface_hub import constants, snapshot_download

    directory = Path(location)
    if not directory.is_dir():
        directory = Path(snapshot_download(
            location, allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"],
            token=os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None))
    index = directory / constants.SAFETENSORS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / constants.SAFETENSORS_SINGLE_FILE
    if not single.is_file():
        raise ConfigError(f"merge.low_memory reads the base's safetensors; {location} has none "
                          "(merge.low_memory=false loads other formats)")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}  # noqa: SIM118 -- a safe_open handle is not iterable


def _lora_pairs(adapter_dir: Path, lora_modules: dict) -> dict[str, dict[str, str]]:
    """{module: {"A": key, "B": key}} of the adapter file, every key accounted for, or refused."""
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_FILE
    if not path.is_file():
        raise ConfigError(f"merge.low_memory reads {ADAPTER_FILE}; {adapter_dir} has none")
    pairs: dict[str, dict[str, str]] = {}
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 -- a safe_open handle is not iterable
            found = _LORA_KEY.fullmatch(key)
            if not found or found["module"] not in lora_modules:
                raise ConfigError(f"merge.low_memory merges plain LoRA on linear layers; the adapter's {key} is "
                                  "not one (merge.low_memory=false merges it in memory)")
            pairs.setdefault(found["module"], {})[found["part"]] = key
    incomplete = [m for m in lora_modules if set(pairs.get(m, {})) != {"A", "B"}]
    if incomplete:
        raise ConfigError(f"the adapter has no lora_A/lora_B pair for {incomplete[0]} "
                          f"({len(incomplete)} layer(s)); is {adapter_dir} this base's adapter?")
    return pairs


def _skeleton(location: str, adapter_dir: Path, dtype: torch.dtype):
    """The model on the meta device (its state dict as save_pretrained writes it) and, on the same model,
    PEFT's LoRA layers as the adapter's config makes them, by module name."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    config = AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # the state dict as save_pretrained turns it into files: tied weights out, its key order
    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    saved = revert_weight_conversion(model, dict(state))
    if set(saved) != set(state):
        raise ConfigError(f"merge.low_memory takes checkpoints whose weight names are the model's (Llama-class); "
                          f"{config.model_type} renames them on save (merge.low_memory=false)")
    layout = {name: torch.empty(state[name].shape, dtype=dtype, device="meta")
              for name in sorted(saved, key=dot_natural_key)}  # the order of a loaded model's save
    parameters = model.num_parameters()
    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    if lora_config.use_dora or lora_config.modules_to_save or getattr(lora_config, "lora_bias", False):
        raise ConfigError("merge.low_memory merges plain LoRA on linear layers; this adapter uses DoRA, LoRA "
                          "biases or modules_to_save (merge.low_memory=false merges it in memory)")
    inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True)
    lora_modules = {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}
    return config, layout, parameters, lora_modules


def _merged(module, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype,
            device: str) -> torch.Tensor:
    """One layer's merged weight, by PEFT's merge() on that layer alone; the layer is emptied again after."""
    from torch.nn import Parameter

    base = module.get_base_layer()
    meta = base.weight
    base.weight = Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    for part, tensor in ((module.lora_A, lora_a), (module.lora_B, lora_b)):
        # PEFT loads adapter factors in fp32 onto a half-precision base (autocast_adapter_dtype)
        part[ADAPTER_NAME].weight = Parameter(tensor.to(device=device, dtype=torch.float32), requires_grad=False)
    try:
        module.merge(adapter_names=[ADAPTER_NAME])
        return base.weight.data.to("cpu")
    finally:
        base.weight = meta
        for part in (module.lora_A, module.lora_B):
            part[ADAPTER_NAME].to("meta")


def merge_by_tensor(location: str, adapter_dir: Path, output: Path, dtype: torch.dtype, device: str,
                    max_shard_bytes: int) -> dict:
    """Write the merged model's safetensors (and index) into `output` one tensor at a time; check the files.
    Returns what was done and checked, for herd_merge.json."""
    from huggingface_hub import constants, split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import save_file

    config, layout, parameters, lora_modules = _skeleton(location, adapter_dir, dtype)
    pairs = _lora_pairs(adapter_dir, lora_modules)
    files = base_weight_files(location)
    missing = [name for name in layout if name not in files]
    if missing:
        raise ConfigError(f"the base at {location} has no weight {missing[0]} ({len(missing)} missing) for its "
                          f"config's {config.architectures[0] if config.architectures else 'model'}")
    lora_of_weight = {f"{module}.weight": module for module in lora_modules}
    split = split_torch_state_dict_into_shards(layout, filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
                                               max_shard_size=max_shard_bytes)
    output.mkdir(parents=True, exist_ok=True)
    handles: dict[Path, object] = {}
    adapter = safe_open(adapter_dir / ADAPTER_FILE, framework="pt")
    merged = 0
    for shard_file, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], framework="pt")
            tensor = handles[files[name]].get_tensor(name)
            if tuple(tensor.shape) != tuple(layout[name].shape):
                raise ConfigError(f"the base's {name} has shape {tuple(tensor.shape)}, its config says "
                                  f"{tuple(layout[name].shape)}")
            module = lora_of_weight.get(name)
            if module is not None:
                keys = pairs[module]
                tensor = _merged(lora_modules[module], tensor, adapter.get_tensor(keys["A"]),
                                 adapter.get_tensor(keys["B"]), dtype, device)
                if not torch.isfinite(tensor).all():
                    raise HerdError(f"merge: the merged {name} has NaN or Inf values; the adapter is broken")
                merged += 1
            elif tensor.is_floating_point():
                tensor = tensor.to(dtype)
            shard[name] = tensor.contiguous()
        save_file(shard, output / shard_file, metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": parameters, **split.metadata}, "weight_map": split.tensor_to_filename}
        (output / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if merged != len(lora_modules):
        raise HerdError(f"merge: {merged} of {len(lora_modules)} LoRA layers merged")
    _save_configs(config, location, output, dtype)
    return {"lora_layers_merged": merged, "tensors": len(layout), "shards": len(split.filename_to_tensors),
            **check_files(output, layout)}


def _save_configs(config, location: str, output: Path, dtype: torch.dtype) -> None:
    """config.json (the output dtype) and generation_config.json, as save_pretrained writes them."""
    from transformers import GenerationConfig

    config.dtype = dtype
    config.save_pretrained(output)
    try:
        generation = GenerationConfig.from_pretrained(location)
    except OSError:  # the base has none: save_pretrained derives one from the model config
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(output)


def check_files(output: Path, layout: dict[str, torch.Tensor]) -> dict:
    """The written files against the model the config describes: every tensor once, with its shape and the
    output dtype, and an index (when sharded) that names each tensor's file. Refused in one line otherwise."""
    from huggingface_hub import constants
    from safetensors import safe_open

    seen: dict[str, str] = {}
    for path in sorted(output.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 -- a safe_open handle is not iterable
                piece = handle.get_slice(name)
                expected = layout.get(name)
                if name in seen or expected is None or tuple(piece.get_shape()) != tuple(expected.shape):
                    raise HerdError(f"merge check failed: {path.name} holds {name} unexpectedly (duplicate, unknown "
                                    "or of the wrong shape)")
                if piece.get_dtype() != _safetensors_dtype(expected.dtype):
                    raise HerdError(f"merge check failed: {name} is {piece.get_dtype()}, not {expected.dtype}")
                seen[name] = path.name
    if set(seen) != set(layout):
        absent = sorted(set(layout) - set(seen))
        raise HerdError(f"merge check failed: {absent[0]} was not written ({len(absent)} missing)")
    index = output / constants.SAFETENSORS_INDEX_FILE
    if index.is_file() and json.loads(index.read_text())["weight_map"] != seen:
        raise HerdError(f"merge check failed: {index.name} does not match the files")
    return {"check": "files: every weight once, shapes and dtype as the config says, index matches, merged "
                     "weights finite"}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, str(dtype))
