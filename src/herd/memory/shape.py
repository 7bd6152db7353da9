"""Model shapes the memory model reads: Llama-2's own, or any config.json (local or hub), and LoRA's size on them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


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
