"""Flash attention for TPU (Pallas Mosaic): forward, and a backward of two kernels.

Legend: B batch, T query length, S key length (== T), H query heads, K kv heads,
G = H / K, E head dim, n blocks; a trailing `p` on a length means padded.

Inputs arrive as [B, T, H, E] / [B, S, K, E] and are laid out head-major
([B, H, T, E]) so every block is a lane-dense (rows, E) tile. Grouped-query
attention is native: k/v keep K heads and the kv BlockSpec maps query head h to
kv head h // G; the dk/dv kernel walks the G query heads of a group as an inner
reduction instead of materialising repeated kv heads.

Masking: a query attends keys of its own non-zero segment (0 = padding gives a
zero output and zero gradients), causally. Tiles that cannot hold an unmasked
score are skipped: scalar-prefetched [first, last] block ranges both gate the
compute (`pl.when`) and clamp the kv/q index maps, so skipped steps issue no DMA.
The softmax runs in float32; the forward saves the logsumexp for the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qmath_jax.model.kernels import (
    NEG_INF,
    check_attention_inputs,
    live_block_ranges,
    pad_axis,
    round_up,
)

LANES = 128
DEFAULT_BLOCK = 512
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def flash_attention(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    causal: bool = True,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query flash attention over packed rows (differentiable in q, k, v).

    Args:
      q_BTHE: queries [B, T, H, E].
      k_BSKE: keys [B, T, K, E], H a multiple of K.
      v_BSKE: values [B, T, K, E].
      segment_ids_BT: [B, T] int; 0 marks padding.
      causal: mask keys after the query.
      block_q: query rows per tile (multiple of 128 on TPU; any size interpreted).
      block_kv: key rows per tile (same rule). Defaults: min(512, T rounded up).
      interpret: run the Pallas interpreter (CPU tests).

    Returns:
      [B, T, H, E] in q's dtype, equal to `attention_xla`.
    """
    check_attention_inputs(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
    t = q_BTHE.shape[1]
    bq, bk = _pick_blocks(t, block_q, block_kv, interpret)
    tp = round_up(t, max(bq, bk))
    q = pad_axis(jnp.swapaxes(q_BTHE, 1, 2), 2, tp)
    k = pad_axis(jnp.swapaxes(k_BSKE, 1, 2), 2, tp)
    v = pad_axis(jnp.swapaxes(v_BSKE, 1, 2), 2, tp)
    seg = pad_axis(segment_ids_BT.astype(jnp.int32), 1, tp)
    out_BHTE = _flash(q, k, v, seg, causal, bq, bk, interpret)
    return jnp.swapaxes(out_BHTE[:, :, :t], 1, 2)


def _pick_blocks(t: int, block_q: int | None, block_kv: int | None, interpret: bool):
    fit = round_up(t, LANES)
    bq = block_q or min(DEFAULT_BLOCK, fit)
    bk = block_kv or min(DEFAULT_BLOCK, fit)
    if not interpret and (bq % LANES or bk % LANES):
        raise ValueError(
            f"TPU flash attention blocks must be multiples of {LANES}, got block_q={bq}, "
            f"block_kv={bk}; pick multiples of {LANES} (small blocks are for interpret mode)"
        )
    if max(bq, bk) % min(bq, bk):
        raise ValueError(f"block_q={bq} and block_kv={bk} must divide one another")
    return bq, bk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, causal, bq, bk, interpret):
    return _forward(q, k, v, seg, causal, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, seg, causal, bq, bk, interpret):
    out, lse = _forward(q, k, v, seg, causal, bq, bk, interpret)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, bq, bk, interpret, res, do):
    q, k, v, seg, out, lse = res
    # di = rowsum(dO * O): the softmax-Jacobian term, cheap enough for XLA.
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    dq = _backward_dq(q, k, v, seg, lse, do, di, causal, bq, bk, interpret)
    dk, dv = _backward_dkv(q, k, v, seg, lse, do, di, causal, bq, bk, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _segment_layouts(seg_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Segment ids as lane-broadcast columns [B, T, 128] and as rows [B, 1, T]."""
    b, t = seg_BT.shape
    return jnp.broadcast_to(seg_BT[:, :, None], (b, t, LANES)), seg_BT[:, None, :]


def _mask(q_seg_col, kv_seg_row, q_start, kv_start, causal):
    """[rows, cols] bool: same non-zero segment (and causal) for a q-by-kv tile."""
    mask = (q_seg_col == kv_seg_row) & (q_seg_col != 0)
    if causal:
        rows = q_start + jax.lax.broadcasted_iota(jnp.int32, mask.shape, 0)
        cols = kv_start + jax.lax.broadcasted_iota(jnp.int32, mask.shape, 1)
        mask &= rows >= cols
    return mask


def _mask_t(kv_seg_col, q_seg_row, kv_start, q_start, causal):
    """The transposed [kv, q] mask, for the dk/dv kernel."""
    mask = (kv_seg_col == q_seg_row) & (q_seg_row != 0)
    if causal:
        rows = kv_start + jax.lax.broadcasted_iota(jnp.int32, mask.shape, 0)
        cols = q_start + jax.lax.broadcasted_iota(jnp.int32, mask.shape, 1)
        mask &= cols >= rows
    return mask


def _compiler_params(semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ----------------------------------------------------------------------------- forward


def _forward(q, k, v, seg, causal, bq, bk, interpret):
    b, h, tp, e = q.shape
    g = h // k.shape[1]
    nq, nk = tp // bq, tp // bk
    r = live_block_ranges(seg, bq, bk, causal=causal)
    seg_col, seg_row = _segment_layouts(seg)

    def q_map(bi, hi, i, j, first, last):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, first, last):
        return bi, hi // g, _clamp(j, first, last, bi * nq + i), 0

    def kv_seg_map(bi, hi, i, j, first, last):
        return bi, 0, _clamp(j, first, last, bi * nq + i)

    kernel = functools.partial(
        _fwd_kernel, causal=causal, scale=e**-0.5, bq=bq, bk=bk, nq=nq, nk=nk
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, *_: (bi, i, 0)),
                pl.BlockSpec((None, 1, bk), kv_seg_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, *_: (bi, hi, 0, i)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),  # running max m
                pltpu.VMEM((bq, LANES), jnp.float32),  # running denominator l
                pltpu.VMEM((bq, e), jnp.float32),  # unnormalised output
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32),
        ],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_fwd",
    )(r["kv_first"].reshape(-1), r["kv_last"].reshape(-1), q, k, v, seg_col, seg_row)
    return out, lse


def _clamp(j, first_ref, last_ref, idx):
    """Block index j pulled into [first, last] so skipped steps re-use a fetched block."""
    return jnp.minimum(jnp.maximum(j, first_ref[idx]), jnp.maximum(last_ref[idx], 0))


def _fwd_kernel(
    first_ref,
    last_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    kv_seg_ref,
    o_ref,
    lse_ref,
    m_ref,
    l_ref,
    acc_ref,
    *,
    causal,
    scale,
    bq,
    bk,
    nq,
    nk,
):
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    idx = bi * nq + i

    @pl.when((j >= first_ref[idx]) & (j <= last_ref[idx]))
    def _step():
        s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
        s = s * scale
        mask = _mask(q_seg_ref[:, :1], kv_seg_ref[...], i * bq, j * bk, causal)
        s = jnp.where(mask, s, NEG_INF)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        # Masked entries are zeroed explicitly: a fully masked row has s == m.
        p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=jnp.float32
        )
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv
        m_ref[...] = m_next

    @pl.when(j == nk - 1)
    def _finish():
        l = l_ref[...]
        empty = l == 0.0  # padding rows: no key at all
        safe_l = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_ref[...] / safe_l[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(empty, 0.0, m_ref[...] + jnp.log(safe_l))  # [bq, 128], lanes equal
        lse_ref[...] = lse.T[:1, :]


# ----------------------------------------------------------------------------- backward


def _backward_dq(q, k, v, seg, lse, do, di, causal, bq, bk, interpret):
    b, h, tp, e = q.shape
    g = h // k.shape[1]
    nq, nk = tp // bq, tp // bk
    r = live_block_ranges(seg, bq, bk, causal=causal)
    seg_col, seg_row = _segment_layouts(seg)

    def q_map(bi, hi, i, j, first, last):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, first, last):
        return bi, hi // g, _clamp(j, first, last, bi * nq + i), 0

    def kv_seg_map(bi, hi, i, j, first, last):
        return bi, 0, _clamp(j, first, last, bi * nq + i)

    def row_map(bi, hi, i, j, first, last):
        return bi, hi, 0, i

    kernel = functools.partial(_dq_kernel, causal=causal, scale=e**-0.5, bq=bq, bk=bk, nq=nq, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, *_: (bi, i, 0)),
                pl.BlockSpec((None, 1, bk), kv_seg_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
            ],
            out_specs=pl.BlockSpec((None, None, bq, e), q_map),
            scratch_shapes=[pltpu.VMEM((bq, e), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flash_bwd_dq",
    )(r["kv_first"].reshape(-1), r["kv_last"].reshape(-1), q, k, v, seg_col, seg_row, lse, do, di)


def _dq_kernel(
    first_ref,
    last_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    kv_seg_ref,
    lse_ref,
    do_ref,
    di_ref,
    dq_ref,
    acc_ref,
    *,
    causal,
    scale,
    bq,
    bk,
    nq,
    nk,
):
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    idx = bi * nq + i

    @pl.when((j >= first_ref[idx]) & (j <= last_ref[idx]))
    def _step():
        k = k_ref[...]
        s = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        mask = _mask(q_seg_ref[:, :1], kv_seg_ref[...], i * bq, j * bk, causal)
        lse_col = jnp.expand_dims(lse_ref[0], -1)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse_col), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.expand_dims(di_ref[0], -1))
        acc_ref[...] += jax.lax.dot_general(
            ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32
        )

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _backward_dkv(q, k, v, seg, lse, do, di, causal, bq, bk, interpret):
    b, h, tp, e = q.shape
    kh = k.shape[1]
    g = h // kh
    nq, nk = tp // bq, tp // bk
    r = live_block_ranges(seg, bq, bk, causal=causal)
    seg_col, seg_row = _segment_layouts(seg)

    # Grid (B, K, kv block, group member, q block): the last two axes reduce into
    # one dk/dv tile, so each kv head's gradient is summed over its G query heads.
    def q_map(bi, ki, j, gi, i, first, last):
        return bi, ki * g + gi, _clamp(i, first, last, bi * nk + j), 0

    def row_map(bi, ki, j, gi, i, first, last):
        return bi, ki * g + gi, 0, _clamp(i, first, last, bi * nk + j)

    def q_seg_map(bi, ki, j, gi, i, first, last):
        return bi, 0, _clamp(i, first, last, bi * nk + j)

    def kv_map(bi, ki, j, *_):
        return bi, ki, j, 0

    kernel = functools.partial(
        _dkv_kernel, causal=causal, scale=e**-0.5, bq=bq, bk=bk, nk=nk, nq=nq, g=g
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nk, g, nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, bk, LANES), lambda bi, ki, j, *_: (bi, j, 0)),
                pl.BlockSpec((None, 1, bq), q_seg_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bk, e), kv_map),
                pl.BlockSpec((None, None, bk, e), kv_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((bk, e), jnp.float32),
                pltpu.VMEM((bk, e), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_compiler_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        name="flash_bwd_dkv",
    )(r["q_first"].reshape(-1), r["q_last"].reshape(-1), q, k, v, seg_col, seg_row, lse, do, di)


def _dkv_kernel(
    first_ref,
    last_ref,
    q_ref,
    k_ref,
    v_ref,
    kv_seg_ref,
    q_seg_ref,
    lse_ref,
    do_ref,
    di_ref,
    dk_ref,
    dv_ref,
    dk_acc,
    dv_acc,
    *,
    causal,
    scale,
    bq,
    bk,
    nk,
    nq,
    g,
):
    bi, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    idx = bi * nk + j

    @pl.when((i >= first_ref[idx]) & (i <= last_ref[idx]))
    def _step():
        q, do = q_ref[...], do_ref[...]
        # Transposed scores [bk, bq]: the logsumexp and di rows broadcast along lanes.
        s_t = jax.lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)
        s_t = s_t * scale
        mask = _mask_t(kv_seg_ref[:, :1], q_seg_ref[...], j * bk, i * bq, causal)
        p_t = jnp.where(mask, jnp.exp(jnp.where(mask, s_t, 0.0) - lse_ref[...]), 0.0)
        dv_acc[...] += jax.lax.dot_general(
            p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
        )
        dp_t = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - di_ref[...])
        dk_acc[...] += jax.lax.dot_general(
            ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
        )

    @pl.when((gi == g - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
