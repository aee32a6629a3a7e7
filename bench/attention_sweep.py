"""Block sizes and Triton launch settings of our GPU flash attention, swept on one shape.

    JAX_PLATFORMS=cuda python bench/attention_sweep.py [--t 8192]

Forward alone over the forward tiles (q, kv) and warps/stages; then forward+backward
over the backward tiles (q, kv) with the forward at its default. B=1, H=28, K=4, E=128
(Qwen2.5-Math-7B's attention), bfloat16, one causal document. Prints a JSON line per
setting (TFLOP/s at the nominal causal FLOPs: 2 matmuls forward, 5 backward) and,
last, the best of each sweep beside cuDNN's figure for the same work.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from qmath_jax.model.kernels import flash_gpu


def _median_seconds(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _inputs(t: int, interpret: bool):
    b, h, kh, e = (1, 4, 2, 64) if interpret else (1, 28, 4, 128)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, e), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kh, e), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kh, e), jnp.bfloat16)
    return q, k, v, jnp.ones((b, t), jnp.int32)


def _with_launch(warps: int, stages: int):
    """Swaps the kernels' Triton launch settings (every kernel of one call)."""
    from jax.experimental.pallas import triton as plgpu

    flash_gpu._params = lambda launch, dtype: plgpu.CompilerParams(
        num_warps=warps, num_stages=stages
    )


def _run(name, fn, args, flops, iters):
    row = {"sweep": name}
    try:
        seconds = _median_seconds(fn, *args, iters=iters)
        row.update(ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 1))
    except Exception as err:  # noqa: BLE001 (a setting Triton cannot compile is a result)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    interpret = jax.default_backend() != "gpu"
    t = 64 if interpret else args.t
    q, k, v, seg = _inputs(t, interpret)
    b, _, h, e = q.shape
    causal_matmul = b * h * t * t * e  # 2 * (T^2 / 2) * E per head per matmul
    default_params = flash_gpu._params
    best = {}

    forward_tiles = [(128, 64), (128, 128), (64, 64), (64, 128)]
    launches = [(8, 2), (4, 2), (8, 3), (4, 3)]
    for fq, fk in forward_tiles:
        for warps, stages in launches:
            _with_launch(warps, stages)
            blocks = (fq, fk, 64, 64)
            fn = jax.jit(
                lambda q, k, v, blocks=blocks: flash_gpu.flash_attention(
                    q, k, v, seg, blocks=blocks, interpret=interpret
                )
            )
            row = _run("forward", fn, (q, k, v), 2 * causal_matmul, args.iters)
            row.update(blocks=blocks, warps=warps, stages=stages)
            print(json.dumps(row), flush=True)
            if row.get("tflops", 0) > best.get("forward", {}).get("tflops", 0):
                best["forward"] = row

    backward_tiles = [(64, 64), (32, 64), (64, 32), (128, 64), (64, 128), (32, 128), (128, 32)]
    for bq, bk in backward_tiles:
        for warps, stages in [(8, 2), (4, 2), (4, 3)]:
            _with_launch(warps, stages)
            blocks = (*flash_gpu.DEFAULT_BLOCKS[:2], bq, bk)

            def loss(q, k, v, blocks=blocks):
                out = flash_gpu.flash_attention(q, k, v, seg, blocks=blocks, interpret=interpret)
                return jnp.sum(out.astype(jnp.float32))

            fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            row = _run("forward+backward", fn, (q, k, v), 7 * causal_matmul, args.iters)
            row.update(blocks=blocks, warps=warps, stages=stages)
            print(json.dumps(row), flush=True)
            if row.get("tflops", 0) > best.get("backward", {}).get("tflops", 0):
                best["backward"] = row
    flash_gpu._params = default_params
    print(json.dumps({"best": best}), flush=True)


if __name__ == "__main__":
    main()
