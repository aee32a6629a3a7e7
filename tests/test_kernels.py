"""Pallas attention kernels against the XLA reference (interpret mode on CPU),
TPU lowering by AOT compilation for a TPU topology, Triton lowering for CUDA.

Legend: B batch, T length, H query heads, K kv heads, G = H / K, E head dim.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_result import script_result

from qmath_jax.model import attention
from qmath_jax.model.kernels import decode, flash_gpu, flash_tpu, live_block_ranges

F32_TOL = 1e-5
BF16_TOL = 2e-2


def _segments(kind: str, b: int, t: int, seed: int = 0) -> np.ndarray:
    """[B, T] packed segment ids. 'one': one document; 'two': two documents then
    padding; 'many': many short documents, padding inside a row and at its end."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        if kind == "one":
            seg[row] = 1
        elif kind == "two":
            cut, end = t // 3 + row, t - 3 - 2 * row
            seg[row, :cut], seg[row, cut:end] = 1, 2
        else:
            pos, sid = 0, 1
            while pos < t - 4:
                n = int(rng.integers(1, 7))
                seg[row, pos : pos + n] = sid
                pos += n + (2 if row == 1 and sid == 2 else 0)  # a gap of padding
                sid += 1
    return seg


def _inputs(b, t, h, kh, e, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, e), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, kh, e), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, kh, e), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[3], (b, t, h, e), jnp.float32)
    return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
    """One jitted call: the output and d(sum(out * w))/d(q, k, v)."""

    @jax.jit
    def run(q, k, v):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(w.astype(out.dtype))

    return run(q, k, v)


KERNELS = {
    "tpu": lambda seg: (
        lambda q, k, v: flash_tpu.flash_attention(
            q, k, v, seg, block_q=16, block_kv=32, interpret=True
        )
    ),
    "gpu": lambda seg: (
        lambda q, k, v: flash_gpu.flash_attention(
            q, k, v, seg, blocks=(16, 32, 32, 16), interpret=True
        )
    ),
}


def _check_kernel(kernel, g, t, segs, e, dtype, tol, kh=1):
    b, h = 2, g * kh
    q, k, v, w = _inputs(b, t, h, kh, e, dtype)
    seg = jnp.asarray(_segments(segs, b, t))
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: attention.attention_xla(q, k, v, seg), q, k, v, w
    )
    out, grads = _value_and_grads(KERNELS[kernel](seg), q, k, v, w)
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        got32, want32 = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.all(np.isfinite(got32)), f"{name} has NaN/inf"
        np.testing.assert_allclose(got32, want32, atol=tol, rtol=tol, err_msg=name)
        # Padding rows (segment 0) give exact zeros: output and every gradient.
        pad = np.asarray(seg) == 0
        assert not np.any(got32[pad]), f"{name} is non-zero on padding rows"


# (G, T, segments, E): T=32 is a block multiple, 45 and 40 are not.
FAST_GRID = [(1, 32, "one", 64), (2, 40, "two", 128), (7, 45, "many", 64)]


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("g,t,segs,e", FAST_GRID)
def test_flash_matches_reference_f32(kernel, g, t, segs, e):
    _check_kernel(kernel, g, t, segs, e, jnp.float32, F32_TOL)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_flash_matches_reference_bf16(kernel):
    _check_kernel(kernel, 2, 40, "many", 128, jnp.bfloat16, BF16_TOL, kh=2)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("g", [1, 2, 7])
@pytest.mark.parametrize("t", [32, 45])
@pytest.mark.parametrize("segs", ["one", "two", "many"])
@pytest.mark.parametrize("e", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flash_matches_reference_wide(kernel, g, t, segs, e, dtype):
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    _check_kernel(kernel, g, t, segs, e, jnp.dtype(dtype), tol, kh=2)


def test_live_block_ranges_envelope_every_unmasked_tile():
    seg = _segments("many", 2, 64, seed=3)
    seg[0, 40:] = 0
    bq, bk = 8, 16
    mask = np.asarray(attention.packed_causal_mask(jnp.asarray(seg), jnp.asarray(seg)))
    tiles = mask.reshape(2, 64 // bq, bq, 64 // bk, bk).any(axis=(2, 4))  # [B, nq, nk]
    r = {
        k: np.asarray(v)
        for k, v in live_block_ranges(jnp.asarray(seg), bq, bk, causal=True).items()
    }
    for b, i, j in zip(*np.nonzero(tiles)):
        assert r["kv_first"][b, i] <= j <= r["kv_last"][b, i]
        assert r["q_first"][b, j] <= i <= r["q_last"][b, j]
    # The envelope is tight for rising ids: no visited tile outside [first live, last live].
    for b in range(2):
        for i in range(64 // bq):
            live = np.nonzero(tiles[b, i])[0]
            if live.size:
                assert (r["kv_first"][b, i], r["kv_last"][b, i]) == (live[0], live[-1])
            else:
                assert r["kv_first"][b, i] > r["kv_last"][b, i]


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_decode_matches_reference_ragged(kernel):
    b, s, h, kh, e = 4, 100, 14, 2, 64
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, h, e))
    k_cache = jax.random.normal(keys[1], (b, s, kh, e))
    v_cache = jax.random.normal(keys[2], (b, s, kh, e))
    lengths = jnp.array([0, 1, 37, 100])
    want = attention.decode_attention_xla(q, k_cache, v_cache, lengths)
    if kernel == "tpu":
        got = decode.decode_attention_tpu(q, k_cache, v_cache, lengths, block_kv=32, interpret=True)
    else:
        got = decode.decode_attention_gpu(
            q, k_cache, v_cache, lengths, block_kv=16, splits=3, interpret=True
        )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=F32_TOL, rtol=F32_TOL)
    assert not np.any(np.asarray(got)[0]), "length 0 must give zeros"


def test_resolve_impl_by_mesh_platform():
    assert attention.resolve_impl("auto", "tpu") == "pallas"
    assert attention.resolve_impl("auto", "gpu") == "pallas"
    assert attention.resolve_impl("auto", "cpu") == "xla"
    assert attention.decode_impl("cudnn", "gpu") == "pallas"  # the Triton decode kernel
    assert attention.decode_impl("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="unknown"):
        attention.resolve_impl("flash", "tpu")
    with pytest.raises(ValueError, match="GPU"):
        attention.resolve_impl("cudnn", "cpu")
    with pytest.raises(ValueError, match="TPU"):
        attention.resolve_impl("splash", "gpu")
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    assert attention.target_platform(mesh) == "cpu"


def test_bad_shapes_are_named():
    q, k, v, _ = _inputs(1, 8, 3, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_tpu.flash_attention(q, k, v, jnp.ones((1, 8), jnp.int32), interpret=True)
    q, k, v, _ = _inputs(1, 8, 2, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_gpu.flash_attention(q, k, v, jnp.ones((1, 9), jnp.int32), interpret=True)


@pytest.mark.parametrize("h,kh", [(4, 2), (2, 1)])  # kv heads sharded / kv heads replicated
def test_attend_under_mesh_matches_reference(h, kh):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    q, k, v, _ = _inputs(4, 40, h, kh, 64, jnp.float32)
    seg = jnp.asarray(_segments("two", 4, 40))
    want = attention.attend(q, k, v, seg, impl="xla")
    for impl in ("pallas", "splash"):
        got = jax.jit(
            lambda q, k, v, impl=impl: attention.attend(q, k, v, seg, impl=impl, mesh=mesh)
        )(q, k, v)
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), atol=F32_TOL, rtol=F32_TOL, err_msg=impl
        )
    lengths = jnp.array([0, 5, 40, 17])
    got = attention.decode_attend(q[:, 0], k, v, lengths, impl="auto", mesh=mesh)
    want = attention.decode_attention_xla(q[:, 0], k, v, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=F32_TOL, rtol=F32_TOL)


_AOT_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    from qmath_jax.model import attention

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))

    def arg(shape, spec, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    b, t, h, kh, e = 4, 1000, 8, 2, 128  # t is not a block multiple
    heads = P("data", None, "tensor")
    args = [arg((b, t, h, e), heads), arg((b, t, kh, e), heads), arg((b, t, kh, e), heads),
            arg((b, t), P("data"), jnp.int32)]
    result = {}
    for impl in ("auto", "splash"):
        def loss(q, k, v, seg):
            out = attention.attend(q, k, v, seg, impl=impl, mesh=mesh)
            return jnp.sum(out.astype(jnp.float32))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        compiled = step.trace(*args).lower().compile()
        result[impl] = compiled.as_text().count("tpu_custom_call")
    cache = arg((b, 2048, kh, e), heads)
    dec = jax.jit(lambda q, k, v, n: attention.decode_attend(q, k, v, n, mesh=mesh))
    compiled = dec.trace(arg((b, h, e), P("data", "tensor")), cache, cache,
                         arg((b,), P("data"), jnp.int32)).lower().compile()
    result["decode"] = compiled.as_text().count("tpu_custom_call")
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not importable: install jax[tpu] to AOT-compile for TPU",
)
def test_tpu_kernels_compile_for_tpu_topology():
    # A subprocess: libtpu then holds its process lock only while compiling, and
    # ALLOW_MULTIPLE_LIBTPU_LOAD lets it run while another process holds the lock.
    payload = script_result(
        _AOT_SCRIPT,
        300,
        JAX_PLATFORMS="cpu",
        TPU_SKIP_MDS_QUERY="1",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    )
    counts = json.loads(payload)
    assert counts["auto"] >= 3, counts  # our forward, dq and dk/dv Mosaic kernels
    assert counts["splash"] >= 3, counts
    assert counts["decode"] >= 1, counts


def test_gpu_kernels_lower_to_triton():
    args = [
        jax.ShapeDtypeStruct(s, jnp.bfloat16)
        for s in [(1, 200, 28, 128), (1, 200, 4, 128), (1, 200, 4, 128)]
    ]
    seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(flash_gpu.flash_attention(q, k, v, seg).astype(jnp.float32))

    lowered = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(*args, seg)
        .lower(lowering_platforms=("cuda",))
    )
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv
    cache = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    lowered = (
        jax.jit(decode.decode_attention_gpu)
        .trace(
            jax.ShapeDtypeStruct((2, 28, 128), jnp.bfloat16),
            cache,
            cache,
            jax.ShapeDtypeStruct((2,), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
    )
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


_NO_TRITON_SCRIPT = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # as if JAX had dropped the backend
import jax, jax.numpy as jnp, numpy as np
from qmath_jax.model import attention
keys = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(keys[0], (2, 4, 64))
k = jax.random.normal(keys[1], (2, 256, 2, 64))
v = jax.random.normal(keys[2], (2, 256, 2, 64))
lengths = jnp.array([3, 200])
got = attention.decode_attend(q, k, v, lengths, impl="pallas")  # the TPU kernel, interpreted
want = attention.decode_attention_xla(q, k, v, lengths)
# GPUs fall back to cuDNN for training and XLA for decoding; 'pallas' there is refused.
assert attention.resolve_impl("auto", "gpu", jnp.bfloat16) == "cudnn"
assert attention.resolve_impl("auto", "gpu", jnp.float32) == "xla"  # cuDNN takes no float32
assert attention.decode_impl("auto", "gpu") == "xla"
assert attention.decode_impl("auto", "tpu") == "pallas"
try:
    attention.resolve_impl("pallas", "gpu")
    raise AssertionError("pallas on a GPU without Triton must be refused")
except ValueError as e:
    assert "no Pallas Triton backend" in str(e) and "'cudnn'" in str(e), e
print("RESULT", float(np.max(np.abs(np.asarray(got) - np.asarray(want)))))
"""


def test_kernels_without_the_triton_backend():
    # JAX 0.11 deprecates Pallas' Triton backend: only the GPU kernels may import it, and
    # without it GPUs get cuDNN and XLA decoding.
    assert float(script_result(_NO_TRITON_SCRIPT, 300, JAX_PLATFORMS="cpu")) < 1e-5
