"""Majority voting (maj@k), reward-weighted voting and best-of-n (RM@k) over answers.

Answers are grouped into equivalence classes: each answer joins the first earlier class
whose representative (the class's first member) it equals, by normalised string first
and by ``equiv`` otherwise. None answers never form a class.

Tie-breaking, everywhere: among equally good classes (or answers), the one whose first
occurrence comes earliest wins. This matches the Qwen2.5-Math evaluation
(``Counter.most_common`` keeps insertion order; ``list.index(max(...))`` takes the first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from qmath_jax.grading.equiv import is_equiv
from qmath_jax.grading.normalize import strip_answer

Equiv = Callable[[str, str], bool]


def group_answers(answers: Sequence[str | None], equiv: Equiv = is_equiv) -> list[list[int]]:
    """Partitions the indices of non-None answers into equivalence classes.

    Args:
        answers: extracted answers; None marks a response without an answer.
        equiv: equality test ``equiv(answer, representative)``.

    Returns:
        Classes as lists of indices, ordered by first occurrence; each class's first
        index is its representative.
    """
    classes: list[list[int]] = []
    by_key: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = strip_answer(answer)
        if key in by_key:
            classes[by_key[key]].append(i)
            continue
        for c, members in enumerate(classes):
            if equiv(answer, answers[members[0]]):
                members.append(i)
                by_key[key] = c
                break
        else:
            by_key[key] = len(classes)
            classes.append([i])
    return classes


def _check_lengths(answers: Sequence, values: Sequence, name: str) -> None:
    if len(answers) == 0:
        raise ValueError("no answers to vote on: pass at least one answer")
    if len(values) != len(answers):
        raise ValueError(f"{name} has {len(values)} entries but there are {len(answers)} answers")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}[{i}] = {v!r} is not a finite number")


def weighted_vote(
    answers: Sequence[str | None], weights: Sequence[float], equiv: Equiv = is_equiv
) -> tuple[str | None, int]:
    """Reward-weighted majority: the class with the largest total weight wins.

    Args:
        answers: extracted answers (None for none).
        weights: one finite weight per answer (e.g. reward-model scores).
        equiv: equality test between answers.

    Returns:
        (winning answer, index of its representative = first member of the class).
        When every answer is None: (None, 0).

    Raises:
        ValueError: no answers, lengths differ, or a weight is not a finite number.
    """
    _check_lengths(answers, weights, "weights")
    classes = group_answers(answers, equiv)
    if not classes:
        return None, 0
    totals = [sum(float(weights[i]) for i in members) for members in classes]
    best = max(range(len(classes)), key=lambda c: (totals[c], -classes[c][0]))
    rep = classes[best][0]
    return answers[rep], rep


def majority_vote(answers: Sequence[str | None], equiv: Equiv = is_equiv) -> tuple[str | None, int]:
    """maj@k: the most frequent equivalence class wins.

    Args:
        answers: extracted answers (None for none).
        equiv: equality test between answers.

    Returns:
        (winning answer, index of its representative = first member of the class);
        ties go to the class that occurs first. When every answer is None: (None, 0).

    Raises:
        ValueError: no answers.
    """
    return weighted_vote(answers, [1.0] * len(answers), equiv)


def best_of_n(answers: Sequence[str | None], scores: Sequence[float]) -> tuple[str | None, int]:
    """RM@k: the answer with the highest score, skipping None answers.

    Args:
        answers: extracted answers (None for none).
        scores: one finite score per answer (reward-model outputs).

    Returns:
        (best answer, its index); ties go to the earliest. When every answer is None,
        (None, index of the highest score).

    Raises:
        ValueError: no answers, lengths differ, or a score is not a finite number.
    """
    _check_lengths(answers, scores, "scores")
    candidates = [i for i, a in enumerate(answers) if a is not None] or list(range(len(answers)))
    best = max(candidates, key=lambda i: (scores[i], -i))
    return answers[best], best
