"""Model FLOPs and parameter arithmetic for MFU, and each rank's peak memory."""

from __future__ import annotations

import math
import os

from herd import dist

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets; the sparse numbers are 2x these).
# First match of the substring in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)
PEAK_FLOPS_ENV = "HERD_PEAK_FLOPS"  # per-device peak FLOP/s for devices not in the table (CPUs, other GPUs)


def count_parameters(model) -> tuple[int, int]:
    """(N_base, N_lora): frozen parameters that take part in matmuls, and trainable ones.

    bitsandbytes packs two 4-bit weights per byte, so a Params4bit tensor's numel() is half the real count:
    the logical shape lives in its quant_state. The input embedding is a lookup, not a matmul, so it is left
    out (the LM head is counted unless tied to it). FSDP2's DTensor numel() is already the global size."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    n_base = n_lora = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            numel = math.prod(quant_state.shape)
        else:  # a ZeRO-3 partitioned parameter is empty locally; ds_numel is its full size
            numel = getattr(param, "ds_numel", None) or param.numel()
        if param.requires_grad:
            n_lora += numel
        elif id(param) not in skip:
            n_base += numel
    return n_base, n_lora


def flops_per_token(n_base: int, n_lora: int, layers: int, hidden: int, seq_len: int,
                    reference_forward: bool = False) -> float:
    """Training FLOPs per token (model FLOPs, so activation-checkpoint recomputation is NOT counted: MFU,
    not hardware FLOPs utilization):

        4 * N_base      frozen weights: forward 2N, backward through the activations 2N (no weight grads)
      + 6 * N_lora      trainable LoRA weights: forward 2N, backward 4N (activation and weight grads)
      + 12 * L * h * s  attention scores and values: (QK^T + AV) 2 matmuls x 2 FLOPs x h x s per layer
                        forward, x3 for forward + backward (PaLM, Chowdhery et al. 2022, appendix B)

    s is the configured max sequence length, an upper bound on the mean context: MFU is slightly
    overstated for short conversations (for 7B at s=1024 the attention term is ~5% of the total).

    reference_forward (DPO): every token also goes through the reference policy's forward, 2 * N_base +
    4 * L * h * s more (the reference adapter, where there is one, is LoRA-sized: left out)."""
    training = 4 * n_base + 6 * n_lora + 12 * layers * hidden * seq_len
    return training + (2 * n_base + 4 * layers * hidden * seq_len if reference_forward else 0)


def device_peak_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: $HERD_PEAK_FLOPS, else the table, else None (MFU omitted)."""
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def peak_memory_bytes() -> int:
    """This process's peak: CUDA memory allocated by torch on its device, else the CPU peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def peak_reserved_bytes() -> int | None:
    """This process's peak CUDA memory reserved by torch's caching allocator (what the planner predicts,
    with the CUDA context); None off CUDA."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_reserved())
    return None


def gather_peak_memory() -> list[tuple[int, int | None]]:
    """Every rank's peak memory, (allocated or CPU RSS, CUDA reserved or None). Collective: call on all ranks at
    the same point (Trainer's on_log for a training log is: the Trainer itself gathers the loss there)."""
    return [(int(a), r) for a, r in dist.all_gather_objects((peak_memory_bytes(), peak_reserved_bytes()))]


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilization: the model FLOPs done per second over what all the devices could do."""
    return tokens_per_s * flops_per_token / (peak_flops_per_device * devices)
