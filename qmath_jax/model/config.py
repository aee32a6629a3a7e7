"""Model hyperparameters and the presets of the published Qwen checkpoints.

Each preset copies the `config.json` of the Hugging Face checkpoint it names; the
parameter count in `PUBLISHED_PARAM_COUNTS` is what `jax.eval_shape` of the preset
must give (tests check it).
"""

from __future__ import annotations

import dataclasses

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
DENSE_IMPLS = ("auto", "xla", "cpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen2 decoder. Field names follow our code; `hf.py` maps them to HF's."""

    vocab_size: int
    embed_dim: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means embed_dim // num_heads, as in HF Qwen2
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_positions: int = 4096
    tie_embeddings: bool = False
    head: str = "lm"  # "lm": next-token logits; "rm": Qwen2.5-Math-RM scalar score
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "full"
    scan_unroll: int = 1  # layers per scan iteration; num_layers unrolls fully (small models)
    attention_impl: str = "auto"
    dense_impl: str = "auto"  # "xla" einsums, "cpu" (dense.py), "auto": "cpu" on a CPU mesh
    init_std: float = 0.02

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention shares each kv head)"
            )
        if self.head not in ("lm", "rm"):
            raise ValueError(f"head={self.head!r}: use 'lm' (language model) or 'rm' (reward)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {REMAT_POLICIES}")
        if self.dense_impl not in DENSE_IMPLS:
            raise ValueError(f"dense_impl={self.dense_impl!r}: choose one of {DENSE_IMPLS}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Qwen/Qwen2.5-Math-1.5B config.json
    "qwen2.5-math-1.5b": ModelConfig(
        vocab_size=151936, embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, rope_theta=10000.0, rms_eps=1e-6, max_positions=4096,
        tie_embeddings=True,
    ),
    # Qwen/Qwen2.5-Math-7B config.json
    "qwen2.5-math-7b": ModelConfig(
        vocab_size=152064, embed_dim=3584, mlp_dim=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, rope_theta=10000.0, rms_eps=1e-6, max_positions=4096,
    ),
    # Qwen/Qwen2.5-Math-72B config.json: the 72B base keeps Qwen2.5-72B's rms_norm_eps 1e-5
    "qwen2.5-math-72b": ModelConfig(
        vocab_size=152064, embed_dim=8192, mlp_dim=29568, num_layers=80, num_heads=64,
        num_kv_heads=8, rope_theta=10000.0, rms_eps=1e-5, max_positions=4096,
    ),
    # Qwen/Qwen2.5-Math-RM-72B config.json (Qwen2ForRewardModel, score.0 / score.2)
    "qwen2.5-math-rm-72b": ModelConfig(
        vocab_size=152064, embed_dim=8192, mlp_dim=29568, num_layers=80, num_heads=64,
        num_kv_heads=8, rope_theta=10000.0, rms_eps=1e-6, max_positions=4096, head="rm",
    ),
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, embed_dim=896, mlp_dim=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, rope_theta=1000000.0, rms_eps=1e-6, max_positions=32768,
        tie_embeddings=True,
    ),
    # Qwen/Qwen2.5-1.5B config.json
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151936, embed_dim=1536, mlp_dim=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, rope_theta=1000000.0, rms_eps=1e-6, max_positions=131072,
        tie_embeddings=True,
    ),
    # The benchmark model of bench/: small enough for CPU, shaped like the real ones.
    # Its 4 layers unroll (scan_unroll=4): no stacked residuals to zero and slice per step.
    "bench": ModelConfig(
        vocab_size=2048, embed_dim=256, mlp_dim=704, num_layers=4, num_heads=4,
        num_kv_heads=2, dtype="float32", remat="none", scan_unroll=4,
    ),
    # Tiny models for tests and the CPU demo.
    "tiny": ModelConfig(
        vocab_size=512, embed_dim=64, mlp_dim=176, num_layers=2, num_heads=4,
        num_kv_heads=2, dtype="float32", remat="none", max_positions=1024,
    ),
    # The CPU demo's model: big enough to learn the synthetic corpus in minutes.
    "demo": ModelConfig(
        vocab_size=512, embed_dim=128, mlp_dim=384, num_layers=4, num_heads=4,
        num_kv_heads=2, dtype="float32", remat="none", max_positions=1024,
    ),
    "tiny-rm": ModelConfig(
        vocab_size=512, embed_dim=64, mlp_dim=176, num_layers=2, num_heads=4,
        num_kv_heads=2, dtype="float32", remat="none", max_positions=1024, head="rm",
    ),
}

# Parameter counts of the published checkpoints (total_size / 2 of each bf16 checkpoint's
# model.safetensors.index.json; the RM's is its config's architecture counted by hand).
PUBLISHED_PARAM_COUNTS = {
    "qwen2.5-math-1.5b": 1_543_714_304,
    "qwen2.5-math-7b": 7_615_616_512,
    "qwen2.5-math-72b": 72_706_203_648,
    "qwen2.5-math-rm-72b": 71_527_620_609,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Returns the named preset with `overrides` applied (e.g. dtype='float32')."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
