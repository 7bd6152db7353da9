"""The memory model: per-GPU bytes of a QLoRA run from its shape and settings (the formulas and constants).

Units: every size is in bytes; "GB" in printed output means 2**30 bytes, the unit nvidia-smi and
torch.cuda memory stats report, and the one in which a "24 GB" card (RTX 4090, A10) has 24.0.

Peak per GPU = (static + stored activations + max(loss phase, layer-backward phase)) * FRAGMENTATION
               + CUDA_CONTEXT (+ NCCL_BUFFERS on several GPUs)
The two phases do not overlap: logits are freed before the last layer's backward starts, and the caching
allocator reuses their blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from herd.config.train import SHARDED as SHARDED_STRATEGIES
from herd.config.train import Strategy
from herd.memory.shape import ALL_LINEAR, ModelShape, _targets, load_model_shape, lora_param_count

GB = 2**30
# Constants measured on one H100 (torch 2.11, CUDA 13, bitsandbytes 0.50.2, transformers 5.17, PEFT 0.21) with a
# random-init Llama-2-7B: 11 QLoRA runs (micro batch 1-4, seq 1024-4096, r 8/16, checkpointing on/off, full and
# TRL-fused loss), listed in tests/test_memory.py::FIT_H100
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
STRATEGIES = tuple(s.value for s in Strategy)  # the memory model takes strategies by name
SHARDED = tuple(s.value for s in SHARDED_STRATEGIES)  # weights and LoRA states divided by world size
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob tile of the fused LM head
# DeepSpeed's ZeRO gradient reduction: with contiguous_gradients (herd's config, training/strategy.py) every
# rank allocates reduce_bucket_size elements of the communication dtype (the params', bf16 under bf16) on the
# GPU whatever the trainable parameter count: twice under ZeRO-2 with overlap_comm (double buffering,
# stage_1_and_2.py setup_buckets), once under ZeRO-3 (stage3.py). herd's config leaves DeepSpeed's default.
DS_REDUCE_BUCKET = 500_000_000  # elements: deepspeed.runtime.zero.config reduce_bucket_size default
DS_REDUCE_BUFFERS = {"zero2": 2, "zero3": 1, "zero3_offload": 1}
# Preference tuning (DPO): what the reference policy costs. adapter_off: the policy's base with the adapter
# switched off (a no-grad forward only); adapter_copy: + a frozen copy of the starting (SFT) adapter;
# separate: + a second quantized base (with the SFT adapter when there is one: separate_adapter).
REFERENCES = ("none", "adapter_off", "adapter_copy", "separate", "separate_adapter")


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
    # DPO: each sample (micro_batch counts samples) is a pair, its chosen and rejected sequences in one batch,
    # and the reference policy runs a no-grad forward over both (REFERENCES); SFT: 1 and "none".
    sequences_per_sample: int = 1
    reference: str = "none"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("strategy", self.strategy, STRATEGIES),
            ("quant", self.quant, ("nf4", "int8", "none")),
            ("optimizer", self.optimizer, tuple(OPTIMIZER_BYTES)),
            ("loss_impl", self.loss_impl, ("chunked", "full")),
            ("reference", self.reference, REFERENCES),
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
                + (f", DPO pairs ({s.sequences_per_sample} sequences each), reference {s.reference}"
                   if s.reference != "none" else "")
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


@dataclass(frozen=True)
class _Sizes:
    """Whole-model bytes of one run's weights and trainable state, before any sharding."""

    layer_w: int  # one decoder layer's linear weights as stored
    linear_w: int  # all layers' linear weights
    other_w: int  # embeddings, lm_head, norms: not quantized by bitsandbytes
    lora_p: int
    lora_g: int
    optim: int


def _sizes(shape: ModelShape, s: Settings) -> _Sizes:
    counts, c = shape.param_counts(), s.compute_dtype_bytes
    layer_w = sum(_weight_bytes(a * b, b, s.quant, s.double_quant, c) for a, b in shape.linears().values())
    lora = lora_param_count(shape, s.lora_r, s.lora_targets)
    other_w = (counts["embed_tokens"] + counts["lm_head"] + counts["norms"]) * c
    lora_bytes = lora * LORA_PARAM_BYTES  # params, and their fp32 grads alike
    return _Sizes(layer_w, shape.num_layers * layer_w, other_w, lora_bytes, lora_bytes,
                  int(lora * OPTIMIZER_BYTES[s.optimizer]))


def _offloads(s: Settings) -> tuple[bool, bool]:
    """(params offloaded, optimizer states offloaded)."""
    return (s.strategy == "zero3_offload" or (s.strategy == "fsdp" and s.cpu_offload),
            s.cpu_offload or s.strategy == "zero3_offload")


def _states_per_gpu(s: Settings, z: _Sizes) -> dict[str, int]:
    """Weights, LoRA params and grads, optimizer states on one GPU. Offloaded params live on the CPU; only
    the gathered units come to the GPU."""
    w, sharded = s.world_size, s.strategy in SHARDED
    offload_params, offload_optim = _offloads(s)
    keep, shard = (0 if offload_params else 1), (w if sharded else 1)
    b = {"quantized linear weights" if s.quant != "none" else "linear weights": keep * z.linear_w // shard}
    b["embeddings + lm_head + norms"] = keep * z.other_w // shard
    if sharded:
        # FSDP keeps the root unit (embeddings, lm_head, final norm) gathered through forward and backward, and
        # holds the current decoder layer plus the prefetched one unsharded.
        b["gathered unsharded params (root + 2 layers)"] = z.other_w + 2 * z.layer_w
    b["LoRA params (fp32)"] = keep * z.lora_p // shard
    b["LoRA grads (fp32)"] = keep * z.lora_g // (w if sharded or s.strategy == "zero2" else 1)
    b["optimizer states"] = 0 if offload_optim else z.optim // (1 if s.strategy in ("single", "ddp") else w)
    if s.strategy == "ddp":
        b["DDP gradient buckets"] = z.lora_g  # DDP reduces through a flat copy of the grads
    if s.strategy in DS_REDUCE_BUFFERS:
        b["DeepSpeed reduce buckets"] = DS_REDUCE_BUFFERS[s.strategy] * DS_REDUCE_BUCKET * s.compute_dtype_bytes
    if s.reference in ("separate", "separate_adapter"):  # a second quantized base, placed like the first
        b["reference model weights"] = keep * (z.linear_w + z.other_w) // shard
    if s.reference in ("adapter_copy", "separate_adapter"):  # the frozen starting adapter: no grads, no states
        b["reference adapter (fp32)"] = keep * z.lora_p // shard
    return b


def _reference_forward(shape: ModelShape, s: Settings, tokens: int) -> int:
    """Peak transient of the reference policy's no-grad forward, which runs while the policy's activations
    are held: one decoder layer's working set at a time (attention block or MLP block, whichever is larger:
    residual, norm output and the block's intermediates), one weight dequantized, then the LM head's tile."""
    c, h, i = s.compute_dtype_bytes, shape.hidden_size, shape.intermediate_size
    kv = shape.num_kv_heads * shape.hd
    block = max(c * (4 * h + 2 * kv), c * (2 * h + 3 * i))
    dequantized = c * max(a * bb for a, bb in shape.linears().values()) if s.quant != "none" else 0
    return tokens * block + dequantized


def _activations_per_gpu(shape: ModelShape, s: Settings) -> dict[str, int]:
    """Stored activations and the larger of the two transient phases (loss head, layer backward)."""
    c, h, V = s.compute_dtype_bytes, shape.hidden_size, shape.vocab_size
    tokens = s.micro_batch * s.sequences_per_sample * s.seq_len
    per_layer = _layer_saved_per_token(shape, s)
    # Backward transients: grads of the residual stream in and out (2 x h), of the gate and up branches
    # (2 x intermediate), plus one weight dequantized to bf16 by bitsandbytes for grad_input.
    transient = tokens * c * (2 * h + 2 * shape.intermediate_size)
    if s.quant != "none":
        transient += c * max(a * bb for a, bb in shape.linears().values())
    b = {}
    if s.gradient_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        layer_phase = int(tokens * per_layer) + transient
        b["activations: checkpointed layer inputs"] = shape.num_layers * tokens * c * h
    else:
        layer_phase = transient
        b["activations: all layers"] = int(shape.num_layers * tokens * per_layer)
    final_norm = tokens * (4 + c) * h  # fp32 copy kept by the final RMSNorm + its output
    if s.loss_impl == "full":  # bf16 logits -> fp32 copy -> log_softmax out; backward: 3 fp32 N x V live
        loss_phase = final_norm + tokens * V * 12
    else:  # TRL fused head: one [4096, 32768] bf16 tile, masked hidden copy, fp32 grad of hidden
        tile = min(tokens, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE) * c
        loss_phase = final_norm + tile + tokens * h * (c + 4)
    phases = {"peak transient: logits + loss": loss_phase,
               f"peak transient: layer {'recompute + ' * s.gradient_checkpointing}backward": layer_phase}
    if s.reference != "none":
        phases["peak transient: reference forward (no grad)"] = _reference_forward(shape, s, tokens)
    name = max(phases, key=phases.get)  # the first of equals: loss, layer, reference
    b[name] = phases[name]
    return b


def _cpu_ram(shape: ModelShape, s: Settings, z: _Sizes) -> tuple[int, int]:
    """(peak CPU RAM per node while loading, CPU RAM per node holding offloaded state)."""
    w, sharded = s.world_size, s.strategy in SHARDED
    offload_params, offload_optim = _offloads(s)
    local = min(w, s.gpus_per_node or w)
    ckpt = shape.param_counts()["total"] * 2  # the HF checkpoints are fp16 safetensors
    if sharded:
        load = ckpt if s.cpu_ram_efficient_loading else local * ckpt
    else:  # each rank streams shard by shard, quantizing onto its GPU
        load = local * min(ckpt, HF_SHARD_BYTES)
    offloaded = (z.linear_w + z.other_w) // w if offload_params else 0
    offloaded += (z.optim // (w if s.strategy != "ddp" else 1)) if offload_optim else 0
    offloaded += (z.lora_p + z.lora_g) // w if offload_params else 0
    return load, local * offloaded


def estimate_settings(shape: ModelShape, s: Settings) -> MemoryPlan:
    """The plan for one Settings; estimate() is the keyword-argument front door."""
    sizes = _sizes(shape, s)
    b = {**_states_per_gpu(s, sizes), **_activations_per_gpu(shape, s)}
    frag = FRAGMENTATION[s.gradient_checkpointing]
    b[f"allocator fragmentation (x{frag:.2f})"] = int(sum(b.values()) * (frag - 1))
    w = s.world_size
    b["CUDA context" + (" + NCCL buffers" if w > 1 else "")] = CUDA_CONTEXT + (NCCL_BUFFERS if w > 1 else 0)
    load, offloaded = _cpu_ram(shape, s, sizes)
    notes = []
    if s.strategy in ("single", "ddp") and s.cpu_offload:
        notes.append("single/ddp cpu_offload assumes an optimizer that keeps its states on CPU")
    if s.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer states are counted on the GPU; under pressure they page to CPU")
    tokens_per_step = s.micro_batch * s.sequences_per_sample * w * s.grad_accum * s.seq_len
    return MemoryPlan(shape, s, b, load, offloaded, tokens_per_step, notes)


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
