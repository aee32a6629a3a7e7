"""Attention forward+backward throughput and memory: ours vs the XLA reference vs the
platform's library kernel (cuDNN on GPU, splash on TPU), measured in one run.

    python bench/attention.py            # GPU / TPU: T = 2k, 4k, 8k, 16k, E = 128
    python bench/attention.py --smoke    # CPU (automatic there): interpreted, tiny

Each row is one document per sequence (causal, segment ids all 1), B=1, H=28 query
and K=4 kv heads (Qwen2.5-Math-7B's attention), bfloat16. FLOPs are the nominal
causal count 7 * B * H * T^2 * E (forward 2 matmuls, backward 5, half masked), the
same for every implementation. Memory is the compiled step's temporary buffers
(XLA memory analysis), so it compares like with like on every backend.
Prints one JSON line per (impl, T) and, last, {"ours", "peer", "ratio"}: the
geometric-mean TFLOP/s over the lengths where both ran.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp

from qmath_jax.model import attention


def _peer_fn(platform: str, interpret: bool):
    """The library kernel: cuDNN on GPU (its causal fast path), splash on TPU."""
    if platform == "gpu":

        def cudnn(q, k, v, seg):
            del seg  # one document per row: cuDNN's causal mask is the whole mask
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        return "cudnn", cudnn

    def splash(q, k, v, seg):
        return attention.splash_attention(q, k, v, seg, interpret=interpret)

    return "splash", splash


def _impls(platform: str, interpret: bool):
    ours = "pallas_triton" if platform == "gpu" else "pallas_mosaic"
    peer_name, peer = _peer_fn(platform, interpret)
    return (
        {
            ours: lambda q, k, v, seg: attention.attend(
                q, k, v, seg, impl="pallas", interpret=interpret
            ),
            "xla": lambda q, k, v, seg: attention.attend(q, k, v, seg, impl="xla"),
            peer_name: peer,
        },
        ours,
        peer_name,
    )


def _measure(fn, b, t, h, kh, e, iters):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, e), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kh, e), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kh, e), jnp.bfloat16)
    w = jax.random.normal(keys[3], (b, t, h, e), jnp.bfloat16)
    seg = jnp.ones((b, t), jnp.int32)

    def loss(q, k, v):
        return jnp.sum((fn(q, k, v, seg) * w).astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    compiled = step.trace(q, k, v).lower().compile()
    mem = compiled.memory_analysis()
    temp_mb = None if mem is None else mem.temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = 7 * b * h * t * t * e
    return {
        "ms": round(seconds * 1e3, 3),
        "tflops": round(flops / seconds / 1e12, 4),
        "temp_mb": None if temp_mb is None else round(temp_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny interpreted sizes (the default on CPU)"
    )
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    platform = attention.target_platform(None)
    smoke = args.smoke or platform == "cpu"
    interpret = platform == "cpu"
    if smoke:
        b, h, kh, e, lengths, iters = 1, 4, 2, 128, (128, 256), 1
    else:
        b, h, kh, e, lengths, iters = 1, 28, 4, 128, (2048, 4096, 8192, 16384), args.iters
    impls, ours, peer = _impls(platform, interpret)
    results: dict[str, dict[int, float]] = {name: {} for name in impls}
    for t in lengths:
        for name, fn in impls.items():
            row = {"impl": name, "platform": platform, "B": b, "T": t, "H": h, "K": kh, "E": e}
            try:
                row.update(_measure(fn, b, t, h, kh, e, iters))
                results[name][t] = row["tflops"]
            except (
                jax.errors.JaxRuntimeError,
                RuntimeError,
                ValueError,
            ) as err:  # e.g. XLA OOM at 16k
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
    both = [t for t in lengths if t in results[ours] and t in results[peer]]

    def gmean(name):
        return math.exp(statistics.mean(math.log(results[name][t]) for t in both)) if both else 0.0

    ours_v, peer_v = gmean(ours), gmean(peer)
    print(
        json.dumps(
            {
                "metric": f"fwd+bwd TFLOP/s, geometric mean over T={both}, {ours} vs {peer}",
                "ours": round(ours_v, 4),
                "peer": round(peer_v, 4),
                "ratio": round(ours_v / peer_v, 4) if peer_v else None,
            }
        )
    )


if __name__ == "__main__":
    main()
