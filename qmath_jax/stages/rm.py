"""`stage = "rm"` in a config runs the reward-model stage."""

from qmath_jax.stages.reward_model import run

__all__ = ["run"]
