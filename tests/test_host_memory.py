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
import json, resource
import qmath_jax  # applies host_memory.apply_default() before JAX starts
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
print(json.dumps(faults))
"""

_TEMP_PAGES = 8192 * 2048 * 4 // 4096  # y's 4 KiB pages


def _median_faults_per_run(keep: str) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QMATH_KEEP_HOST_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_memory_is_not_faulted_in_again():
    kept, default = _median_faults_per_run("1"), _median_faults_per_run("0")
    assert default > 0.5 * _TEMP_PAGES, default  # glibc maps the temporaries afresh
    assert kept < 0.05 * _TEMP_PAGES, kept


@pytest.mark.parametrize(
    "platforms, expected",
    [("cpu", True), (" CPU ", True), ("tpu", False), ("cuda,cpu", False), ("cpu,tpu", False)],
)
def test_only_cpu_requested(platforms, expected):
    assert host_memory.only_cpu_requested(platforms) is expected
