"""Projections x @ w with a backward laid out for XLA:CPU.

Legend: N rows (batch x length), I input features, O output features.

XLA:CPU hands a dot to YNNPACK when both operands are row-major with the lhs
contracted on its last dim and the rhs on its first ("NN"). The gradients of x @ w
are not of that form: dx = dy @ w^T contracts w on its last dim (a slower YNNPACK
path) and dw = x^T @ dy contracts both on dim 0 (XLA then fuses dy's producer, e.g.
the SwiGLU gradient, with a transpose copy, slow inside the scanned layers).
`dense_cpu`'s backward instead transposes the small weight once, materialises dy
once, and gives dw as a dot of two materialised row-major operands.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_NO(x_NI: jax.Array, w_IO: jax.Array, out_dtype) -> jax.Array:
    return jnp.matmul(x_NI, w_IO, preferred_element_type=out_dtype)


def _matmul_fwd(x_NI, w_IO, out_dtype):
    return _matmul_NO(x_NI, w_IO, out_dtype), (x_NI, w_IO)


def _matmul_bwd(out_dtype, res, dy_NO):
    x_NI, w_IO = res
    dy_NO = jax.lax.optimization_barrier(dy_NO)  # materialise once, row-major
    w_OI = jax.lax.optimization_barrier(w_IO.T)  # a small copy keeps dx's dot "NN"
    dx_NI = jnp.matmul(dy_NO, w_OI.astype(dy_NO.dtype))
    dw_IO = jnp.einsum("NI,NO->IO", x_NI.astype(dy_NO.dtype), dy_NO)
    return dx_NI.astype(x_NI.dtype), dw_IO.astype(w_IO.dtype)


_matmul_NO.defvjp(_matmul_fwd, _matmul_bwd)


def dense_cpu(x_BT_I: jax.Array, w_I_O: jax.Array, out_dtype=None) -> jax.Array:
    """Contracts x's trailing dims (all but the two leading [B, T]) with w's leading ones.

    E.g. [B, T, D] x [D, H, E] -> [B, T, H, E]; [B, T, H, E] x [H, E, D] -> [B, T, D].
    out_dtype: as jnp.matmul's preferred_element_type (None: the operands' dtype).
    """
    b, t = x_BT_I.shape[:2]
    i = math.prod(x_BT_I.shape[2:])
    out_dims = w_I_O.shape[x_BT_I.ndim - 2:]
    y_NO = _matmul_NO(x_BT_I.reshape(b * t, i), w_I_O.reshape(i, -1), out_dtype)
    return y_NO.reshape(b, t, *out_dims)
