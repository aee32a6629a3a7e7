"""Keep freed host memory for reuse in CPU-only processes (glibc malloc settings).

XLA:CPU allocates a compiled program's temporary buffer at every execution and frees it
at the end: 315 MB for `bench/forward_backward.py`'s step. glibc serves blocks that
large with a fresh mmap and returns them with munmap, so every step page-faults through
the whole buffer again: 77,000 minor faults, 385 ms a step on two cores against 305 ms
with the memory kept. One malloc arena, no mmap and no trimming keep freed blocks in the
heap for the next execution.

`import qmath_jax` applies this when the process can only run on CPU (see
`cpu_only_process`), before JAX starts its CPU backend: XLA's worker threads pick their
malloc arena at their first allocation, so a later call changes nothing for them. Set
QMATH_KEEP_HOST_MEMORY=0 to leave malloc as it is, =1 to apply it regardless.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before returning any (int max)


def cpu_only_process() -> bool:
    """Whether JAX can only pick its CPU backend here.

    True when JAX_PLATFORMS (or jax's jax_platforms flag, if jax is already imported)
    is "cpu", or, with neither set, when no accelerator plugin is installed: no libtpu,
    no jax_plugins entry point or module (the CUDA and ROCm plugins register there).
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return only_cpu_requested(platforms)
    return not _accelerator_plugin_installed()


def only_cpu_requested(platforms: str) -> bool:
    """Whether a JAX_PLATFORMS value ("cpu", "cuda,cpu", ...) names CPU alone."""
    return [p.strip().lower() for p in platforms.split(",") if p.strip()] == ["cpu"]


def _accelerator_plugin_installed() -> bool:
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # namespace package of the CUDA / ROCm plugins
    except ImportError:
        return False
    return bool(list(getattr(jax_plugins, "__path__", [])))


def keep_freed_memory() -> bool:
    """One malloc arena, never mmap, never trim: freed blocks stay for reuse.

    Returns whether glibc took all three settings (False off glibc Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def apply_default() -> bool:
    """What `import qmath_jax` does: keep freed memory in a CPU-only process."""
    choice = os.environ.get("QMATH_KEEP_HOST_MEMORY", "")
    if choice == "0" or (choice != "1" and not cpu_only_process()):
        return False
    return keep_freed_memory()
