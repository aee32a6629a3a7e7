"""Shared pieces of the benchmarks: timing, the matmul peak, model FLOPs, JSON lines."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def host_memory_settings() -> None:
    """`host_memory.apply_default()`: a benchmark's first call, before JAX starts its CPU
    backend; both sides then run under it. It may re-execute the script, so it is never
    run on import (pytest imports these modules with stdout captured)."""
    from qmath_jax import host_memory

    host_memory.apply_default()


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


# Vector extensions the CPU matrix kernels choose among, reported by `machine`.
VECTOR_EXTENSIONS = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16",
                               "avx512_vnni", "amx_bf16", "amx_tile"})


def machine(cpuinfo: str | None = None) -> dict:
    """The CPU the figures were taken on: model name, family and model numbers (AMD
    family 25 is Zen 3/4, 26 is Zen 5), the cores this process may use, the vector
    extensions the matrix kernels pick from, and the jax / torch versions. Benches that
    compare with a peer print it first, so that figures from different hosts are never
    read as a change in the code."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    first = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    flags = set(first.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "metric": "machine",
        "cpu": first.get("model name", "unknown"),
        "cpu_family": int(first["cpu family"]) if "cpu family" in first else None,
        "cpu_model": int(first["model"]) if "model" in first else None,
        "cores": cores,
        "vector_extensions": sorted(flags & VECTOR_EXTENSIONS),
        **_versions(),
    }


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for package in ("jax", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of `fn()` (which must block until its work is done) over repeats."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_flops(n: int = 2048, dtype: str = "float32") -> float:
    """FLOP/s of one large jitted square matmul: the machine's practical peak for XLA."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    seconds = best_time(lambda: mm(a, b).block_until_ready(), repeats=5)
    return 2 * n**3 / seconds


def memory_bandwidth(streams: int = 1, mbytes: int = 96, repeats: int = 5) -> float:
    """Bytes/s that `streams` concurrent jitted reductions read together, each over its own
    `mbytes` MiB array (well past the last-level cache): the DRAM rate that as many
    concurrent decode calls share."""
    import concurrent.futures

    import jax
    import jax.numpy as jnp

    rows = mbytes * 2**20 // (4 * 1024)
    arrays = [jnp.full((rows, 1024), float(i), jnp.float32) for i in range(streams)]
    total = jax.jit(lambda x: jnp.sum(x, axis=0))
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        def read_all():
            list(pool.map(lambda x: total(x).block_until_ready(), arrays))

        seconds = best_time(read_all, repeats=repeats)
    return streams * rows * 1024 * 4 / seconds


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul params + attention (full square)."""
    d, f, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_layers
    qkvo = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    matmul_params = L * (qkvo + 3 * d * f) + d * cfg.vocab_size
    attention = L * 2 * 2 * seq_len * cfg.num_heads * cfg.head_dim  # QK^T and PV
    return 3 * (2 * matmul_params + attention)
