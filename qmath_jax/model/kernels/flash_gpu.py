"""Flash attention for GPU (Pallas Triton): forward, and a backward of two kernels.

Legend: B batch, T query length (== S), H query heads, K kv heads, G = H / K,
E head dim; a trailing `p` on a length means padded.

Tensors stay in their [B, T, H, E] layout (Triton reads strided tiles directly).
Each program owns one q tile (forward, dq) or one kv tile (dk/dv) and loops over
the other axis; the loop bounds are the [first, last] live-block ranges, so tiles
that the causal mask or the packed segments rule out are never touched.
Grouped-query attention is native: kv BlockSpecs map query head h to kv head
h // G, and the dk/dv program of kv head k loops over its G query heads, so kv is
never repeated in memory and no atomics are needed. Softmax in float32; the
forward saves the logsumexp for the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qmath_jax.model.kernels import (
    NEG_INF,
    check_attention_inputs,
    live_block_ranges,
    pad_axis,
    round_up,
    triton_dot,
)

# Tiles and Triton launch settings measured on an H200 (bench/attention_sweep.py, T=8192,
# E=128, bfloat16): 4 warps beat 8 in every kernel (forward+backward 146 -> 232 TFLOP/s),
# and the forward takes (64, 64) tiles with a 3-stage pipeline (189 -> 200 TFLOP/s).
# float32 tiles keep 2 stages: 3 stages of 64 x 128 float32 k and v tiles plus the q tile
# would fill all of a Hopper SM's 227 KB of shared memory.
DEFAULT_BLOCKS = (64, 64, 64, 64)  # forward q, forward kv, backward q, backward kv
FORWARD_LAUNCH = {"num_warps": 4, "num_stages": 3}
BACKWARD_LAUNCH = {"num_warps": 4, "num_stages": 2}


def flash_attention(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    causal: bool = True,
    blocks: tuple[int, int, int, int] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query flash attention over packed rows (differentiable in q, k, v).

    Args:
      q_BTHE: queries [B, T, H, E].
      k_BSKE: keys [B, T, K, E], H a multiple of K.
      v_BSKE: values [B, T, K, E].
      segment_ids_BT: [B, T] int; 0 marks padding.
      causal: mask keys after the query.
      blocks: (forward q, forward kv, backward q, backward kv) tile rows, powers of
        two >= 16; default DEFAULT_BLOCKS, shrunk to the padded length.
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      [B, T, H, E] in q's dtype, equal to `attention_xla`.
    """
    check_attention_inputs(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
    t, e = q_BTHE.shape[1], q_BTHE.shape[3]
    blocks = _pick_blocks(t, blocks)
    tp = round_up(t, max(blocks))
    # Triton tiles need power-of-two extents; zero columns change neither q.k nor
    # the kept output columns, so E is padded and the true E sets the scale.
    ep = max(16, pl.next_power_of_2(e))
    q = pad_axis(pad_axis(q_BTHE, 3, ep), 1, tp)
    k = pad_axis(pad_axis(k_BSKE, 3, ep), 1, tp)
    v = pad_axis(pad_axis(v_BSKE, 3, ep), 1, tp)
    seg = pad_axis(segment_ids_BT.astype(jnp.int32), 1, tp)
    out = _flash(q, k, v, seg, causal, blocks, e**-0.5, interpret)
    return out[:, :t, :, :e]


def _pick_blocks(t: int, blocks: tuple[int, int, int, int] | None) -> tuple[int, ...]:
    blocks = blocks or DEFAULT_BLOCKS
    for blk in blocks:
        if blk < 16 or blk & (blk - 1):
            raise ValueError(
                f"GPU flash attention blocks must be powers of two >= 16, got {blocks}"
            )
    cap = max(16, pl.next_power_of_2(t))
    return tuple(min(blk, cap) for blk in blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, causal, blocks, scale, interpret):
    return _forward(q, k, v, seg, causal, blocks, scale, interpret)[0]


def _flash_fwd(q, k, v, seg, causal, blocks, scale, interpret):
    out, lse = _forward(q, k, v, seg, causal, blocks, scale, interpret)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, blocks, scale, interpret, res, do):
    q, k, v, seg, out, lse = res
    # di = rowsum(dO * O) [B, H, Tp]: the softmax-Jacobian term, cheap for XLA.
    di = jnp.einsum("BTHE,BTHE->BHT", do.astype(jnp.float32), out.astype(jnp.float32))
    dq = _backward_dq(q, k, v, seg, lse, do, di, causal, blocks, scale, interpret)
    dk, dv = _backward_dkv(q, k, v, seg, lse, do, di, causal, blocks, scale, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _mask(q_seg, kv_seg, q_pos, kv_pos, causal):
    """[rows, cols] bool: same non-zero segment, and key <= query when causal."""
    mask = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
    if causal:
        mask &= q_pos[:, None] >= kv_pos[None, :]
    return mask


def _params(launch: dict, dtype) -> plgpu.CompilerParams:
    if jnp.dtype(dtype).itemsize > 2:
        launch = {**launch, "num_stages": min(launch["num_stages"], 2)}
    return plgpu.CompilerParams(**launch)


def _scalar_spec(grid_to_block):
    return pl.BlockSpec((None, None), grid_to_block)


# ----------------------------------------------------------------------------- forward


def _forward(q, k, v, seg, causal, blocks, scale, interpret):
    b, tp, h, e = q.shape
    g = h // k.shape[2]
    bq, bk = blocks[0], blocks[1]
    r = live_block_ranges(seg, bq, bk, causal=causal)
    kernel = functools.partial(_fwd_kernel, causal=causal, scale=scale, bq=bq, bk=bk)
    return pl.pallas_call(
        kernel,
        grid=(tp // bq, b, h),
        in_specs=[
            pl.BlockSpec((None, bq, None, e), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, tp, None, e), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, tp, None, e), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, tp), lambda i, bi, hi: (bi, 0)),
            _scalar_spec(lambda i, bi, hi: (bi, i)),
            _scalar_spec(lambda i, bi, hi: (bi, i)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, e), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ],
        compiler_params=_params(FORWARD_LAUNCH, q.dtype),
        interpret=interpret,
        name="flash_fwd_triton",
    )(q, k, v, seg, r["kv_first"], r["kv_last"])


def _fwd_kernel(
    q_ref, k_ref, v_ref, seg_ref, first_ref, last_ref, o_ref, lse_ref, *, causal, scale, bq, bk
):
    i = pl.program_id(0)
    q = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    q_seg = seg_ref[pl.ds(i * bq, bq)]

    def body(j, carry):
        acc, m, l = carry
        rows = pl.ds(j * bk, bk)
        s = triton_dot(q, k_ref[rows, :], trans_b=True) * scale
        mask = _mask(q_seg, seg_ref[rows], q_pos, j * bk + jnp.arange(bk), causal)
        s = jnp.where(mask, s, NEG_INF)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        # Masked entries are zeroed explicitly: a fully masked row has s == m.
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        v = v_ref[rows, :]
        acc = acc * alpha[:, None] + triton_dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l + jnp.sum(p, axis=1)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), NEG_INF, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(first_ref[...], last_ref[...] + 1, body, init)
    empty = l == 0.0  # padding rows: no key at all
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(safe_l))


# ----------------------------------------------------------------------------- backward


def _backward_dq(q, k, v, seg, lse, do, di, causal, blocks, scale, interpret):
    b, tp, h, e = q.shape
    g = h // k.shape[2]
    bq, bk = blocks[2], blocks[3]
    r = live_block_ranges(seg, bq, bk, causal=causal)
    q_spec = pl.BlockSpec((None, bq, None, e), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, tp, None, e), lambda i, bi, hi: (bi, 0, hi // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    kernel = functools.partial(_dq_kernel, causal=causal, scale=scale, bq=bq, bk=bk)
    return pl.pallas_call(
        kernel,
        grid=(tp // bq, b, h),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, tp), lambda i, bi, hi: (bi, 0)),
            row_spec,
            q_spec,
            row_spec,
            _scalar_spec(lambda i, bi, hi: (bi, i)),
            _scalar_spec(lambda i, bi, hi: (bi, i)),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(BACKWARD_LAUNCH, q.dtype),
        interpret=interpret,
        name="flash_bwd_dq_triton",
    )(q, k, v, seg, lse, do, di, r["kv_first"], r["kv_last"])


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    seg_ref,
    lse_ref,
    do_ref,
    di_ref,
    first_ref,
    last_ref,
    dq_ref,
    *,
    causal,
    scale,
    bq,
    bk,
):
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...], di_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    q_seg = seg_ref[pl.ds(i * bq, bq)]

    def body(j, acc):
        rows = pl.ds(j * bk, bk)
        k = k_ref[rows, :]
        s = triton_dot(q, k, trans_b=True) * scale
        mask = _mask(q_seg, seg_ref[rows], q_pos, j * bk + jnp.arange(bk), causal)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[:, None]), 0.0)
        dp = triton_dot(do, v_ref[rows, :], trans_b=True)
        ds = p * (dp - di[:, None])
        return acc + triton_dot(ds.astype(k.dtype), k)

    acc = jax.lax.fori_loop(
        first_ref[...], last_ref[...] + 1, body, jnp.zeros(q.shape, jnp.float32)
    )
    dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _backward_dkv(q, k, v, seg, lse, do, di, causal, blocks, scale, interpret):
    b, tp, h, e = q.shape
    kh = k.shape[2]
    g = h // kh
    bq, bk = blocks[2], blocks[3]
    r = live_block_ranges(seg, bq, bk, causal=causal)
    group_spec = pl.BlockSpec((None, tp, g, e), lambda j, bi, ki: (bi, 0, ki, 0))
    group_rows = pl.BlockSpec((None, g, tp), lambda j, bi, ki: (bi, ki, 0))
    kv_spec = pl.BlockSpec((None, bk, None, e), lambda j, bi, ki: (bi, j, ki, 0))
    kernel = functools.partial(_dkv_kernel, causal=causal, scale=scale, bq=bq, bk=bk, g=g)
    return pl.pallas_call(
        kernel,
        grid=(tp // bk, b, kh),
        in_specs=[
            group_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, tp), lambda j, bi, ki: (bi, 0)),
            group_rows,
            group_spec,
            group_rows,
            _scalar_spec(lambda j, bi, ki: (bi, j)),
            _scalar_spec(lambda j, bi, ki: (bi, j)),
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_params(BACKWARD_LAUNCH, q.dtype),
        interpret=interpret,
        name="flash_bwd_dkv_triton",
    )(q, k, v, seg, lse, do, di, r["q_first"], r["q_last"])


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    seg_ref,
    lse_ref,
    do_ref,
    di_ref,
    first_ref,
    last_ref,
    dk_ref,
    dv_ref,
    *,
    causal,
    scale,
    bq,
    bk,
    g,
):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kv_pos = j * bk + jnp.arange(bk)
    kv_seg = seg_ref[pl.ds(j * bk, bk)]
    first, last = first_ref[...], last_ref[...]

    def q_block(i, carry, gi):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, gi, :], do_ref[rows, gi, :]
        # Transposed scores [bk, bq]: each kv row meets a tile of queries.
        s_t = triton_dot(k, q, trans_b=True) * scale
        mask = _mask(kv_seg, seg_ref[rows], kv_pos, i * bq + jnp.arange(bq), False)
        if causal:
            mask &= kv_pos[:, None] <= (i * bq + jnp.arange(bq))[None, :]
        lse, di = lse_ref[gi, rows], di_ref[gi, rows]
        p_t = jnp.where(mask, jnp.exp(jnp.where(mask, s_t, 0.0) - lse[None, :]), 0.0)
        dv = dv + triton_dot(p_t.astype(do.dtype), do)
        dp_t = triton_dot(v, do, trans_b=True)
        ds_t = p_t * (dp_t - di[None, :])
        return dk + triton_dot(ds_t.astype(q.dtype), q), dv

    def member(gi, carry):
        return jax.lax.fori_loop(first, last + 1, functools.partial(q_block, gi=gi), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, g, member, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
