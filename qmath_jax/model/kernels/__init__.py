"""Pallas attention kernels and the block bookkeeping they share.

Modules:
  flash_tpu: flash attention forward + backward in Pallas Mosaic (TPU).
  flash_gpu: flash attention forward + backward in Pallas Triton (GPU; see
             `triton_backend` for JAX versions without it).
  decode:    one-query-per-row attention against a KV cache (TPU and GPU).

This package file holds only backend-free helpers (padding, which blocks of the
[T, S] score matrix can hold an unmasked entry), so the kernel modules import it
without cycles. Every kernel runs on CPU with `interpret=True`.

Legend: B batch, T query length (== S key length here), n number of blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: masked scores never produce inf - inf = NaN
_BIG = 2**30  # "no real token in this block" sentinel for segment minima


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x."""
    return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
    """Zero-pads `axis` of x up to `length` (no-op when already that long)."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _block_segment_bounds(segment_ids_BT: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per block: min and max of the non-zero segment ids ([B, n] each).

    A block with no real token gets (BIG, 0), an empty interval.
    """
    b, t = segment_ids_BT.shape
    seg = segment_ids_BT.reshape(b, t // block, block)
    real = seg != 0
    lo = jnp.min(jnp.where(real, seg, _BIG), axis=-1)
    hi = jnp.max(jnp.where(real, seg, 0), axis=-1)
    return lo, hi


def live_block_ranges(
    segment_ids_BT: jax.Array, block_q: int, block_kv: int, *, causal: bool
) -> dict[str, jax.Array]:
    """Which (q block, kv block) tiles can contain an unmasked score.

    A tile is live when, causally, some key index <= some query index and the
    intervals [min, max] of the non-zero segment ids of both blocks overlap (a
    conservative test, exact for packed rows whose ids rise left to right). The
    live tiles of one q block are then enveloped by [kv_first, kv_last], and those
    of one kv block by [q_first, q_last]; kernels visit only that range. An empty
    range is first = 0, last = -1.

    Args:
      segment_ids_BT: [B, T] int, T a multiple of both block sizes.
      block_q: query block size.
      block_kv: key block size.
      causal: apply the causal constraint.

    Returns:
      dict of int32 arrays: kv_first, kv_last [B, T // block_q] and
      q_first, q_last [B, T // block_kv].
    """
    t = segment_ids_BT.shape[1]
    nq, nk = t // block_q, t // block_kv
    q_lo, q_hi = _block_segment_bounds(segment_ids_BT, block_q)
    k_lo, k_hi = _block_segment_bounds(segment_ids_BT, block_kv)
    live_Bqk = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    if causal:
        q_end = (jnp.arange(nq) + 1) * block_q - 1
        k_start = jnp.arange(nk) * block_kv
        live_Bqk &= (k_start[None, :] <= q_end[:, None])[None]
    return {
        "kv_first": _first_true(live_Bqk, nk),
        "kv_last": _last_true(live_Bqk, nk),
        "q_first": _first_true(jnp.swapaxes(live_Bqk, 1, 2), nq),
        "q_last": _last_true(jnp.swapaxes(live_Bqk, 1, 2), nq),
    }


def _first_true(x: jax.Array, n: int) -> jax.Array:
    idx = jnp.where(x, jnp.arange(n), n)
    first = jnp.min(idx, axis=-1)
    return jnp.where(first == n, 0, first).astype(jnp.int32)


def _last_true(x: jax.Array, n: int) -> jax.Array:
    return jnp.max(jnp.where(x, jnp.arange(n), -1), axis=-1).astype(jnp.int32)


def triton_backend() -> bool:
    """Whether this JAX still ships Pallas' Triton backend (deprecated in JAX 0.11), which
    the GPU kernels are written in."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """`pallas.triton.dot` (float32 result) at the precision JAX's matmuls are set to.

    Triton multiplies float32 tiles in TF32 unless told otherwise. Under
    `jax.default_matmul_precision("highest" | "float32")` the product is IEEE float32,
    as XLA's own dots are there; bfloat16 tiles are exact either way.
    """
    from jax.experimental.pallas import triton as plgpu

    setting = jax.config.jax_default_matmul_precision
    precision = jax.lax.Precision.HIGHEST if setting in ("highest", "float32") else None
    return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def check_attention_inputs(
    q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, segment_ids_BT: jax.Array
) -> None:
    """Raises ValueError naming the offending argument when shapes do not fit."""
    if q_BTHE.ndim != 4 or k_BSKE.ndim != 4 or v_BSKE.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, E] / [B, S, K, E]; got q {q_BTHE.shape}, "
            f"k {k_BSKE.shape}, v {v_BSKE.shape}"
        )
    b, t, h, e = q_BTHE.shape
    if k_BSKE.shape != v_BSKE.shape:
        raise ValueError(f"k {k_BSKE.shape} and v {v_BSKE.shape} must have the same shape")
    bk, s, kh, ek = k_BSKE.shape
    if (bk, ek) != (b, e) or s != t:
        raise ValueError(
            f"self-attention needs k/v [B={b}, S=T={t}, K, E={e}], got k {k_BSKE.shape}; "
            "use the XLA reference for cross-attention shapes"
        )
    if h % kh:
        raise ValueError(f"query heads H={h} must be a multiple of kv heads K={kh}")
    if segment_ids_BT.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids_BT.shape}")
