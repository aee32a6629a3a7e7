"""host_memory: freed host memory is reused, measured by the kernel's page-fault count."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from qmath_jax import host_memory

# A jitted program whose 64 MB intermediate y lives in XLA:CPU's temporary buffer; the
# child counts the minor page faults of each of runs 7 to 15 (the heap may still grow in
# one or two of them).
_CHILD = r"""
import json, os, resource
from qmath_jax import host_memory
host_memory.apply_default()  # before JAX starts, as the benchmarks do (may re-execute)
import jax, jax.numpy as jnp
x = jnp.ones((8192, 64), jnp.float32)
w = jnp.ones((64, 2048), jnp.float32)
f = jax.jit(lambda x, w: jnp.tanh(x @ w).T @ x)
for _ in range(6):  # the heap reaches its working size
    f(x, w).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""

_TEMP_PAGES = 8192 * 2048 * 4 // 4096  # y's 4 KiB pages


def _child(keep: str) -> tuple[float, str]:
    """(median minor faults per run, the child's GLIBC_TUNABLES) with QMATH_KEEP_HOST_MEMORY."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QMATH_KEEP_HOST_MEMORY": keep}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, lines  # the re-executed program ran once to the end
    record = json.loads(lines[0])
    return statistics.median(record["faults"]), record["tunables"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_memory_is_not_faulted_in_again():
    (kept, kept_tunables), (default, default_tunables) = _child("1"), _child("0")
    assert default > 0.5 * _TEMP_PAGES, default  # glibc maps the temporaries afresh
    assert kept < 0.05 * _TEMP_PAGES, kept
    assert kept_tunables == host_memory.HUGE_PAGES_TUNABLE and default_tunables == ""


def test_huge_pages_env_adds_the_tunable_once():
    env = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "A": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1",
                   "A": "1"}
    assert host_memory.huge_pages_env(env) is None
    assert host_memory.huge_pages_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "platforms, expected",
    [("cpu", True), (" CPU ", True), ("tpu", False), ("cuda,cpu", False), ("cpu,tpu", False)],
)
def test_only_cpu_requested(platforms, expected):
    assert host_memory.only_cpu_requested(platforms) is expected
