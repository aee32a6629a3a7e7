"""Answer grading: extraction, normalisation, equivalence and voting.

Public API:
    extract_answer(text, dataset=None) -> str | None
    is_equiv(pred, gold, *, timeout_s=2.0, symbolic=True) -> bool
    strip_answer(answer) -> str
    majority_vote(answers, equiv=is_equiv) -> (answer, index)
    weighted_vote(answers, weights, equiv=is_equiv) -> (answer, index)
    best_of_n(answers, scores) -> (answer, index)
    warm_up() -> None   (start the symbolic worker processes ahead of time)
"""

from qmath_jax.grading.equiv import is_equiv
from qmath_jax.grading.extract import extract_answer, extract_choice, find_boxed
from qmath_jax.grading.normalize import strip_answer
from qmath_jax.grading.vote import best_of_n, group_answers, majority_vote, weighted_vote


def warm_up() -> None:
    """Starts the symbolic worker processes now, so that the first hard comparison does
    not wait for their imports."""
    from qmath_jax.grading.pool import get_pool

    get_pool().warm_up()


__all__ = [
    "best_of_n",
    "extract_answer",
    "extract_choice",
    "find_boxed",
    "group_answers",
    "is_equiv",
    "majority_vote",
    "strip_answer",
    "warm_up",
    "weighted_vote",
]
