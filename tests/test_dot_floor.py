"""bench/dot_floor.py reads the right products out of compiled HLO and replays them
faithfully: shapes, dimension numbers and FLOPs against hand counts, and PyTorch's
einsum of each parsed product against XLA's dot_general on the same operands."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import dot_floor


def _compiled_dots(fn, *args):
    return dot_floor.hlo_dots(jax.jit(fn).lower(*args).compile().as_text())


def test_finds_plain_and_batched_products_with_their_flops():
    a, b = jnp.ones((128, 64)), jnp.ones((64, 96))
    q, k = jnp.ones((4, 128, 64)), jnp.ones((4, 64, 80))
    dots = _compiled_dots(lambda a, b, q, k: (a @ b, jnp.matmul(q, k)), a, b, q, k)
    assert len(dots) == 2
    by_rank = {len(d[0]): d for d in dots}
    plain, batched = by_rank[2], by_rank[3]
    assert plain[:2] == ((128, 64), (64, 96))
    assert plain[2] == ((1,), (0,)) and plain[3] == ((), ())
    assert batched[:2] == ((4, 128, 64), (4, 64, 80))
    assert batched[2] == ((2,), (1,)) and batched[3] == ((0,), (0,))
    assert dot_floor.dot_flops(plain) == 2 * 128 * 64 * 96
    assert dot_floor.dot_flops(batched) == 2 * 4 * 128 * 64 * 80


@pytest.mark.parametrize(
    "dot",
    [
        ((128, 64), (64, 96), ((1,), (0,)), ((), ())),  # NN
        ((256, 48), (256, 40), ((0,), (0,)), ((), ())),  # a weight gradient, x^T dy
        ((8, 2, 64, 32), (8, 2, 96, 32), ((3,), (3,)), ((0, 1), (0, 1))),  # q k^T
        ((8, 2, 64, 96), (8, 2, 96, 32), ((3,), (2,)), ((0, 1), (0, 1))),  # p v
    ],
)
def test_torch_replay_equals_xla_dot_general(dot):
    torch = pytest.importorskip("torch")
    ((a, b),) = dot_floor._operands([dot], seed=1)
    want = np.asarray(jax.lax.dot_general(a, b, (dot[2], dot[3])))
    got = torch.einsum(dot_floor._einsum_spec(dot), torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
