"""The `tiny` model: a 2-layer Llama-2 look-alike with its own tokenizer, built locally and deterministically.

Tests and smoke runs need a real Llama checkpoint directory (config, safetensors, tokenizer with the Llama-2
chat template) but there is no hub access. This builds one in about a second, byte-identical every time,
and caches it: delete the directory to force a rebuild.

    python -m herd.tiny ~/.cache/herd/tiny     # prints the path
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from herd.chat import LLAMA2_CHAT_TEMPLATE
from herd.paths import share_per_umask
from herd.sample_data import generate_guanaco_rows, generate_llama2_rows

if TYPE_CHECKING:  # transformers/torch import in ~6 s; only the build needs them
    from transformers import LlamaForCausalLM, LlamaTokenizer

COMPLETE_MARKER = ".herd-complete"  # written last, just before the atomic rename
BUILD_VERSION = 1  # bump when the recipe below changes: an older cached build is then refused, not reused
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama-2
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))  # ids 3..258, the byte-fallback pieces, as in Llama-2
MODEL_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, so code paths that assume MHA get exercised
    "intermediate_size": 176,
    "max_position_embeddings": 2048,
}


def is_complete(path: str | Path) -> bool:
    """True when `path` holds a finished tiny-model build of this BUILD_VERSION."""
    path = Path(path)
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    # An older recipe's build counts as incomplete, so a stale cache fails loudly instead of being reused.
    return marker.get("build_version") == BUILD_VERSION and all((path / n).is_file() for n in REQUIRED_FILES)


def ensure_tiny_model(path: str | Path) -> Path:
    """Return `path` holding the tiny model, building it first if it is not there yet.

    The build goes to a temporary sibling directory that is renamed into place, so a reader never sees a
    half-written model; when two processes race, the loser discards its copy and uses the winner's.
    (Process-safe, not thread-safe: the seeded init uses torch's global RNG.)
    """
    path = Path(path).expanduser().resolve()
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        build_tiny_model(staging)
        share_per_umask(staging)  # a shared cache, readable by others
        try:
            # rename() replaces an empty directory (e.g. a fixture's mkdir) but fails on a non-empty one.
            os.rename(staging, path)
        except OSError:
            if not is_complete(path):
                raise FileExistsError(
                    f"{path} exists but is not a complete tiny model (build version {BUILD_VERSION}); remove it"
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def training_texts() -> list[str]:
    """The corpus the tokenizer is trained on: the bundled guanaco conversations and their Llama-2 form."""
    return [row["text"] for row in generate_guanaco_rows()] + [row["text"] for row in generate_llama2_rows()]


def build_tokenizer() -> LlamaTokenizer:
    """Train a Llama-style BPE tokenizer (byte fallback, "▁" word prefix) and wrap it as a LlamaTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    trainer_model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Specials are split out of the text first, so "<s>[INST]" trains "[INST]" without a "▁" prefix, which is
    # how LlamaTokenizer (prepend_scheme "first") encodes it. split=True keeps merges inside words, as
    # sentencepiece does; LlamaTokenizer then applies them with split=False and gets the same pieces.
    trainer_model.add_special_tokens(list(SPECIAL_TOKENS))
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(BYTE_TOKENS), special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    trainer_model.train_from_iterator(training_texts(), trainer)
    trained = json.loads(trainer_model.to_str())["model"]

    # Llama-2 order: specials, then the 256 byte pieces, then the learned pieces.
    learned = sorted(
        (token for token in trained["vocab"] if token not in SPECIAL_TOKENS), key=trained["vocab"].get
    )
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *BYTE_TOKENS, *learned])}
    merges = [tuple(merge) for merge in trained["merges"]]
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        legacy=False,
        # Plain encode adds <s> like Llama-2; herd encodes formatted text with add_special_tokens=False.
        add_bos_token=True,
        add_eos_token=False,
        pad_token="<unk>",  # Llama-2 has no pad token; <unk> is the usual stand-in (masked by attention)
        padding_side="right",  # as in Llama-2's tokenizer_config; transformers 5's class default is left
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM in float32, the same weights for the same seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,  # Llama-2 has separate lm_head weights; LoRA/merge code must see both
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **MODEL_SHAPE,
    )
    # fork_rng: seed for a reproducible init without disturbing the caller's random state; init in float32
    # whatever the caller's default dtype, since a bf16 init cast up would give different bytes.
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


def build_tiny_model(path: str | Path) -> Path:
    """Build the tokenizer and model into `path` (which may exist, empty) and mark it complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_model(len(tokenizer)).save_pretrained(path, safe_serialization=True)
    (path / COMPLETE_MARKER).write_text(json.dumps({"build_version": BUILD_VERSION}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (once) the tiny Llama test model and print its path.")
    parser.add_argument("path", help="directory to build into, reused if already complete")
    print(ensure_tiny_model(parser.parse_args(argv).path))


if __name__ == "__main__":
    main()
