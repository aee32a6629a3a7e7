"""The Qwen2 decoder in Flax Linen, with scanned layers and an optional KV cache.

Legend: B batch, T query length, S cache length, D model, H query heads, K kv heads,
E head dim, F MLP hidden, V vocab, L layers.

`Transformer(cfg).apply({"params": p}, tokens_BT, positions_BT, segment_ids_BT)` returns
float32 logits [B, T, V] (or reward scores [B, T] for `cfg.head == "rm"`). With
`cache=` it also returns the updated cache: a prefill (T > 1) fills an empty cache, a
decode step (T == 1) appends one token per row at `cache["end"]`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qmath_jax.model import attention
from qmath_jax.model.config import ModelConfig
from qmath_jax.model.dense import dense_cpu

Cache = dict[str, jax.Array]  # k, v: [L, B, S, K, E]; end: [B] filled slots per row

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


def _param(module: nn.Module, name: str, init, shape, axes, cfg: ModelConfig):
    init = nn.with_logical_partitioning(init, axes)
    return module.param(name, init, shape, jnp.dtype(cfg.param_dtype))


def for_platform(cfg: ModelConfig, mesh) -> ModelConfig:
    """cfg with its "auto" choices made for the mesh's platform (JAX's default without one)."""
    if cfg.dense_impl != "auto":
        return cfg
    on_cpu = attention.target_platform(mesh) == "cpu"
    return cfg.replace(dense_impl="cpu" if on_cpu else "xla")


def _dense(cfg: ModelConfig, eq: str, x, w, out_dtype=None):
    """jnp.einsum(eq, x, w), or `dense_cpu` (the same contraction) for dense_impl="cpu"."""
    if cfg.dense_impl == "cpu":
        return dense_cpu(x, w, out_dtype)
    return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)


def _constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm: float32 statistics, scale applied after the cast back."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = _param(self, "scale", nn.initializers.ones, (x_BTD.shape[-1],), ("embed",),
                         self.cfg)
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_eps)
        dtype = jnp.dtype(self.cfg.dtype)
        return scale_D.astype(dtype) * normed.astype(dtype)


def rope_tables(positions_BT: jax.Array, e: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, E/2] of the rotary angles (HF's float32 rounding), for `apply_rope`.

    Built once per forward and shared by every layer's q and k (see `Transformer`).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    angles_BTe = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_BTe)[:, :, None, :], jnp.sin(angles_BTe)[:, :, None, :]


def apply_rope(x_BTNE: jax.Array, cos_BT1e: jax.Array, sin_BT1e: jax.Array) -> jax.Array:
    """Rotary embedding, HF convention: the two halves of E are the rotated pair."""
    x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1e - x2 * sin_BT1e, x2 * cos_BT1e + x1 * sin_BT1e], axis=-1)
    return out.astype(x_BTNE.dtype)


def _shared_rope_tables(cfg: ModelConfig, positions_BT: jax.Array):
    """`rope_tables` once for every layer's q and k.

    On XLA:CPU (dense_impl "cpu") they are built inside a conditional whose two branches
    are the same: its result is a buffer that fusion cannot look through. Otherwise XLA
    fuses cos and sin into each layer's q and k rotations and their gradients and
    recomputes them per element, H or K times over (XLA:CPU's cos costs ~70 multiplies;
    ~10 ms of the two-core bench step); an optimization barrier does not stop that. Not
    elsewhere: on a batch sharded over devices the predicate would cost a broadcast.
    """
    tables = functools.partial(rope_tables, e=cfg.head_dim, theta=cfg.rope_theta)
    if cfg.dense_impl != "cpu":
        return tables(positions_BT)
    return jax.lax.cond(positions_BT[0, 0] >= 0, tables, tables, positions_BT)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, rope_BT1e, segment_ids_BT, layer_cache, cache_end_B, mesh):
        cfg = self.cfg
        d, h, k, e = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dtype = jnp.dtype(cfg.dtype)
        w_init = nn.initializers.normal(cfg.init_std)
        zeros = nn.initializers.zeros
        wq_DHE = _param(self, "q_kernel", w_init, (d, h, e), ("embed", "heads", "head_dim"), cfg)
        bq_HE = _param(self, "q_bias", zeros, (h, e), ("heads", "head_dim"), cfg)
        wk_DKE = _param(self, "k_kernel", w_init, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg)
        bk_KE = _param(self, "k_bias", zeros, (k, e), ("kv_heads", "head_dim"), cfg)
        wv_DKE = _param(self, "v_kernel", w_init, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg)
        bv_KE = _param(self, "v_bias", zeros, (k, e), ("kv_heads", "head_dim"), cfg)
        wo_HED = _param(self, "o_kernel", w_init, (h, e, d), ("heads", "head_dim", "embed"), cfg)

        x_BTD = x_BTD.astype(dtype)
        q_BTHE = _dense(cfg, "BTD,DHE->BTHE", x_BTD, wq_DHE.astype(dtype)) + bq_HE.astype(dtype)
        k_BTKE = _dense(cfg, "BTD,DKE->BTKE", x_BTD, wk_DKE.astype(dtype)) + bk_KE.astype(dtype)
        v_BTKE = _dense(cfg, "BTD,DKE->BTKE", x_BTD, wv_DKE.astype(dtype)) + bv_KE.astype(dtype)
        q_BTHE = _constrain(apply_rope(q_BTHE, *rope_BT1e),
                            ("batch", "length", "heads", "head_dim"))
        k_BTKE = _constrain(apply_rope(k_BTKE, *rope_BT1e),
                            ("batch", "length", "kv_heads", "head_dim"))

        new_cache = None
        if layer_cache is not None and x_BTD.shape[1] == 1:
            new_cache = _append_to_cache(layer_cache, k_BTKE, v_BTKE, cache_end_B)
            out_BHE = attention.decode_attend(
                q_BTHE[:, 0], new_cache["k"], new_cache["v"], cache_end_B + 1,
                impl=cfg.attention_impl, mesh=mesh,
            )
            out_BTHE = out_BHE[:, None]
        else:
            if layer_cache is not None:
                new_cache = _prefill_cache(layer_cache, k_BTKE, v_BTKE)
            out_BTHE = attention.attend(
                q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, impl=cfg.attention_impl, mesh=mesh
            )
        out_BTHE = checkpoint_name(out_BTHE, "attn_out")
        out_BTD = _dense(cfg, "BTHE,HED->BTD", out_BTHE.astype(dtype), wo_HED.astype(dtype))
        return out_BTD, new_cache


def _prefill_cache(layer_cache, k_BTKE, v_BTKE):
    t = k_BTKE.shape[1]
    return {
        "k": layer_cache["k"].at[:, :t].set(k_BTKE.astype(layer_cache["k"].dtype)),
        "v": layer_cache["v"].at[:, :t].set(v_BTKE.astype(layer_cache["v"].dtype)),
    }


def _append_to_cache(layer_cache, k_B1KE, v_B1KE, end_B):
    def put(cache_SKE, new_1KE, end):
        return jax.lax.dynamic_update_slice(cache_SKE, new_1KE.astype(cache_SKE.dtype),
                                            (end, 0, 0))

    return {
        "k": jax.vmap(put)(layer_cache["k"], k_B1KE, end_B),
        "v": jax.vmap(put)(layer_cache["v"], v_B1KE, end_B),
    }


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.embed_dim, cfg.mlp_dim
        dtype = jnp.dtype(cfg.dtype)
        w_init = nn.initializers.normal(cfg.init_std)
        gate_DF = _param(self, "gate_kernel", w_init, (d, f), ("embed", "mlp"), cfg)
        up_DF = _param(self, "up_kernel", w_init, (d, f), ("embed", "mlp"), cfg)
        down_FD = _param(self, "down_kernel", w_init, (f, d), ("mlp", "embed"), cfg)
        x_BTD = x_BTD.astype(dtype)
        gate_BTF = _dense(cfg, "BTD,DF->BTF", x_BTD, gate_DF.astype(dtype))
        up_BTF = _dense(cfg, "BTD,DF->BTF", x_BTD, up_DF.astype(dtype))
        hidden_BTF = _constrain(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        out_BTD = _dense(cfg, "BTF,FD->BTD", hidden_BTF, down_FD.astype(dtype))
        return checkpoint_name(out_BTD, "mlp_out")


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    mesh: Any = None

    @nn.compact
    def __call__(self, x_BTD, rope_BT1e, segment_ids_BT, layer_cache, cache_end_B):
        attn_BTD, new_cache = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x_BTD),
            rope_BT1e, segment_ids_BT, layer_cache, cache_end_B, self.mesh,
        )
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x_BTD))
        x_BTD = _constrain(x_BTD, ("batch", "length", "embed"))
        return x_BTD, new_cache


def _scanned_layers(cfg: ModelConfig, mesh) -> nn.Module:
    layer_cls = DecoderLayer
    if cfg.remat != "none":
        layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=cfg.num_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, mesh, name="layers")


class Transformer(nn.Module):
    """Qwen2 decoder: embed -> L x (attention, SwiGLU) -> norm -> LM head or RM head."""

    cfg: ModelConfig
    mesh: Any = None  # the mesh the step is compiled for; picks and shards kernels

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array,
        cache: Cache | None = None,
        return_hidden: bool = False,
    ):
        cfg = for_platform(self.cfg, self.mesh)
        dtype = jnp.dtype(cfg.dtype)
        embed_VD = _param(self, "embedding", nn.initializers.normal(cfg.init_std),
                          (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg)
        x_BTD = _constrain(jnp.take(embed_VD, tokens_BT, axis=0).astype(dtype),
                           ("batch", "length", "embed"))
        layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        cache_end_B = None if cache is None else cache["end"]
        rope_BT1e = _shared_rope_tables(cfg, positions_BT)
        x_BTD, new_layer_caches = _scanned_layers(cfg, self.mesh)(
            x_BTD, rope_BT1e, segment_ids_BT, layer_caches, cache_end_B
        )
        hidden_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
        if cfg.head == "rm":
            out = RewardHead(cfg, name="score")(hidden_BTD)
        else:
            out = self._lm_logits(cfg, hidden_BTD, embed_VD)
        if return_hidden:
            out = (out, hidden_BTD)
        if cache is None:
            return out
        new_end_B = _advance_end(cache_end_B, segment_ids_BT)
        return out, {**new_layer_caches, "end": new_end_B}

    def _lm_logits(self, cfg, hidden_BTD, embed_VD):
        dtype = jnp.dtype(cfg.dtype)
        if cfg.tie_embeddings:
            head_DV = embed_VD.T
        else:
            head_DV = _param(self, "lm_head", nn.initializers.normal(cfg.init_std),
                             (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), cfg)
        logits_BTV = _dense(cfg, "BTD,DV->BTV", hidden_BTD, head_DV.astype(dtype), jnp.float32)
        return _constrain(logits_BTV, ("batch", "length", "vocab"))


def _advance_end(end_B, segment_ids_BT):
    """A prefill fills as many slots as the row has real tokens; a decode step adds one."""
    if segment_ids_BT.shape[1] == 1:
        return end_B + 1
    return end_B + jnp.sum(segment_ids_BT != 0, axis=1).astype(end_B.dtype)


class RewardHead(nn.Module):
    """Qwen2.5-Math-RM head: Linear(D, D) -> ReLU -> Linear(D, 1), a score per position."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = cfg.embed_dim
        dtype = jnp.dtype(cfg.dtype)
        w_init = nn.initializers.normal(cfg.init_std)
        w0_DD = _param(self, "0_kernel", w_init, (d, d), ("embed", "mlp"), cfg)
        b0_D = _param(self, "0_bias", nn.initializers.zeros, (d,), ("mlp",), cfg)
        w2_D1 = _param(self, "2_kernel", w_init, (d, 1), ("mlp", None), cfg)
        b2_1 = _param(self, "2_bias", nn.initializers.zeros, (1,), (None,), cfg)
        h_BTD = nn.relu(jnp.einsum("BTD,DF->BTF", hidden_BTD, w0_DD.astype(dtype))
                        + b0_D.astype(dtype))
        score_BT1 = jnp.einsum("BTF,FO->BTO", h_BTD, w2_D1.astype(dtype),
                               preferred_element_type=jnp.float32) + b2_1
        return score_BT1[..., 0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache [L, B, S, K, E] for `batch` rows of up to `max_len` tokens."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "end": jnp.zeros((batch,), jnp.int32)}


CACHE_AXES = {"k": ("layers", "batch", None, "kv_heads", "head_dim"),
              "v": ("layers", "batch", None, "kv_heads", "head_dim"),
              "end": ("batch",)}


@functools.partial(jax.jit, static_argnums=(0,))
def _init_params_jit(cfg: ModelConfig, key: jax.Array):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return Transformer(cfg).init(key, tokens, tokens, tokens + 1)["params"]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random params for `cfg`, plain arrays (the logical-axis boxes removed)."""
    return nn.meta.unbox(_init_params_jit(cfg, key))


def param_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every param, as a pytree of PartitionSpecs."""
    abstract = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), *([jnp.zeros((1, 8), jnp.int32)] * 3))
    )
    return nn.get_partition_spec(abstract["params"])


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (nothing is allocated)."""
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(abstract))
