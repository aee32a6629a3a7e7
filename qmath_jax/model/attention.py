"""Attention: the XLA reference and the dispatch to kernels.

Legend: B batch, T query length, S key length, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

NEG_INF = -1e30  # finite, so fully masked rows give zeros, never NaN


def packed_causal_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array) -> jax.Array:
    """[B, T, S] bool: same non-zero segment and key index <= query index (T == S)."""
    same_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    real_BTS = (q_segment_ids_BT != 0)[:, :, None]
    t, s = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    causal_TS = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    return same_BTS & real_BTS & causal_TS[None]


def self_attention_mask(segment_ids_BT: jax.Array, causal: bool) -> jax.Array:
    """[B, T, T] bool: same non-zero segment, and key index <= query index when causal."""
    if causal:
        return packed_causal_mask(segment_ids_BT, segment_ids_BT)
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return same_BTS & (segment_ids_BT != 0)[:, :, None]


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
    mask_BTS = self_attention_mask(segment_ids_BT, causal)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    probs_BKGTS = jnp.where(mask_BTS[:, None, None], probs_BKGTS, 0.0)
    out_BTKGE = jnp.einsum(
        "BKGTS,BSKE->BTKGE",
        probs_BKGTS.astype(v_BSKE.dtype),
        v_BSKE,
        preferred_element_type=jnp.float32,
    )
    return out_BTKGE.reshape(b, t, h, e).astype(q_BTHE.dtype)


def attention_xla_cpu(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    causal: bool = True,
) -> jax.Array:
    """`attention_xla` laid out for XLA:CPU, with a hand-written backward.

    Every dot is a row-major "NN" product batched over kv heads (what XLA:CPU hands to
    YNNPACK), the mask is one additive bias [B, T, S], padding rows are zeroed once on
    the output, causal attention skips the key blocks above the diagonal (query blocks,
    see MIN_QUERY_BLOCK), and the backward recomputes the probabilities transposed,
    [S, T*G], from the saved log-sum-exp, so that it needs only small transposes of q,
    k, v and the output gradient. Same contract as `attention_xla`.
    """
    mask_BTS = self_attention_mask(segment_ids_BT, causal)
    bias_BTS = jnp.where(mask_BTS, 0.0, NEG_INF).astype(jnp.float32)
    real_BT = (segment_ids_BT != 0).astype(jnp.float32)
    t = q_BTHE.shape[1]
    blocks = 1
    if causal and t == k_BSKE.shape[1]:
        blocks = max(1, min(MAX_QUERY_BLOCKS, t // MIN_QUERY_BLOCK))
    return _attention_cpu(q_BTHE, k_BSKE, v_BSKE, bias_BTS, real_BT, blocks)


def _pin(x: jax.Array) -> jax.Array:
    """Materialises x as laid out (XLA would fold a transpose into the dot that follows)."""
    return jax.lax.optimization_barrier(x)


def _bmm(a, b):
    """[B, K, M, C] x [B, K, C, N] -> [B, K, M, N], float32 accumulation."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _group_q(x_BTHE: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, E] -> [B, K, T*G, E]: the queries of each kv head, T-major."""
    b, t, h, e = x_BTHE.shape
    x_BTKGE = x_BTHE.reshape(b, t, kv_heads, h // kv_heads, e)
    return _pin(x_BTKGE.transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * (h // kv_heads), e))


def _ungroup_q(x_BKQE: jax.Array, t: int) -> jax.Array:
    """Inverse of `_group_q`: [B, K, T*G, E] -> [B, T, H, E]."""
    b, k, q, e = x_BKQE.shape
    x_BKTGE = x_BKQE.reshape(b, k, t, q // t, e)
    return x_BKTGE.transpose(0, 2, 1, 3, 4).reshape(b, t, k * (q // t), e)


# The causal CPU attention splits the queries into blocks of at least MIN_QUERY_BLOCK (at
# most MAX_QUERY_BLOCKS blocks); block [lo, hi) reads keys [0, hi) only: at T=256, 4 blocks
# compute 10/16 of the full [T, S] square.
MIN_QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 8


def _query_blocks(t: int, blocks: int) -> list[tuple[int, int]]:
    """[(start, end)) query index ranges; with causal masking block i needs keys [0, end)."""
    bounds = [round(t * i / blocks) for i in range(blocks + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _row_forward(q_KQE, kT_KES, v_KSE, bias_TS, *, blocks):
    """Softmax attention of one row: out [K, T*G, E] float32, lse [K, T*G]."""
    k, q, e = q_KQE.shape
    t, s = bias_TS.shape
    g = q // t
    outs, lses = [], []
    for lo, hi in _query_blocks(t, blocks):
        end = hi if blocks > 1 else s
        logits_KQS = _bmm(q_KQE[:, lo * g:hi * g], kT_KES[:, :, :end]) * (e**-0.5)
        logits_KTGS = logits_KQS.reshape(k, hi - lo, g, end) + bias_TS[lo:hi, None, :end]
        max_KTG1 = jnp.max(logits_KTGS, axis=-1, keepdims=True)
        exp_KTGS = jnp.exp(logits_KTGS - max_KTG1)
        sum_KTG1 = jnp.sum(exp_KTGS, axis=-1, keepdims=True)
        probs_KQS = (exp_KTGS / sum_KTG1).reshape(logits_KQS.shape)
        outs.append(_bmm(probs_KQS.astype(v_KSE.dtype), v_KSE[:, :end]))
        lses.append((max_KTG1 + jnp.log(sum_KTG1)).reshape(k, -1))
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _row_backward(q_KQE, k_KSE, kT_KES, v_KSE, dout_KQE, out_KQE, lse_KQ, biasT_ST, *, blocks):
    """One row's (dq^T [K, E, T*G], dk [K, S, E], dv [K, S, E]), from probabilities recomputed
    transposed, [K, S, T*G], so that every dot is NN."""
    k, q, e = q_KQE.shape
    s, t = biasT_ST.shape
    g = q // t
    delta_KQ = jnp.sum(dout_KQE * out_KQE, axis=-1)
    dqTs, dk_KSE, dv_KSE = [], 0.0, 0.0
    for lo, hi in _query_blocks(t, blocks):
        end = hi if blocks > 1 else s
        q_KqE, dout_KqE = q_KQE[:, lo * g:hi * g], dout_KQE[:, lo * g:hi * g]
        logitsT_KSq = _bmm(k_KSE[:, :end], q_KqE.swapaxes(1, 2)) * (e**-0.5)
        logitsT_KStg = logitsT_KSq.reshape(k, end, hi - lo, g) + biasT_ST[:end, lo:hi, None]
        lse_Kq = lse_KQ[:, lo * g:hi * g]
        probsT_KSq = jnp.exp(logitsT_KStg.reshape(logitsT_KSq.shape) - lse_Kq[:, None, :])
        dv_KsE = _bmm(probsT_KSq.astype(v_KSE.dtype), dout_KqE.astype(v_KSE.dtype))
        dprobsT_KSq = _bmm(v_KSE[:, :end], dout_KqE.swapaxes(1, 2).astype(v_KSE.dtype))
        delta_Kq = delta_KQ[:, lo * g:hi * g]
        dlogitsT_KSq = probsT_KSq * (dprobsT_KSq - delta_Kq[:, None, :]) * (e**-0.5)
        dk_KsE = _bmm(dlogitsT_KSq.astype(q_KQE.dtype), q_KqE)
        dqTs.append(_bmm(kT_KES[:, :, :end], dlogitsT_KSq.astype(kT_KES.dtype)))
        pad = ((0, 0), (0, s - end), (0, 0))
        dk_KSE = dk_KSE + jnp.pad(dk_KsE, pad)
        dv_KSE = dv_KSE + jnp.pad(dv_KsE, pad)
    return _pin(jnp.concatenate(dqTs, axis=2)), _pin(dk_KSE), _pin(dv_KSE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_cpu(q_BTHE, k_BSKE, v_BSKE, bias_BTS, real_BT, blocks):
    return _attention_cpu_fwd(q_BTHE, k_BSKE, v_BSKE, bias_BTS, real_BT, blocks)[0]


def _attention_cpu_fwd(q_BTHE, k_BSKE, v_BSKE, bias_BTS, real_BT, blocks):
    t = q_BTHE.shape[1]
    q_BKQE = _group_q(q_BTHE, k_BSKE.shape[2])
    kT_BKES = _pin(k_BSKE.transpose(0, 2, 3, 1))
    v_BKSE = _pin(v_BSKE.transpose(0, 2, 1, 3))
    row_forward = functools.partial(_row_forward, blocks=blocks)
    out_BKQE, lse_BKQ = jax.vmap(row_forward)(q_BKQE, kT_BKES, v_BKSE, bias_BTS)
    out_BTHE = _ungroup_q(_pin(out_BKQE), t) * real_BT[:, :, None, None]
    res = (q_BKQE, k_BSKE, v_BKSE, kT_BKES, bias_BTS, real_BT, out_BKQE, lse_BKQ)
    return out_BTHE.astype(q_BTHE.dtype), res


def _attention_cpu_bwd(blocks, res, dout_BTHE):
    q_BKQE, k_BSKE, v_BKSE, kT_BKES, bias_BTS, real_BT, out_BKQE, lse_BKQ = res
    t, k = dout_BTHE.shape[1], k_BSKE.shape[2]
    dout_BKQE = _group_q(dout_BTHE.astype(jnp.float32) * real_BT[:, :, None, None], k)
    k_BKSE = _pin(k_BSKE.transpose(0, 2, 1, 3))
    biasT_BST = bias_BTS.swapaxes(1, 2)
    row_backward = functools.partial(_row_backward, blocks=blocks)
    dqT_BKEQ, dk_BKSE, dv_BKSE = jax.vmap(row_backward)(
        q_BKQE, k_BKSE, kT_BKES, v_BKSE, dout_BKQE, out_BKQE, lse_BKQ, biasT_BST
    )
    dq_BTHE = _ungroup_q(dqT_BKEQ.swapaxes(2, 3), t)
    return (dq_BTHE.astype(q_BKQE.dtype), dk_BKSE.swapaxes(1, 2).astype(k_BSKE.dtype),
            dv_BKSE.swapaxes(1, 2).astype(k_BSKE.dtype), None, None)


_attention_cpu.defvjp(_attention_cpu_fwd, _attention_cpu_bwd)


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
        "BKGS,BSKE->BKGE",
        probs_BKGS.astype(v_cache_BSKE.dtype),
        v_cache_BSKE,
        preferred_element_type=jnp.float32,
    )
    return out_BKGE.reshape(b, h, e).astype(q_BHE.dtype)


# ----------------------------------------------------------------------------- dispatch
# attend / decode_attend pick an implementation for the platform of the mesh the
# step is compiled for (never the host's: a CPU host AOT-compiling for a TPU
# topology must get the TPU kernel), and wrap kernels in shard_map so each device
# runs them on its local batch rows and heads.

IMPLS = ("auto", "xla", "pallas", "splash", "cudnn")
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def target_platform(mesh: jax.sharding.Mesh | None) -> str:
    """'tpu', 'gpu' or 'cpu': the mesh's devices, else JAX's default backend."""
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_impl(impl: str, platform: str, dtype=None) -> str:
    """Maps 'auto' to the platform's kernel and rejects impls the platform lacks.

    On GPUs 'auto' is our Triton kernel. Where this JAX has no Pallas Triton backend
    (deprecated in JAX 0.11; `kernels.triton_backend`) it is cuDNN for 16-bit inputs
    (`dtype`; cuDNN takes no float32) and the XLA reference otherwise.
    """
    from qmath_jax.model.kernels import triton_backend

    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; choose one of {IMPLS}")
    if impl == "auto":
        if platform == "gpu" and not triton_backend():
            half = dtype is not None and jnp.dtype(dtype).itemsize == 2
            return "cudnn" if half else "xla"
        return {"tpu": "pallas", "gpu": "pallas"}.get(platform, "xla")
    if impl == "pallas" and platform == "gpu" and not triton_backend():
        raise ValueError(
            f"attention_impl='pallas' on GPUs runs Triton kernels, and JAX {jax.__version__} "
            "has no Pallas Triton backend (jax.experimental.pallas.triton); use "
            "attention_impl='auto' or 'cudnn', or a JAX that still ships it"
        )
    if impl == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"impl='splash' is a TPU kernel; the mesh platform is {platform!r}")
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"impl='cudnn' needs a GPU mesh; the mesh platform is {platform!r}")
    return impl


def attend(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    interpret: bool | None = None,
    causal: bool = True,
) -> jax.Array:
    """Causal grouped-query self-attention over packed rows, by the chosen implementation.

    Args:
      q_BTHE: [B, T, H, E] queries.
      k_BSKE: [B, T, K, E] keys (S == T).
      v_BSKE: [B, T, K, E] values.
      segment_ids_BT: [B, T] int, 0 = padding (zero output, zero gradients).
      impl: 'xla' (reference), 'pallas' (ours: Mosaic on TPU, Triton on GPU, the
        Mosaic kernel interpreted on CPU), 'splash' (JAX's TPU splash kernel),
        'cudnn' (jax.nn.dot_product_attention on GPU), or 'auto' (pallas on TPU
        and GPU, xla on CPU), chosen by the mesh's platform.
      mesh: the mesh the step is compiled for, with axes ('data', 'fsdp',
        'tensor'); kernels then run under shard_map, batch over data/fsdp and
        heads over tensor. None: call directly.
      interpret: Pallas interpret mode; default True only when the platform is CPU.
      causal: causal mask (the decoder always uses True).

    Returns:
      [B, T, H, E] in q's dtype.
    """
    platform = target_platform(mesh)
    impl = resolve_impl(impl, platform, q_BTHE.dtype)
    if interpret is None:
        interpret = platform == "cpu"
    fn = _attention_fn(impl, platform, interpret, causal)
    if mesh is None or impl == "xla":
        return fn(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
    return _sharded(fn, mesh, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, kv_axis=2)


def decode_attend(
    q_BHE: jax.Array,
    k_cache_BSKE: jax.Array,
    v_cache_BSKE: jax.Array,
    lengths_B: jax.Array,
    *,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """One new query per row against its first lengths[b] cache slots.

    Args:
      q_BHE: [B, H, E] queries.
      k_cache_BSKE: [B, S, K, E] key cache.
      v_cache_BSKE: [B, S, K, E] value cache.
      lengths_B: [B] int, valid slots per row.
      impl: as in `attend`; 'pallas' (and 'auto' on TPU/GPU) runs the decode kernel,
        'splash' and 'cudnn' have no decode variant and use it too (`decode_impl`).
      mesh: as in `attend`.
      interpret: as in `attend`.

    Returns:
      [B, H, E] in q's dtype.
    """
    from qmath_jax.model.kernels import decode

    platform = target_platform(mesh)
    impl = decode_impl(impl, platform)
    if interpret is None:
        interpret = platform == "cpu"
    if impl == "xla":
        return decode_attention_xla(q_BHE, k_cache_BSKE, v_cache_BSKE, lengths_B)
    kernel = decode.decode_attention_gpu if platform == "gpu" else decode.decode_attention_tpu
    fn = functools.partial(kernel, interpret=interpret)
    if mesh is None:
        return fn(q_BHE, k_cache_BSKE, v_cache_BSKE, lengths_B)
    return _sharded(
        fn, mesh, q_BHE, k_cache_BSKE, v_cache_BSKE, lengths_B, kv_axis=2, q_head_axis=1
    )


def decode_impl(impl: str, platform: str) -> str:
    """What `decode_attend` runs for `impl` on `platform`: 'xla' or 'pallas' (the decode
    kernel, which also serves 'splash' and 'cudnn'; on GPUs only with Pallas' Triton
    backend, else 'xla')."""
    impl = resolve_impl(impl, platform)
    if impl == "xla":
        return "xla"
    if platform == "gpu" and impl == "cudnn":
        from qmath_jax.model.kernels import triton_backend

        return "pallas" if triton_backend() else "xla"
    return "pallas"


def _attention_fn(impl: str, platform: str, interpret: bool, causal: bool):
    if impl == "xla":
        reference = attention_xla_cpu if platform == "cpu" else attention_xla
        return functools.partial(reference, causal=causal)
    if impl == "pallas":
        if platform == "gpu":
            from qmath_jax.model.kernels import flash_gpu

            return functools.partial(flash_gpu.flash_attention, causal=causal, interpret=interpret)
        from qmath_jax.model.kernels import flash_tpu

        if interpret:  # small tiles keep the interpreter quick; TPU needs 128-multiples
            return functools.partial(
                flash_tpu.flash_attention, causal=causal, interpret=True, block_q=32, block_kv=32
            )
        return functools.partial(flash_tpu.flash_attention, causal=causal)
    if not causal:
        raise ValueError(f"impl={impl!r} is wired for causal attention only; use 'pallas'")
    if impl == "splash":
        return functools.partial(splash_attention, interpret=interpret)
    return cudnn_attention


def _sharded(fn, mesh, q, k, v, rest, *, kv_axis: int, q_head_axis: int = 2):
    """Runs fn under shard_map: batch over data/fsdp, heads over tensor.

    Batch rows that do not divide over the batch axes (a small decode batch) are
    replicated. Kv heads follow the q heads over 'tensor' when K divides; when
    fewer kv heads than shards, each shard keeps all kv heads and slices out the
    one its q heads use (needs H / tensor to divide G).
    """
    axes = dict(zip(mesh.axis_names, mesh.devices.shape))
    batch = tuple(a for a in _BATCH_AXES if axes.get(a, 1) > 1)
    if q.shape[0] % math.prod(axes[a] for a in batch):
        batch = ()
    b_spec = batch or None
    tp = axes.get(_HEAD_AXIS, 1)
    h, kh = q.shape[q_head_axis], k.shape[kv_axis]
    if h % tp:
        raise ValueError(f"{h} query heads do not divide over mesh axis 'tensor' of size {tp}")
    local_h = h // tp
    g = h // kh

    def spec(ndim, head_axis, head_name):
        parts = [None] * ndim
        parts[0] = b_spec
        if head_axis is not None:
            parts[head_axis] = head_name
        return P(*parts)

    head_name = _HEAD_AXIS if tp > 1 else None
    q_spec = spec(q.ndim, q_head_axis, head_name)
    rest_spec = spec(rest.ndim, None, None)
    if tp == 1 or kh % tp == 0:
        kv_spec, local_fn = spec(k.ndim, kv_axis, head_name), fn
    elif g % local_h == 0:
        kv_spec = spec(k.ndim, None, None)

        def local_fn(q_l, k_l, v_l, rest_l):
            kv_head = jax.lax.axis_index(_HEAD_AXIS) * local_h // g
            pick = functools.partial(
                jax.lax.dynamic_slice_in_dim, start_index=kv_head, slice_size=1, axis=kv_axis
            )
            return fn(q_l, pick(k_l), pick(v_l), rest_l)
    else:
        raise ValueError(
            f"{kh} kv heads cannot follow {h} query heads over 'tensor'={tp}: need K % {tp} == 0 "
            f"or G={g} a multiple of H/tensor={local_h}; change the mesh's tensor size"
        )
    specs = (q_spec, kv_spec, kv_spec, rest_spec)
    args = (q, k, v, rest)
    if jax.sharding.AxisType.Explicit in tuple(getattr(mesh, "axis_types", ())):
        # Explicit-axis meshes type shardings: move inputs onto the kernel's layout.
        args = tuple(jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs))
    return jax.shard_map(local_fn, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
        *args
    )


def splash_attention(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    interpret: bool = False,
    block: int = 512,
) -> jax.Array:
    """JAX's TPU splash attention (causal, segment ids, native GQA) in our contract.

    Pads T to the block size (padding rows are segment 0), scales q by E**-0.5
    (splash does not scale) and zeroes the rows of segment 0, which splash lets
    attend to each other.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    from qmath_jax.model.kernels import pad_axis, round_up

    t, h, e = q_BTHE.shape[1:]
    blk = min(block, round_up(t, 128))
    tp = round_up(t, blk)
    q = pad_axis(jnp.swapaxes(q_BTHE * jnp.asarray(e**-0.5, q_BTHE.dtype), 1, 2), 2, tp)
    k = pad_axis(jnp.swapaxes(k_BSKE, 1, 2), 2, tp)
    v = pad_axis(jnp.swapaxes(v_BSKE, 1, 2), 2, tp)
    seg = pad_axis(segment_ids_BT.astype(jnp.int32), 1, tp)
    sizes = sa.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((tp, tp))] * h)
    kernel = sa.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    out_BHTE = jax.vmap(kernel)(q, k, v, sa.SegmentIds(q=seg, kv=seg))
    out = jnp.swapaxes(out_BHTE[:, :, :t], 1, 2)
    return jnp.where((segment_ids_BT != 0)[:, :, None, None], out, 0).astype(q_BTHE.dtype)


def cudnn_attention(
    q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, segment_ids_BT: jax.Array
) -> jax.Array:
    """jax.nn.dot_product_attention with cuDNN: causal plus a [B, 1, T, S] segment mask.

    The segment mask is materialised (cuDNN has no segment ids on this API), so
    memory grows with T**2; rows of segment 0 are zeroed afterwards.
    """
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    out = jax.nn.dot_product_attention(
        q_BTHE,
        k_BSKE,
        v_BSKE,
        mask=same_BTS[:, None],
        is_causal=True,
        implementation="cudnn",
    )
    return jnp.where((segment_ids_BT != 0)[:, :, None, None], out, 0).astype(q_BTHE.dtype)
