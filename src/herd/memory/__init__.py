"""Memory planner: per-GPU bytes of a QLoRA run, computed from the model's shape alone (no torch import).

Modules: shape (model shapes, LoRA size), model (the formulas, their units and the constants they were
fitted with), cli (`python -m herd.memory`, the README table). This package re-exports the public names.
"""

from herd.memory.model import (
    CUDA_CONTEXT,
    GB,
    MemoryPlan,
    Settings,
    estimate,
    estimate_settings,
    suggest,
)
from herd.memory.shape import ALL_LINEAR, KNOWN_SHAPES, ModelShape, load_model_shape, lora_param_count

__all__ = ["ALL_LINEAR", "CUDA_CONTEXT", "GB", "KNOWN_SHAPES", "MemoryPlan", "ModelShape", "Settings", "estimate",
           "estimate_settings", "load_model_shape", "lora_param_count", "suggest"]
