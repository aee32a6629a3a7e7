"""bench/generate.py's decode traffic model against hand counts for the bench preset."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import generate as generate_bench

from qmath_jax.model import get_preset, init_params


@pytest.fixture(scope="module")
def bench_model():
    cfg = get_preset("bench")
    return cfg, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def test_slots_read_follow_the_filled_blocks(bench_model):
    cfg, params = bench_model
    traffic = generate_bench.decode_traffic(cfg, params, rows=32, prompt_len=32, new_tokens=256)
    # 32 + 256 slots -> 5 blocks of 64. Decode steps 1..255 see 33..287 filled slots:
    # 32 steps read 1 block, 64 read 2, 64 read 3, 64 read 4, 31 read 5.
    slots = 32 * 64 + 64 * 128 + 64 * 192 + 64 * 256 + 31 * 320
    assert (traffic["cache_slots"], traffic["block"]) == (320, 64)
    assert traffic["slots_read"] == pytest.approx(slots / 255)
    entry = 4 * 2 * (2 * 64) * 4  # layers * (k, v) * kv_heads * head_dim * float32 bytes
    assert traffic["kv_bytes"] == pytest.approx(32 * entry * slots / 255)


def test_weights_and_flops_by_hand(bench_model):
    cfg, params = bench_model
    traffic = generate_bench.decode_traffic(cfg, params, rows=8, prompt_len=32, new_tokens=64)
    d, f, v, layers = 256, 704, 2048, 4
    kernels = layers * (d * 4 * 64 + 2 * d * 2 * 64 + 4 * 64 * d + 3 * d * f)  # q k v o, mlp
    biases_norms = layers * ((4 + 2 + 2) * 64 + 2 * d) + d
    assert traffic["weight_bytes"] == 4 * (kernels + d * v + biases_norms)  # untied head
    attention = layers * 2 * 2 * 8 * 4 * 64 * traffic["slots_read"]  # q.k and p.v, 4 heads
    assert traffic["flops"] == pytest.approx(2 * 8 * (kernels + d * v) + attention)
