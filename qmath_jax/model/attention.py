"""Attention: the XLA reference and the dispatch to kernels.

Legend: B batch, T query length, S key length, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give zeros, never NaN


def packed_causal_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array) -> jax.Array:
    """[B, T, S] bool: same non-zero segment and key index <= query index (T == S)."""
    same_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    real_BTS = (q_segment_ids_BT != 0)[:, :, None]
    t, s = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    causal_TS = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    return same_BTS & real_BTS & causal_TS[None]


def attention_xla(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    causal: bool = True,
) -> jax.Array:
    """Reference grouped-query attention over packed rows, float32 softmax.

    Queries attend to keys of their own segment (0 = padding attends nowhere and
    yields zeros) and, when causal, only to earlier or equal indices.

    Returns:
      [B, T, H, E] in q's dtype.
    """
    b, t, h, e = q_BTHE.shape
    k = k_BSKE.shape[2]
    q_BTKGE = q_BTHE.reshape(b, t, k, h // k, e)
    logits_BKGTS = jnp.einsum(
        "BTKGE,BSKE->BKGTS", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32
    ) * (e**-0.5)
    if causal:
        mask_BTS = packed_causal_mask(segment_ids_BT, segment_ids_BT)
    else:
        same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        mask_BTS = same_BTS & (segment_ids_BT != 0)[:, :, None]
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    probs_BKGTS = jnp.where(mask_BTS[:, None, None], probs_BKGTS, 0.0)
    out_BTKGE = jnp.einsum(
        "BKGTS,BSKE->BTKGE", probs_BKGTS.astype(v_BSKE.dtype), v_BSKE,
        preferred_element_type=jnp.float32,
    )
    return out_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype)


def decode_attention_xla(
    q_BHE: jax.Array, k_cache_BSKE: jax.Array, v_cache_BSKE: jax.Array, lengths_B: jax.Array
) -> jax.Array:
    """Reference attention of one new query per row against its first lengths[b] cache slots.

    Returns:
      [B, H, E] in q's dtype.
    """
    b, h, e = q_BHE.shape
    s, k = k_cache_BSKE.shape[1], k_cache_BSKE.shape[2]
    q_BKGE = q_BHE.reshape(b, k, h // k, e)
    logits_BKGS = jnp.einsum(
        "BKGE,BSKE->BKGS", q_BKGE, k_cache_BSKE, preferred_element_type=jnp.float32
    ) * (e**-0.5)
    valid_BS = jnp.arange(s)[None, :] < lengths_B[:, None]
    logits_BKGS = jnp.where(valid_BS[:, None, None], logits_BKGS, NEG_INF)
    probs_BKGS = jax.nn.softmax(logits_BKGS, axis=-1)
    probs_BKGS = jnp.where(valid_BS[:, None, None], probs_BKGS, 0.0)
    out_BKGE = jnp.einsum(
        "BKGS,BSKE->BKGE", probs_BKGS.astype(v_cache_BSKE.dtype), v_cache_BSKE,
        preferred_element_type=jnp.float32,
    )
    return out_BKGE.reshape(b, h, e).astype(q_BHE.dtype)
