"""Runs model-written Python for tool-integrated reasoning, isolated from this process.

`run(code, timeout_s=..., memory_mb=..., previous_cells=())` executes a cell in a jailed
process forked from a warm worker interpreter and returns a `SandboxResult`; `SandboxPool`
gives parallel `map` and explicit lifetimes. docs/sandbox.md lists what is guaranteed.
"""

from qmath_jax.sandbox.pool import (
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT_S,
    HostShardedPool,
    SandboxError,
    SandboxPool,
    SandboxResult,
    across_hosts,
    default_pool,
    run,
)

__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_S",
    "HostShardedPool",
    "SandboxError",
    "SandboxPool",
    "SandboxResult",
    "across_hosts",
    "default_pool",
    "run",
]
