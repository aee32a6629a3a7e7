"""The Qwen2.5-Math pipeline in JAX; see README.md.

Importing the package keeps freed host memory for reuse when the process can only run
on CPU (`host_memory`): XLA:CPU otherwise page-faults through each step's temporaries.
"""

from qmath_jax import host_memory as _host_memory

_host_memory.apply_default()
