"""The `eval` stage as launch finds it (`qmath_jax.stages.<cfg.stage>`); the logic lives in
`qmath_jax.stages.evaluate`."""

from qmath_jax.stages.evaluate import evaluate, run, summarize

__all__ = ["evaluate", "run", "summarize"]
