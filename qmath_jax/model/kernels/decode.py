"""Decode attention: one new query per row against its KV cache (TPU and GPU kernels).

Legend: B batch, S cache length, H query heads, K kv heads, G = H / K, E head dim,
n split count (GPU).

Each row b attends to its first lengths[b] cache slots. All G query heads of a kv
head are one (G, E) tile, so grouped-query attention costs one cache read per kv
head. Blocks past a row's length are skipped (and, on TPU, not even fetched).
Softmax in float32; a row of length 0 yields zeros.

TPU (Mosaic): grid (B, S blocks); a step reads one contiguous (block, K * E) slab
of the cache viewed as [B, S, K * E] and loops over the K heads inside it.
GPU (Triton): grid (B, K, splits), flash-decoding: each program reduces a slice of
the cache into a partial (output, max, denominator) and XLA merges the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qmath_jax.model.kernels import NEG_INF, pad_axis, triton_dot

LANES = 128
TPU_BLOCK = 512
GPU_BLOCK = 64
GPU_SPLITS = 16


def _check(q_BHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, lengths_B: jax.Array):
    if q_BHE.ndim != 3 or k_BSKE.ndim != 4 or k_BSKE.shape != v_BSKE.shape:
        raise ValueError(
            f"decode attention needs q [B, H, E] and caches [B, S, K, E] of one shape; got "
            f"q {q_BHE.shape}, k {k_BSKE.shape}, v {v_BSKE.shape}"
        )
    b, h, e = q_BHE.shape
    if k_BSKE.shape[0] != b or k_BSKE.shape[3] != e or h % k_BSKE.shape[2]:
        raise ValueError(
            f"cache {k_BSKE.shape} does not fit q {q_BHE.shape}: need the same B and E and "
            "H a multiple of K"
        )
    if lengths_B.shape != (b,):
        raise ValueError(f"lengths must be [B] = ({b},), got {lengths_B.shape}")


def decode_attention_tpu(
    q_BHE: jax.Array,
    k_cache_BSKE: jax.Array,
    v_cache_BSKE: jax.Array,
    lengths_B: jax.Array,
    *,
    block_kv: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Mosaic TPU decode attention; equals `decode_attention_xla`.

    Args:
      q_BHE: the new queries [B, H, E].
      k_cache_BSKE: keys [B, S, K, E].
      v_cache_BSKE: values [B, S, K, E].
      lengths_B: valid cache slots per row (int).
      block_kv: cache rows per grid step (multiple of 8, or S); default min(512, S).
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      [B, H, E] in q's dtype.
    """
    _check(q_BHE, k_cache_BSKE, v_cache_BSKE, lengths_B)
    b, h, e = q_BHE.shape
    s, kh = k_cache_BSKE.shape[1], k_cache_BSKE.shape[2]
    g = h // kh
    bk = block_kv or min(s, TPU_BLOCK)
    if bk != s and bk % 8:
        raise ValueError(f"block_kv={bk} must be a multiple of 8 or the cache length {s}")
    ns = pl.cdiv(s, bk)
    # A free reshape: each step's block is one contiguous (bk, K * E) slab.
    k = k_cache_BSKE.reshape(b, s, kh * e)
    v = v_cache_BSKE.reshape(b, s, kh * e)
    q = q_BHE.reshape(b, kh, g, e)

    def cache_map(bi, j, lengths):
        last = jnp.maximum(pl.cdiv(lengths[bi], bk) - 1, 0)
        return bi, jnp.minimum(j, last), 0  # past the end: re-use, do not fetch

    kernel = functools.partial(_tpu_kernel, scale=e**-0.5, bk=bk, s=s, kh=kh, e=e, ns=ns)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, ns),
            in_specs=[
                pl.BlockSpec((None, kh, g, e), lambda bi, j, lengths: (bi, 0, 0, 0)),
                pl.BlockSpec((None, bk, kh * e), cache_map),
                pl.BlockSpec((None, bk, kh * e), cache_map),
            ],
            out_specs=pl.BlockSpec((None, kh, g, e), lambda bi, j, lengths: (bi, 0, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((kh, g, LANES), jnp.float32),
                pltpu.VMEM((kh, g, LANES), jnp.float32),
                pltpu.VMEM((kh, g, e), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention",
    )(lengths_B.astype(jnp.int32), q, k, v)
    return out.reshape(b, h, e)


def _tpu_kernel(
    lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, scale, bk, s, kh, e, ns
):
    bi, j = pl.program_id(0), pl.program_id(1)
    length = jnp.minimum(lengths_ref[bi], s)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j * bk < length)
    def _step():
        valid_row = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1) < length
        valid_col = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, e), 0) < length
        for head in range(kh):  # static: K is small, and each head is a lane slice
            cols = slice(head * e, (head + 1) * e)
            q = q_ref[head]  # [G, E]
            s_GS = (
                jax.lax.dot_general(
                    q, k_ref[:, cols], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
                * scale
            )
            s_GS = jnp.where(valid_row, s_GS, NEG_INF)
            m_prev = m_ref[head]
            m_next = jnp.maximum(m_prev, jnp.max(s_GS, axis=1, keepdims=True))
            p = jnp.where(valid_row, jnp.exp(s_GS - m_next[:, :1]), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_ref[head] = alpha * l_ref[head] + jnp.sum(p, axis=1, keepdims=True)
            # Rows past the end (or past S in a ragged last block) may hold garbage.
            v = jnp.where(valid_col, v_ref[:, cols], 0).astype(v_ref.dtype)
            pv = jax.lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            acc_ref[head] = acc_ref[head] * alpha[:, :1] + pv
            m_ref[head] = m_next

    @pl.when(j == ns - 1)
    def _finish():
        l = l_ref[...][:, :, :1]
        o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def decode_attention_gpu(
    q_BHE: jax.Array,
    k_cache_BSKE: jax.Array,
    v_cache_BSKE: jax.Array,
    lengths_B: jax.Array,
    *,
    block_kv: int | None = None,
    splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Triton GPU decode attention (flash-decoding); equals `decode_attention_xla`.

    Args:
      q_BHE: the new queries [B, H, E].
      k_cache_BSKE: keys [B, S, K, E]; S should be a multiple of block_kv and E a
        power of two, else the cache is padded (a copy) first.
      v_cache_BSKE: values [B, S, K, E].
      lengths_B: valid cache slots per row (int).
      block_kv: cache rows per loop step (power of two >= 16); default 64.
      splits: programs per (row, kv head) sharing the cache length; default 16.
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      [B, H, E] in q's dtype.
    """
    # Imported here: JAX 0.11 deprecates Pallas' Triton backend, and the TPU kernel
    # above must not depend on it.
    from jax.experimental.pallas import triton as plgpu

    _check(q_BHE, k_cache_BSKE, v_cache_BSKE, lengths_B)
    b, h, e = q_BHE.shape
    s, kh = k_cache_BSKE.shape[1], k_cache_BSKE.shape[2]
    g = h // kh
    bk = block_kv or GPU_BLOCK
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_kv={bk} must be a power of two >= 16")
    # Tiles need power-of-two extents and tl.dot needs >= 16 rows: pad G and E.
    gp, ep = max(16, pl.next_power_of_2(g)), max(16, pl.next_power_of_2(e))
    sp = -(-s // bk) * bk
    k = pad_axis(pad_axis(k_cache_BSKE, 3, ep), 1, sp)
    v = pad_axis(pad_axis(v_cache_BSKE, 3, ep), 1, sp)
    q = pad_axis(pad_axis(q_BHE.reshape(b, kh, g, e), 2, gp), 3, ep)
    nblocks = sp // bk
    n = min(splits or GPU_SPLITS, nblocks)
    per_split = pl.cdiv(nblocks, n)
    kernel = functools.partial(_gpu_kernel, scale=e**-0.5, bk=bk, per_split=per_split, s=s)
    cache_spec = pl.BlockSpec((None, sp, None, ep), lambda bi, ki, si: (bi, 0, ki, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kh, n),
        in_specs=[
            pl.BlockSpec((None, None, gp, ep), lambda bi, ki, si: (bi, ki, 0, 0)),
            cache_spec,
            cache_spec,
            pl.BlockSpec((None,), lambda bi, ki, si: (bi,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, ep), lambda bi, ki, si: (bi, ki, si, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, n, gp, ep), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, n, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, n, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention_triton",
    )(q, k, v, lengths_B.astype(jnp.int32))
    out = _merge_splits(acc, m, l)[:, :, :g, :e]
    return out.reshape(b, h, e).astype(q_BHE.dtype)


def _gpu_kernel(q_ref, k_ref, v_ref, length_ref, acc_ref, m_ref, l_ref, *, scale, bk, per_split, s):
    si = pl.program_id(2)
    length = jnp.minimum(length_ref[...], s)
    q = q_ref[...]
    start = si * per_split
    stop = jnp.minimum(start + per_split, pl.cdiv(length, bk))

    def body(j, carry):
        acc, m, l = carry
        rows = pl.ds(j * bk, bk)
        valid = j * bk + jnp.arange(bk) < length
        s_GS = triton_dot(q, k_ref[rows, :], trans_b=True) * scale
        s_GS = jnp.where(valid[None, :], s_GS, NEG_INF)
        m_next = jnp.maximum(m, jnp.max(s_GS, axis=1))
        p = jnp.where(valid[None, :], jnp.exp(s_GS - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        # Slots past the length are never written by the sampler: keep NaN out.
        v = jnp.where(valid[:, None], v_ref[rows, :], 0).astype(v_ref.dtype)
        acc = acc * alpha[:, None] + triton_dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l + jnp.sum(p, axis=1)

    gp = q.shape[0]
    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((gp,), NEG_INF, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(start, stop, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _merge_splits(acc_BKnGE, m_BKnG, l_BKnG):
    """Combines per-split partial softmaxes; a row with no valid slot gives zeros."""
    m_max = jnp.max(m_BKnG, axis=2, keepdims=True)
    w = jnp.where(l_BKnG > 0, jnp.exp(m_BKnG - m_max), 0.0)
    l_tot = jnp.sum(w * l_BKnG, axis=2)
    acc = jnp.sum(w[..., None] * acc_BKnGE, axis=2)
    return acc / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
