"""Sampling: batched generation with a KV cache (`sampler`) and the TIR loop (`tir`).

Names load lazily, so `import qmath_jax.sampling` pulls in nothing beyond the package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Completion": "sampler",
    "STOP_REASONS": "sampler",
    "decode_step": "sampler",
    "generate": "sampler",
    "kv_cache_bytes_per_token": "sampler",
    "layer_params": "sampler",
    "lm_head_logits": "sampler",
    "make_generate_fn": "sampler",
    "prefill": "sampler",
    "sample_logits": "sampler",
    "sample_tokens": "sampler",
    "split_cache": "sampler",
    "stop_string_patterns": "sampler",
    "token_logprobs": "sampler",
    "Trajectory": "tir",
    "run_tir": "tir",
}

__all__ = [
    "STOP_REASONS",
    "Completion",
    "Trajectory",
    "decode_step",
    "generate",
    "kv_cache_bytes_per_token",
    "layer_params",
    "lm_head_logits",
    "make_generate_fn",
    "prefill",
    "run_tir",
    "sample_logits",
    "sample_tokens",
    "split_cache",
    "stop_string_patterns",
    "token_logprobs",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
