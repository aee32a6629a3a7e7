"""The Qwen2 decoder, its presets and attention."""

from qmath_jax.model.config import PRESETS, ModelConfig, get_preset
from qmath_jax.model.transformer import (
    Transformer,
    count_params,
    init_cache,
    init_params,
    param_axes,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "Transformer",
    "count_params",
    "get_preset",
    "init_cache",
    "init_params",
    "param_axes",
]
