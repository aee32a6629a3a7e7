"""Keep freed host memory for reuse, on huge pages, in CPU runs (glibc malloc settings).

XLA:CPU allocates a compiled program's temporary buffer at every execution and frees it
at the end: 315 MB for `bench/forward_backward.py`'s step. glibc serves blocks that
large with a fresh mmap and returns them with munmap, so every step page-faults through
the whole buffer again: 77,000 minor faults a step. Two settings fix it:

- `keep_freed_memory()`: one malloc arena, no mmap, no trimming, so freed blocks stay in
  the heap for the next execution. XLA's worker threads pick their arena at their first
  allocation, so this must come before JAX starts its CPU backend.
- `huge_pages_env()`: glibc's `glibc.malloc.hugetlb=1` tunable, which backs the heap
  with transparent huge pages (fewer TLB misses over the temporaries). glibc reads it
  only at process start, so `apply()` re-executes the process with it.

The bench step: 383 ms a step on two cores with neither, 315-330 ms with both (the
first steps still grow the heap). Neither is the default: with one arena XLA compiles
~18% slower (its compiler threads share one malloc lock) and steps whose temporaries
stay under glibc's 32 MB mmap threshold gain nothing, so small runs such as the tests
and the demo would lose. The benchmarks call `apply_default()`,
`python -m qmath_jax.launch --keep_host_memory` calls `apply()`.
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


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_env(environ: dict[str, str]) -> dict[str, str] | None:
    """environ with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES, or None if it is there."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)}


def apply() -> bool:
    """Huge pages (re-executing this process once with the tunable), then kept memory.

    Call first thing: the re-execution starts the program again from the top, with the
    same command line (sys.orig_argv). Returns whether the malloc settings took.
    """
    if sys.platform.startswith("linux"):
        env = huge_pages_env(dict(os.environ))
        if env is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, env)
    return keep_freed_memory()


def apply_default() -> bool:
    """`apply()` in a CPU-only process, or as QMATH_KEEP_HOST_MEMORY (0 or 1) says."""
    choice = os.environ.get("QMATH_KEEP_HOST_MEMORY", "")
    if choice == "0" or (choice != "1" and not cpu_only_process()):
        return False
    return apply()
