"""One host of `test_multihost.py`'s sandbox test: runs 6 cells through a HostShardedPool
and prints the results, as JSON, on its last line."""

import dataclasses
import json

from qmath_jax import parallel
from qmath_jax.sandbox import HostShardedPool, SandboxPool

parallel.initialize_distributed()
codes = [f"print({i} * {i})" for i in range(4)] + ["1 / 0", "print(x)"]
previous = [[]] * 5 + [["x = 42"]]
with SandboxPool(size=2) as local:
    results = HostShardedPool(local).map(codes, timeout_s=30, previous_cells=previous)
print(json.dumps([dataclasses.asdict(r) for r in results]))
