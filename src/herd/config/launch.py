"""The user's accelerate and DeepSpeed files, read against herd's strategy: what they may add, what they contradict.

herd's Hydra config stays the one place the strategy, the precision and the batch are chosen. The files people
already have are honoured for what herd leaves open, and refused in one line where they say otherwise:

- `accelerate launch --config_file F` reaches the ranks as environment variables. Its topology (num_processes,
  num_machines, machine_rank, rendezvous) is the launch's and is used as it is. Its DeepSpeed / FSDP / mixed
  precision settings must agree with `strategy` and `train.precision` (`check_accelerate_launch`); its
  `deepspeed_config_file` is used like `strategy.deepspeed_config`.
- `strategy.deepspeed_config=PATH` (a DeepSpeed JSON) is merged under herd's settings (`merge_deepspeed`): the
  file supplies what herd does not decide (bucket sizes, overlap_comm, stage-3 tuning, ...); where herd decides
  (ZeRO stage, offload, bf16, batch sizes, clipping, optimizer and scheduler) the file must agree or leave it
  out ("auto" agrees with anything). herd always sets stage3_gather_16bit_weights_on_model_save under ZeRO-3:
  the adapter is saved whole.

Pure (json and the environment only): `python -m herd.slurm` runs the file checks before a job is queued.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from herd.config.train import DEEPSPEED, Strategy, TrainJob, gradient_accumulation
from herd.errors import ConfigError

ZERO_STAGE = {Strategy.zero2: 2, Strategy.zero3: 3, Strategy.zero3_offload: 3}
ACCELERATE_DS_FILE = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
# accelerate launch lists here the DeepSpeed fields its config file set; accelerate then refuses (with a
# multi-line ValueError, after the model loaded) any DeepSpeed config passed in code. herd checked those fields
# and carries them in its own config: strategy.prepare_launch drops the list.
ACCELERATE_DS_FIELDS = "ACCELERATE_CONFIG_DS_FIELDS"

# DeepSpeed tuning herd starts from; a user's file overrides any of it.
_HERD_ZERO_DEFAULTS = {"overlap_comm": True, "contiguous_gradients": True}
_OFFLOAD_KEYS = {"offload_optimizer": "optimizer states", "offload_param": "parameters"}


def _is_true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _use_instead(stage: int, offload: bool, fix: str) -> str:
    """What to do about a DeepSpeed stage herd's strategy does not match (for messages): the strategy that
    matches it, or `fix` where herd has none (ZeRO-0/1)."""
    if stage == 3:
        return f"use strategy={'zero3_offload' if offload else 'zero3'} or {fix}"
    if stage == 2:
        return f"use strategy=zero2 or {fix}"
    return f"herd's DeepSpeed strategies are ZeRO-2 (zero2) and ZeRO-3 (zero3, zero3_offload): {fix}"


def _number(value: Any) -> float | None:
    """A number from a config value; None for "auto", absent or anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- the DeepSpeed JSON


def deepspeed_file(job: TrainJob, env: Mapping[str, str] | None = None) -> tuple[Path, str] | None:
    """(path, how it was given) of the user's DeepSpeed JSON: strategy.deepspeed_config, or the accelerate
    config's deepspeed_config_file; None without one. Both, naming different files: refused."""
    env = os.environ if env is None else env
    given = job.strategy.deepspeed_config
    from_accelerate = env.get(ACCELERATE_DS_FILE)
    if from_accelerate and from_accelerate.lower() == "none":
        from_accelerate = None
    if given and from_accelerate and Path(given).expanduser().resolve() != Path(from_accelerate).resolve():
        raise ConfigError(f"two DeepSpeed files: strategy.deepspeed_config={given} and the accelerate config's "
                          f"deepspeed_config_file {from_accelerate}; keep one")
    if given:
        return Path(given).expanduser(), f"strategy.deepspeed_config={given}"
    if from_accelerate:
        return Path(from_accelerate), f"the accelerate config's deepspeed_config_file {from_accelerate}"
    return None


def read_deepspeed_file(path: Path, source: str) -> dict:
    """The JSON object in a DeepSpeed config file; refused in one line when missing or not a JSON object."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read it ({error.strerror or error})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    return config


def herd_deepspeed(job: TrainJob, bf16: bool) -> dict:
    """What herd decides for DeepSpeed (the ZeRO stage, offload, precision, the batch and clipping left "auto"
    for the trainer to fill from herd's train.* settings)."""
    s = job.strategy
    zero: dict = {"stage": s.zero_stage}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if s.zero_stage == 3:
        # Gather full weights at save time so the adapter is written as ordinary safetensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def _merge(base: dict, top: Mapping) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(
            merged.get(key), dict) else value
    return merged


def merge_deepspeed(user: Mapping, herds: Mapping) -> dict:
    """herd's tuning defaults, then the user's file, then herd's decisions on top."""
    return _merge(_merge({"zero_optimization": dict(_HERD_ZERO_DEFAULTS)}, user), herds)


def check_deepspeed_file(config: Mapping, source: str, job: TrainJob, bf16: bool, processes: int) -> None:
    """Refuse, in one line, what the user's DeepSpeed config says against herd's settings."""
    name = job.strategy.name
    if name not in DEEPSPEED:
        raise ConfigError(f"{source}: a DeepSpeed config needs strategy=zero2, zero3 or zero3_offload, "
                          f"got strategy={name.value}")
    for section, herds_key in (("optimizer", "train.optimizer"), ("scheduler", "train.lr_scheduler")):
        if section in config:
            raise ConfigError(f"{source}: has a '{section}' section, but herd's {herds_key} chooses it (any "
                              f"transformers name); remove the section and set {herds_key} instead")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise ConfigError(f"{source}: zero_optimization must be a JSON object")
    stage, herds_stage = _number(zero.get("stage")), ZERO_STAGE[name]
    if stage is not None and stage != herds_stage:
        raise ConfigError(f"{source}: zero_optimization.stage={zero['stage']} contradicts strategy={name.value} "
                          f"(ZeRO-{herds_stage}); {_use_instead(int(stage), False, 'drop the stage from the file')}")
    for key, what in _OFFLOAD_KEYS.items():
        herd_offloads = job.strategy.offload_optimizer if key == "offload_optimizer" else job.strategy.offload_params
        device = (zero.get(key) or {}).get("device") if isinstance(zero.get(key), Mapping) else None
        device = None if device in (None, "auto") else str(device).lower()
        if device is None:
            continue
        if device == "nvme":
            raise ConfigError(f"{source}: zero_optimization.{key}.device=nvme; herd offloads {what} to CPU RAM "
                              "only (strategy=zero3_offload), as its memory plan assumes")
        if (device == "cpu") != herd_offloads:
            wanted = "zero3_offload" if device == "cpu" else "zero2 or zero3"
            raise ConfigError(f"{source}: zero_optimization.{key}.device={device} contradicts strategy={name.value}"
                              f" ({'offloads' if herd_offloads else 'keeps'} {what} "
                              f"{'to CPU RAM' if herd_offloads else 'on the device'}); use strategy={wanted} or "
                              "drop the key from the file")
    for section, herds_value in (("bf16", bf16), ("fp16", False)):
        enabled = (config.get(section) or {}).get("enabled") if isinstance(config.get(section), Mapping) else None
        if isinstance(enabled, bool) and enabled != herds_value:
            trains = "bf16" if bf16 else "fp32"
            raise ConfigError(f"{source}: {section}.enabled={str(enabled).lower()} but this run trains in {trains} "
                              "(train.precision); set train.precision or use \"auto\" in the file")
    accumulation = gradient_accumulation(job.train.global_batch_size, job.train.micro_batch_size, processes)
    for key, herds_value, herds_key in (
        ("train_micro_batch_size_per_gpu", job.train.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", accumulation, "train.global_batch_size / (micro batch x processes)"),
        ("train_batch_size", job.train.global_batch_size, "train.global_batch_size"),
        ("gradient_clipping", job.train.max_grad_norm, "train.max_grad_norm"),
    ):
        value = _number(config.get(key))
        if value is not None and value != herds_value:
            raise ConfigError(f"{source}: {key}={config[key]} but {herds_key} gives {herds_value:g}; set it in "
                              "herd's config and use \"auto\" (or nothing) in the file")


def deepspeed_settings(job: TrainJob, bf16: bool, processes: int, env: Mapping[str, str] | None = None
                       ) -> tuple[dict, str | None]:
    """(the DeepSpeed config the trainer gets, the user file it was merged from or None), refused in one line
    where the file contradicts herd."""
    herds = herd_deepspeed(job, bf16)
    found = deepspeed_file(job, env)
    if found is None:
        return merge_deepspeed({}, herds), None
    path, source = found
    user = read_deepspeed_file(path, source)
    check_deepspeed_file(user, source, job, bf16, processes)
    return merge_deepspeed(user, herds), str(path)


# ---------------------------------------------------------------- accelerate launch --config_file


def check_accelerate_launch(job: TrainJob, bf16: bool, processes: int, env: Mapping[str, str] | None = None,
                            device: str = "cuda") -> None:
    """Refuse, in one line, what the accelerate launch (its config file, its flags: both arrive as the
    environment) asks against herd's strategy and precision. Topology is not checked here: it is the launch's."""
    env = os.environ if env is None else env
    name = job.strategy.name
    source = "the accelerate config"

    precision = (env.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    trains = "bf16" if bf16 else "fp32"
    if precision not in ("no", "bf16"):
        raise ConfigError(f"{source} asks mixed_precision={precision}; herd trains in bf16 or fp32 "
                          "(train.precision): launch with --mixed_precision no (or bf16)")
    if precision == "bf16" and not bf16:
        where = " on CPU" if device == "cpu" else ""
        raise ConfigError(f"{source} asks mixed_precision=bf16 but this run trains in {trains}{where} "
                          "(train.precision); launch with --mixed_precision no, or set train.precision=bf16")

    if _is_true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage_text = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        stage = int(stage_text) if stage_text and stage_text.isdigit() else None
        optimizer_device = (env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") or "").lower() or None
        param_device = (env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") or "").lower() or None
        offload = "cpu" in (optimizer_device, param_device)
        asked = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
        if name not in DEEPSPEED:
            use = (_use_instead(stage, offload, "launch without that config") if stage is not None
                   else "use strategy=zero2, zero3 or zero3_offload, or launch without that config")
            raise ConfigError(f"{source} enables {asked} but strategy={name.value}; {use}")
        herds_stage = ZERO_STAGE[name]
        if stage is not None and stage != herds_stage:
            raise ConfigError(f"{source} sets zero_stage={stage} but strategy={name.value} is ZeRO-{herds_stage}; "
                              + _use_instead(stage, offload, f"an accelerate config with zero_stage: {herds_stage}"))
        for device_value, key, herd_offloads, what in (
            (optimizer_device, "offload_optimizer_device", job.strategy.offload_optimizer, "optimizer states"),
            (param_device, "offload_param_device", job.strategy.offload_params, "parameters"),
        ):
            if device_value in (None, "none") and not herd_offloads or device_value is None:
                continue
            if device_value == "nvme" or (device_value == "cpu") != herd_offloads:
                wanted = "zero3_offload" if device_value in ("cpu", "nvme") else "zero2 or zero3"
                raise ConfigError(f"{source} sets {key}={device_value} but strategy={name.value} "
                                  f"{'offloads' if herd_offloads else 'keeps'} {what} "
                                  f"{'to CPU RAM' if herd_offloads else 'on the device'}; use strategy={wanted} "
                                  f"or {key}: {'cpu' if herd_offloads else 'none'}")
        if herds_stage == 3 and env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "false":
            raise ConfigError(f"{source} sets zero3_init_flag=false, but herd loads ZeRO-3 weights sharded "
                              "(zero.Init); drop it or set it true")
        accumulation = gradient_accumulation(job.train.global_batch_size, job.train.micro_batch_size, processes)
        for variable, key, herds_value, herds_key in (
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", accumulation,
             "train.global_batch_size / (micro batch x processes)"),
            ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", job.train.max_grad_norm, "train.max_grad_norm"),
        ):
            value = _number(env.get(variable))
            if value is not None and value != herds_value:
                raise ConfigError(f"{source} sets {key}={env[variable]} but {herds_key} gives {herds_value:g}; "
                                  "set it in herd's config and drop it from the accelerate config")
    elif env.get(ACCELERATE_DS_FILE) and env[ACCELERATE_DS_FILE].lower() != "none":
        raise ConfigError(f"{source} names a deepspeed_config_file but does not enable DeepSpeed")

    if _is_true(env.get("ACCELERATE_USE_FSDP")):
        if name != Strategy.fsdp:
            raise ConfigError(f"{source} enables FSDP but strategy={name.value}; add strategy=fsdp, or launch "
                              "without that config")
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(f"{source} asks FSDP version {env.get('FSDP_VERSION', '1')}; herd's strategy=fsdp "
                              "is FSDP2 (FSDP1 cannot shard 4-bit weights with LoRA): set fsdp_version: 2 (e.g. "
                              "TRL's accelerate_configs/fsdp2.yaml)")
        if _is_true(env.get("FSDP_OFFLOAD_PARAMS")) and not job.strategy.cpu_offload:
            raise ConfigError(f"{source} sets fsdp_offload_params=true but strategy.cpu_offload=false; set "
                              "strategy.cpu_offload=true or drop it from the accelerate config")
        state_dict = (env.get("FSDP_STATE_DICT_TYPE") or "FULL_STATE_DICT").upper()
        if state_dict != "FULL_STATE_DICT":
            raise ConfigError(f"{source} sets fsdp_state_dict_type={state_dict}; herd saves adapters with "
                              "FULL_STATE_DICT (a sharded state dict saved no adapter): drop it")
        if _is_true(env.get("FSDP_ACTIVATION_CHECKPOINTING")):
            raise ConfigError(f"{source} sets fsdp_activation_checkpointing=true; herd's "
                              "train.gradient_checkpointing decides it: drop it from the accelerate config")


def accelerate_launch_facts(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the accelerate launch asked, as recorded in the manifest (the ranks see its config file only
    through these variables)."""
    env = os.environ if env is None else env
    kind = ("DEEPSPEED" if _is_true(env.get("ACCELERATE_USE_DEEPSPEED")) else
            "FSDP" if _is_true(env.get("ACCELERATE_USE_FSDP")) else None)
    facts: dict[str, Any] = {"distributed": kind, "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION")}
    if kind == "DEEPSPEED":
        facts.update(zero_stage=env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
                     offload_optimizer_device=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                     offload_param_device=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
                     deepspeed_config_file=env.get(ACCELERATE_DS_FILE))
    if kind == "FSDP":
        facts.update(fsdp_version=env.get("FSDP_VERSION"), offload_params=env.get("FSDP_OFFLOAD_PARAMS"))
    return {k: v for k, v in facts.items() if v is not None}
