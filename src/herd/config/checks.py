"""Value checks declared next to each schema field, and the walk that applies them to a composed config.

Types, Enums and unknown keys are refused by Hydra when it composes; what a type cannot say (a batch of 0,
a dropout above 1, an optimizer name transformers does not know) is declared on the field:

    micro_batch_size: int = checked(4, at_least=1)

and refused in one line naming the key, the value and what is allowed, before anything loads or is
written. Names only a library knows (optimizers, schedulers, attention kernels) are checked by
`check_library_names`, which imports transformers and so runs inside the task, still before any loading.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from herd.errors import ConfigError


@dataclass(frozen=True)
class Check:
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    one_of: tuple[str, ...] | None = None
    rule: Callable[[Any], str | None] | None = None  # returns what is wrong, or None

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (None, and values of other types, are the type checker's business)."""
        if value is None:
            return None
        if self.one_of is not None:
            values = value if isinstance(value, (list, ListConfig)) else [value]
            for item in values:
                if str(item) not in self.one_of:
                    return f"'{item}' is not one of: {', '.join(self.one_of)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                return "must be a number, got nan"
            for bound, fails, words in ((self.at_least, value < (self.at_least or 0), ">="),
                                        (self.above, value <= (self.above or 0), ">"),
                                        (self.at_most, value > (self.at_most or 0), "<="),
                                        (self.below, value >= (self.below or 0), "<")):
                if bound is not None and fails:
                    return f"must be {words} {bound:g}"
        return self.rule(value) if self.rule else None


def checked(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **check: Any) -> Any:
    """A dataclass field with a default (or a default factory) and the Check built from `check`."""
    if "one_of" in check:
        check["one_of"] = tuple(check["one_of"])
    metadata = {"check": Check(**check)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def first_violation(node: Any, prefix: str = "") -> str | None:
    """The first value in a composed config that breaks its field's Check, as one line; None if all hold.
    Interpolations that cannot be resolved yet (Hydra's ${hydra:...} outside a run) are left alone. Lists of
    schemas (data.sources) are walked too, their items named as overrides name them: data.sources.1.weight."""
    if isinstance(node, ListConfig) and not node._is_none() and not node._is_missing():
        for index in range(len(node)):
            found = first_violation(node._get_node(index), f"{prefix}{index}.")
            if found:
                return found
        return None
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return None
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in node:
        full_key = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # an interpolation only a running Hydra job can resolve
            continue
        check = fields[key].metadata.get("check") if key in fields else None
        if check is not None:
            plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) \
                else value
            problem = check.problem(plain.value if hasattr(plain, "value") else plain)
            if problem:
                return f"{full_key}={_show(plain)}: {problem}"
        found = first_violation(value, f"{full_key}.")
        if found:
            return found
    return None


def _show(value: Any) -> str:
    return str(value.value if hasattr(value, "value") else value)


def eval_size_rule(value: float) -> str | None:
    if value < 0:
        return "must be a fraction in [0, 1) or a whole count >= 1"
    if value >= 1 and value != int(value):
        return "above 1 it is a count of samples and must be whole (e.g. 100), below 1 a fraction (e.g. 0.05)"
    return None


def check_library_names(optimizer: str | None = None, scheduler: str | None = None,
                        attn_implementation: str | None = None) -> None:
    """Names that only transformers knows: refused in one line listing what it accepts. Imports
    transformers (seconds), so it runs in the task, before anything loads."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    known = {
        "train.optimizer": (optimizer, sorted(o.value for o in OptimizerNames)),
        "train.lr_scheduler": (scheduler, sorted(s.value for s in SchedulerType)),
        "model.attn_implementation": (attn_implementation, attention_implementations()),
    }
    for key, (value, allowed) in known.items():
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value} is not one transformers accepts: {', '.join(allowed)}")


def attention_implementations() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # "paged|..." entries are the generation engine's paged kernels, not a model-loading choice.
    return sorted({"eager", *(name for name in ALL_ATTENTION_FUNCTIONS if "|" not in name)})
