"""The typed schema of preference tuning (DPO): the `method` switch and the `dpo:` section of a train job.

`method=dpo` (conf/method/dpo.yaml) selects it; every knob below is checked when the config composes, in one
line, like the rest of the train schema (herd.config.checks). The rules that read these fields together
(a finished SFT run to start from, the strategies DPO runs under) live in herd.training.dpo.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from herd.config.checks import checked


class Method(str, Enum):
    sft = "sft"  # supervised fine-tuning on conversations (data.format)
    dpo = "dpo"  # direct preference optimization on prompt / chosen / rejected pairs


class Reference(str, Enum):
    # The reference policy shares the policy's 4-bit base: from the base, the base with the adapter switched
    # off; from dpo.sft_run, the base with a frozen copy of the SFT adapter (LoRA-sized, no second base).
    shared = "shared"
    separate = "separate"  # a second 4-bit base (+ the SFT adapter, frozen) in memory: the plain TRL layout


# TRL 1.16 DPOConfig.loss_type values that score one pair at a time (the unpaired/sorted ones are left out:
# their per-batch sorting makes a run depend on how pairs are split over micro batches and ranks).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm")


def label_smoothing_rule(value: float) -> str | None:
    return None if 0 <= value < 0.5 else "must be in [0, 0.5) (the probability that a preference label is flipped)"


@dataclass
class DpoConfig:
    """Read only with method=dpo. Data: rows of prompt/chosen/rejected (herd.preference has the layouts)."""

    beta: float = checked(0.1, above=0)  # how far the policy may move from the reference; higher: less
    loss_type: str = checked("sigmoid", one_of=LOSS_TYPES)  # sigmoid = the DPO paper's loss
    label_smoothing: float = checked(0.0, rule=label_smoothing_rule)  # robust / exo_pair: assumed label noise
    # Tokens; a pair whose prompt is longer is a bad row ("prompt_too_long"), as a pair longer than
    # data.max_seq_len is ("too_long"): herd never truncates a prompt or an answer. null: only max_seq_len.
    max_prompt_length: int | None = checked(None, at_least=1)
    reference: Reference = Reference.shared
    # A finished SFT run directory (train's output_dir): its adapter is the starting policy and, frozen, the
    # reference. null: a fresh LoRA adapter on the base, the base itself as reference.
    sft_run: str | None = None
