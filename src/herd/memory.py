"""Memory planner: per-GPU bytes of a QLoRA run, computed from the model's shape alone (no torch import).

Units: every size is in bytes; "GB" in printed output means 2**30 bytes, the unit nvidia-smi and
torch.cuda memory stats report, and the one in which a "24 GB" card (RTX 4090, A10) has 24.0.

Peak per GPU = (static + stored activations + max(loss phase, layer-backward phase)) * FRAGMENTATION
               + CUDA_CONTEXT (+ NCCL_BUFFERS on several GPUs)
The two phases do not overlap: logits are freed before the last layer's backward starts, and the caching
allocator reuses their blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

GB = 2**30
# Constants measured on one H100 (torch 2.11, CUDA 13, bitsandbytes 0.50.2, transformers 5.17, PEFT 0.21) with a
# random-init Llama-2-7B: 11 QLoRA runs (micro batch 1-4, seq 1024-4096, r 8/16, checkpointing on/off, full and
# TRL-fused loss), listed in tests/test_plan.py::FIT_H100
# (measurements kept out of the fit: held_out_h100 there).
# CUDA context outside PyTorch's allocator (torch.cuda.mem_get_info before any tensor: 621 MiB); cuBLAS
# workspaces come from the caching allocator and are inside "reserved".
CUDA_CONTEXT = 650 * 2**20
NCCL_BUFFERS = 512 * 2**20  # communicator buffers of a multi-GPU run (estimate: ~4 MiB x channels x peers)
# reserved / allocated of the caching allocator at the peak. With checkpointing, bitsandbytes dequantizes each
# weight into fresh bf16 buffers twice per layer and the recompute churns blocks of many sizes: measured
# 1.12-1.24 (mean 1.18). Without checkpointing activations pile up monotonically: 1.04-1.08 (mean 1.06).
FRAGMENTATION = {True: 1.18, False: 1.06}  # keyed by gradient_checkpointing
NF4_BLOCK, DQ_BLOCK = 64, 256  # bitsandbytes 4-bit: absmax per 64 weights; double quant: per 256 absmax
HF_SHARD_BYTES = 10 * 10**9  # the Llama-2 HF repos cut safetensors at ~10 GB per file
LORA_PARAM_BYTES = 4  # fp32: PEFT's autocast_adapter_dtype=True upcasts adapters of a quantized base
OPTIMIZER_BYTES = {"adamw": 8.0, "paged_adamw_8bit": 2 + 2 * 4 / 256}  # per trainable param: m and v
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload")
SHARDED = ("fsdp", "zero3", "zero3_offload")  # weights and LoRA states divided by world size
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob tile of the fused LM head
# DeepSpeed's ZeRO gradient reduction: with contiguous_gradients (herd's config, training/strategy.py) every
# rank allocates reduce_bucket_size elements of the communication dtype (the params', bf16 under bf16) on the
# GPU whatever the trainable parameter count: twice under ZeRO-2 with overlap_comm (double buffering,
# stage_1_and_2.py setup_buckets), once under ZeRO-3 (stage3.py). herd's config leaves DeepSpeed's default.
DS_REDUCE_BUCKET = 500_000_000  # elements: deepspeed.runtime.zero.config reduce_bucket_size default
DS_REDUCE_BUFFERS = {"zero2": 2, "zero3": 1, "zero3_offload": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: dict, name: str | None = None) -> ModelShape:
        """From a HF config.json dict (LlamaConfig keys)."""
        return cls(
            name=name or config.get("_name_or_path") or config.get("model_type", "model"),
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or 0,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.hd, self.num_kv_heads * self.hd
        return {
            "q": (h, q),
            "k": (h, kv),
            "v": (h, kv),
            "o": (q, h),
            "gate": (h, i),
            "up": (h, i),
            "down": (i, h),
        }

    def param_counts(self) -> dict[str, int]:
        """Parameters by kind: each linear type over all layers, embeddings, lm_head, norms, total."""
        counts = {f"{n}_proj": self.num_layers * a * b for n, (a, b) in self.linears().items()}
        counts["embed_tokens"] = self.vocab_size * self.hidden_size
        counts["lm_head"] = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        counts["norms"] = (2 * self.num_layers + 1) * self.hidden_size  # two RMSNorms per layer + final
        counts["total"] = sum(counts.values())
        return counts


# Exact values of the meta-llama/Llama-2-{7b,13b,70b}-hf config.json files.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama2-7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
}
_ALIASES = {
    f"meta-llama/llama-2-{s}{c}-hf": f"llama2-{s}" for s in ("7b", "13b", "70b") for c in ("", "-chat")
}


def load_model_shape(path_or_hub_id: str) -> ModelShape:
    """A known name (llama2-7b, meta-llama/Llama-2-7b-hf), a local dir or config.json, or a hub repo id."""
    key = _ALIASES.get(path_or_hub_id.lower(), path_or_hub_id.lower())
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    path = Path(path_or_hub_id)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():  # a hub id: needs network, and the token only from the environment
        from huggingface_hub import hf_hub_download

        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        path = Path(hf_hub_download(path_or_hub_id, "config.json", token=token))
    return ModelShape.from_config(json.loads(path.read_text()), name=path_or_hub_id)


def _targets(targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    names = ALL_LINEAR if targets in ("all-linear", ["all-linear"], ("all-linear",)) else targets
    short = {"output": "o"}  # torchtune calls o_proj output_proj
    out = tuple(short.get(t.removesuffix("_proj"), t.removesuffix("_proj")) for t in names)
    if bad := [t for t in out if t not in ALL_LINEAR]:
        raise ValueError(f"unknown LoRA target(s) {bad}; expected among {ALL_LINEAR} or 'all-linear'")
    return out


def lora_param_count(shape: ModelShape, r: int = 16, targets=ALL_LINEAR) -> int:
    """A (r x in) plus B (out x r) for each targeted linear of each layer."""
    return shape.num_layers * sum(
        r * (a + b) for n, (a, b) in shape.linears().items() if n in _targets(targets)
    )


def _weight_bytes(n: int, out_features: int, quant: str, double_quant: bool, c: int) -> int:
    """Bytes of one frozen linear weight of n params as bitsandbytes stores it."""
    if quant == "none":
        return n * c
    if quant == "int8":  # LLM.int8(): int8 weights + one fp32 scale per output row (SCB)
        return n + 4 * out_features
    blocks = math.ceil(n / NF4_BLOCK)
    if double_quant:  # absmax in 8 bits; fp32 absmax per 256 of them, an fp32 offset, a 256-entry fp32 code
        absmax = blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 + 256 * 4
    else:
        absmax = 4 * blocks
    return math.ceil(n / 2) + absmax + 16 * 4  # two 4-bit values per byte + the 16-entry NF4 code


@dataclass(frozen=True)
class Settings:
    seq_len: int
    micro_batch: int
    world_size: int = 1
    strategy: str = "single"
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype_bytes: int = 2  # bf16 activations and embeddings
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dropout: float = 0.05  # > 0 makes each LoRA module keep a dropped copy of its input + a mask
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    cpu_offload: bool = False  # optimizer states to CPU (FSDP: params and grads too, as its CPUOffload does)
    grad_accum: int = 1
    # "chunked": TRL>=1.x SFTTrainer's fused LM head never materializes the logits (herd's stack);
    # "full": HF ForCausalLMLoss, bf16 logits upcast to fp32 + log_softmax (older stacks, torchtune).
    loss_impl: str = "chunked"
    cpu_ram_efficient_loading: bool = True  # FSDP/ZeRO-3: only rank 0 materializes the checkpoint
    gpus_per_node: int | None = None  # None: all world_size GPUs on one node

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("strategy", self.strategy, STRATEGIES),
            ("quant", self.quant, ("nf4", "int8", "none")),
            ("optimizer", self.optimizer, tuple(OPTIMIZER_BYTES)),
            ("loss_impl", self.loss_impl, ("chunked", "full")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {allowed}")
        if self.strategy == "single" and self.world_size != 1:
            raise ValueError("strategy 'single' needs world_size 1")
        object.__setattr__(self, "lora_targets", _targets(self.lora_targets))


@dataclass
class MemoryPlan:
    shape: ModelShape
    settings: Settings
    breakdown: dict[str, int]  # per GPU, sums to total_per_gpu_bytes
    cpu_load_bytes: int  # peak CPU RAM per node while loading the checkpoint
    cpu_offload_bytes: int  # CPU RAM per node holding offloaded params / optimizer states
    tokens_per_step: int  # global batch * seq_len
    notes: list[str] = field(default_factory=list)

    @property
    def total_per_gpu_bytes(self) -> int:
        return sum(self.breakdown.values())

    def fits(self, device_bytes: int) -> bool:
        return self.total_per_gpu_bytes <= device_bytes

    def format(self, device_bytes: int | None = None) -> str:
        s = self.settings
        quant = s.quant + (" + double quant" if s.quant == "nf4" and s.double_quant else "")
        lines = [
            (
                f"{self.shape.name}: {s.strategy} x{s.world_size}, {quant}, seq {s.seq_len}, micro batch "
                f"{s.micro_batch}, grad accum {s.grad_accum}, LoRA r={s.lora_r} on {','.join(s.lora_targets)}, "
                f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.optimizer}, {s.loss_impl} loss"
            )
        ]
        lines += [f"  {k:<44}{v / GB:>8.2f} GB" for k, v in self.breakdown.items()]
        lines.append(f"  {'total per GPU':<44}{self.total_per_gpu_bytes / GB:>8.2f} GB")
        if device_bytes is not None:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(f"  {verdict} on a {device_bytes / GB:.1f} GB device")
        lines.append(f"  {'CPU RAM per node while loading':<44}{self.cpu_load_bytes / GB:>8.2f} GB")
        if self.cpu_offload_bytes:
            lines.append(f"  {'CPU RAM per node, offloaded state':<44}{self.cpu_offload_bytes / GB:>8.2f} GB")
        lines.append(f"  {'tokens per optimizer step':<44}{self.tokens_per_step:>11,}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _layer_saved_per_token(shape: ModelShape, s: Settings) -> float:
    """Bytes autograd keeps per token for one decoder layer (HF Llama, SDPA/flash attention).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1) give
    s*b*h*(34 + 5*a*s/h) bytes per GPT layer. Adapted to HF Llama: no dropout masks; flash/SDPA keeps no
    s^2 scores (only an fp32 logsumexp per head); GQA keeps K and V at kv width; SwiGLU keeps gate, silu(gate),
    up and their product (4 x intermediate); RMSNorm upcasts to fp32 and keeps that copy; o_proj's input is a
    contiguous copy of the attention output. LoRA adds its A output and, with dropout, a dropped input copy
    plus a bool mask per targeted module.
    """
    c, h, i = s.compute_dtype_bytes, shape.hidden_size, shape.intermediate_size
    kv = shape.num_kv_heads * shape.hd
    attn = c * (4 * h + 2 * kv) + 4 * h + 4 * shape.num_heads  # norm out, q, k, v, sdpa out, o_proj in; lse
    mlp = c * (h + 4 * i) + 4 * h  # norm out, gate, silu, up, product; fp32 norm copies counted in each
    lora = 0
    for name, (fan_in, _) in shape.linears().items():
        if name in s.lora_targets:
            lora += c * s.lora_r + ((c + 1) * fan_in if s.lora_dropout > 0 else 0)
    return attn + mlp + lora


def estimate_settings(shape: ModelShape, s: Settings) -> MemoryPlan:
    """The plan for one Settings; estimate() is the keyword-argument front door."""
    c, w, L, h, V = s.compute_dtype_bytes, s.world_size, shape.num_layers, shape.hidden_size, shape.vocab_size
    counts, notes = shape.param_counts(), []
    sharded = s.strategy in SHARDED
    offload_params = s.strategy == "zero3_offload" or (s.strategy == "fsdp" and s.cpu_offload)
    offload_optim = s.cpu_offload or s.strategy == "zero3_offload"

    layer_w = sum(_weight_bytes(a * b, b, s.quant, s.double_quant, c) for a, b in shape.linears().values())
    linear_w = L * layer_w
    other_w = (counts["embed_tokens"] + counts["lm_head"] + counts["norms"]) * c  # not quantized by bnb
    lora = lora_param_count(shape, s.lora_r, s.lora_targets)
    lora_p, lora_g = lora * LORA_PARAM_BYTES, lora * LORA_PARAM_BYTES  # fp32 grads of fp32 params
    optim = int(lora * OPTIMIZER_BYTES[s.optimizer])

    # Per GPU. Offloaded params live on the CPU; only the gathered units come to the GPU.
    keep, shard = (0 if offload_params else 1), (w if sharded else 1)
    b = {"quantized linear weights" if s.quant != "none" else "linear weights": keep * linear_w // shard}
    b["embeddings + lm_head + norms"] = keep * other_w // shard
    if sharded:
        # FSDP keeps the root unit (embeddings, lm_head, final norm) gathered through forward and backward, and
        # holds the current decoder layer plus the prefetched one unsharded.
        b["gathered unsharded params (root + 2 layers)"] = other_w + 2 * layer_w
    b["LoRA params (fp32)"] = keep * lora_p // shard
    b["LoRA grads (fp32)"] = keep * lora_g // (w if sharded or s.strategy == "zero2" else 1)
    b["optimizer states"] = 0 if offload_optim else optim // (1 if s.strategy in ("single", "ddp") else w)
    if s.strategy == "ddp":
        b["DDP gradient buckets"] = lora_g  # DDP reduces through a flat copy of the grads
    if s.strategy in DS_REDUCE_BUFFERS:
        b["DeepSpeed reduce buckets"] = DS_REDUCE_BUFFERS[s.strategy] * DS_REDUCE_BUCKET * c

    tokens = s.micro_batch * s.seq_len
    per_layer = _layer_saved_per_token(shape, s)
    # Backward transients: grads of the residual stream in and out (2 x h), of the gate and up branches
    # (2 x intermediate), plus one weight dequantized to bf16 by bitsandbytes for grad_input.
    transient = tokens * c * (2 * h + 2 * shape.intermediate_size)
    if s.quant != "none":
        transient += c * max(a * bb for a, bb in shape.linears().values())
    if s.gradient_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        stored, layer_phase = L * tokens * c * h, int(tokens * per_layer) + transient
        b["activations: checkpointed layer inputs"] = stored
    else:
        stored, layer_phase = int(L * tokens * per_layer), transient
        b["activations: all layers"] = stored
    final_norm = tokens * (4 + c) * h  # fp32 copy kept by the final RMSNorm + its output
    if s.loss_impl == "full":  # bf16 logits -> fp32 copy -> log_softmax out; backward: 3 fp32 N x V live
        loss_phase = final_norm + tokens * V * 12
    else:  # TRL fused head: one [4096, 32768] bf16 tile, masked hidden copy, fp32 grad of hidden
        tile = min(tokens, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE) * c
        loss_phase = final_norm + tile + tokens * h * (c + 4)
    if loss_phase >= layer_phase:
        b["peak transient: logits + loss"] = loss_phase
    else:
        b[f"peak transient: layer {'recompute + ' * s.gradient_checkpointing}backward"] = layer_phase
    frag = FRAGMENTATION[s.gradient_checkpointing]
    b[f"allocator fragmentation (x{frag:.2f})"] = int(sum(b.values()) * (frag - 1))
    b["CUDA context" + (" + NCCL buffers" if w > 1 else "")] = CUDA_CONTEXT + (NCCL_BUFFERS if w > 1 else 0)

    local = min(w, s.gpus_per_node or w)
    ckpt = counts["total"] * 2  # the HF checkpoints are fp16 safetensors
    if sharded:
        load = ckpt if s.cpu_ram_efficient_loading else local * ckpt
    else:  # each rank streams shard by shard, quantizing onto its GPU
        load = local * min(ckpt, HF_SHARD_BYTES)
    offloaded = (linear_w + other_w) // w if offload_params else 0
    offloaded += (optim // (w if s.strategy != "ddp" else 1)) if offload_optim else 0
    offloaded += (lora_p + lora_g) // w if offload_params else 0
    if s.strategy in ("single", "ddp") and s.cpu_offload:
        notes.append("single/ddp cpu_offload assumes an optimizer that keeps its states on CPU")
    if s.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer states are counted on the GPU; under pressure they page to CPU")
    tokens_per_step = s.micro_batch * w * s.grad_accum * s.seq_len
    return MemoryPlan(shape, s, b, load, local * offloaded, tokens_per_step, notes)


def estimate(shape: ModelShape | str, **settings) -> MemoryPlan:
    """estimate(shape, *, seq_len, micro_batch, world_size=1, strategy="single", quant="nf4", ...); see Settings."""
    shape = load_model_shape(shape) if isinstance(shape, str) else shape
    return estimate_settings(shape, Settings(**settings))


def suggest(
    shape: ModelShape | str, settings: Settings, device_bytes: int, gpus_available: int | None = None
) -> str | None:
    """None when the plan already fits; else one line naming the cheapest change that fits.

    Tried in order: halve the micro batch (accumulation keeps the global batch), checkpointing on, a shorter
    sequence, FSDP over more GPUs, offload. When no single change fits, the micro batch 1 + checkpointing on
    combination is tried under each later change.
    """
    shape = load_model_shape(shape) if isinstance(shape, str) else shape
    s = settings
    if estimate_settings(shape, s).fits(device_bytes):
        return None
    cheap: list[tuple[str, dict]] = []  # (label, Settings fields to replace)
    later: list[tuple[str, dict]] = []
    mb = s.micro_batch
    while mb > 1:
        mb //= 2
        accum = math.ceil(s.grad_accum * s.micro_batch / mb)
        label = f"micro_batch {s.micro_batch} -> {mb} (grad_accum {s.grad_accum} -> {accum})"
        cheap.append((label, {"micro_batch": mb, "grad_accum": accum}))
    if not s.gradient_checkpointing:
        cheap.append(("gradient_checkpointing off -> on", {"gradient_checkpointing": True}))
    seq = s.seq_len
    while seq > 512:
        seq //= 2
        later.append((f"seq_len {s.seq_len} -> {seq}", {"seq_len": seq}))
    n = 2
    while gpus_available and n <= gpus_available:
        if n > s.world_size or s.strategy not in SHARDED:
            later.append(
                (f"strategy {s.strategy} x{s.world_size} -> fsdp x{n}", {"strategy": "fsdp", "world_size": n})
            )
        n *= 2
    if s.strategy == "fsdp":
        later.append(("fsdp cpu_offload on", {"cpu_offload": True}))
    elif s.strategy != "zero3_offload":
        later.append(
            (f"strategy {s.strategy} -> zero3_offload", {"strategy": "zero3_offload", "cpu_offload": False})
        )
    tries = [(label, replace(s, **changes)) for label, changes in cheap + later]
    if cheap:  # the cheap changes all at once (micro batch 1, checkpointing on), under each dearer one
        base = replace(s, micro_batch=1, grad_accum=s.grad_accum * s.micro_batch, gradient_checkpointing=True)
        parts = [label for label, changes in cheap if changes.get("micro_batch", 1) == 1]
        tries += [(", ".join([*parts, label]), replace(base, **changes)) for label, changes in later]
    for label, candidate in tries:
        plan = estimate_settings(shape, candidate)
        if plan.fits(device_bytes):
            return f"{label} fits ({plan.total_per_gpu_bytes / GB:.1f} GB of {device_bytes / GB:.1f} GB)"
    return f"nothing tried fits in {device_bytes / GB:.1f} GB"


TABLE_DEVICES = ((1, 24), (1, 80), (2, 24), (8, 80))  # (GPUs, GB each)


def markdown_table(
    models: tuple[str, ...] = ("llama2-7b", "llama2-13b", "llama2-70b"),
    devices: tuple[tuple[int, int], ...] = TABLE_DEVICES,
    seq_lens: tuple[int, ...] = (2048, 4096),
) -> str:
    """The README table: herd's defaults, micro batch 1, single on one GPU and FSDP on several."""
    defaults = Settings(seq_len=0, micro_batch=1)
    caption = (
        f"Predicted peak memory per GPU (GB = 2^30 bytes), micro batch 1, NF4 + double quant, LoRA "
        f"r={defaults.lora_r} on all linear layers, gradient checkpointing "
        f"{'on' if defaults.gradient_checkpointing else 'off'}, {defaults.optimizer}, "
        f"generated by `python -m herd.memory --table`."
    )
    rows = [
        caption,
        "",
        "| Model | GPUs | seq | strategy | micro batch | GB per GPU | fits | cheapest change if not |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in models:
        shape = load_model_shape(key)
        for gpus, gb in devices:
            for seq in seq_lens:
                s = replace(
                    defaults, seq_len=seq, world_size=gpus, strategy="single" if gpus == 1 else "fsdp"
                )
                plan = estimate_settings(shape, s)
                fits = plan.fits(gb * GB)
                change = "" if fits else (suggest(shape, s, gb * GB, gpus) or "").split(" fits (")[0]
                rows.append(
                    f"| {shape.name} | {gpus}×{gb} GB | {seq} | {s.strategy} | {s.micro_batch} | "
                    f"{plan.total_per_gpu_bytes / GB:.1f} | {'yes' if fits else 'no'} | {change} |"
                )
    return "\n".join(rows) + "\n"


CHOICES = {
    "strategy": STRATEGIES,
    "quant": ("nf4", "int8", "none"),
    "optimizer": tuple(OPTIMIZER_BYTES),
    "loss_impl": ("chunked", "full"),
}
CLI_DEFAULTS = {"seq_len": 2048, "micro_batch": 1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m herd.memory", description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true", help="print the README memory table and exit")
    p.add_argument("--model", default="llama2-7b", help="llama2-7b|13b|70b, a local dir or a hub id")
    p.add_argument("--device-gb", type=float, help="GPU memory (GB = 2^30 bytes) to check the plan against")
    p.add_argument("--gpus-available", type=int, help="GPUs a suggestion may spread the run over")
    for f in fields(Settings):  # one flag per Settings field: --seq-len, --no-double-quant, ...
        flag, default = "--" + f.name.replace("_", "-"), CLI_DEFAULTS.get(f.name, f.default)
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "lora_targets":
            p.add_argument(flag, default="all-linear", help="comma-separated, e.g. q_proj,v_proj")
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), default=default)
    args = vars(p.parse_args(argv))
    if args.pop("table"):
        print(markdown_table(), end="")
        return
    shape, device_gb, gpus = (
        load_model_shape(args.pop("model")),
        args.pop("device_gb"),
        args.pop("gpus_available"),
    )
    args["lora_targets"] = (
        "all-linear" if args["lora_targets"] == "all-linear" else args["lora_targets"].split(",")
    )
    s = Settings(**args)
    device = int(device_gb * GB) if device_gb else None
    print(estimate_settings(shape, s).format(device))
    if device is not None and (line := suggest(shape, s, device, gpus)):
        print(f"suggestion: {line}")


if __name__ == "__main__":
    main()
