"""Symbolic equality (sympy via latex2sympy, then math-verify), for the worker process.

Everything here may run for an unbounded time or exhaust memory on hostile input
(``10^{10^{10^{10}}}`` makes sympy build a ten-billion-digit integer), so it is only
ever called inside a worker process that the parent kills at its deadline
(see ``qmath_jax.grading.pool``). Nothing here installs signal handlers: math-verify's
own timeouts use ``signal.alarm``, which only works in a main thread, and are disabled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import sympy
from latex2sympy2_extended import latex2sympy
from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

# math-verify warns once per process that its timeout is off; the pool is the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)
logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)

REL_TOL = 1e-4


def to_sympy(latex: str) -> sympy.Basic | None:
    """Parses a normalised LaTeX answer into a sympy object, or None if it cannot."""
    try:
        return latex2sympy(latex)
    except Exception:  # noqa: BLE001 - any parser failure means "not parseable"
        return None


def _numeric_value(expr: sympy.Basic) -> complex | None:
    """The numeric value of a closed-form expression, or None if it has symbols."""
    if not isinstance(expr, sympy.Expr) or expr.free_symbols:
        return None
    try:
        return complex(sympy.N(expr, 30))
    except (TypeError, ValueError, OverflowError):
        return None


def _numbers_close(pred: complex, gold: complex, gold_is_integer: bool) -> bool:
    """Relative tolerance 1e-4, except that an integer gold must be hit exactly."""
    if gold_is_integer:
        return abs(pred - gold) <= 1e-9 * max(1.0, abs(gold))
    return abs(pred - gold) <= REL_TOL * max(abs(pred), abs(gold))


def _holds(check: Callable[[], bool]) -> bool:
    """Runs one sympy test; any exception (sympy raises many kinds on odd input) is No."""
    try:
        return bool(check())
    except Exception:  # noqa: BLE001
        return False


def _sympy_equal(pred: sympy.Basic, gold: sympy.Basic) -> bool:
    """Structural, simplified-difference, ``equals`` and numeric comparisons."""
    if pred == gold:
        return True
    if not (isinstance(pred, sympy.Expr) and isinstance(gold, sympy.Expr)):
        return False
    if _holds(lambda: sympy.simplify(pred - gold) == 0) or _holds(
        lambda: pred.equals(gold) is True
    ):
        return True
    pv, gv = _numeric_value(pred), _numeric_value(gold)
    if pv is None or gv is None or not all(map(math.isfinite, (pv.real, gv.real))):
        return False
    return _numbers_close(pv, gv, bool(getattr(gold, "is_Integer", False)))


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's own parse and verify, with its signal-based timeouts switched off."""
    try:
        gold_parsed = mv_parse(f"${gold}$", parsing_timeout=None)
        pred_parsed = mv_parse(f"${pred}$", parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv_verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001
        return False


def symbolic_equal(pred: str, gold: str) -> bool:
    """Whether two normalised LaTeX answers are mathematically equal.

    Args:
        pred: normalised predicted answer.
        gold: normalised reference answer.

    Returns:
        True when sympy shows them equal (exactly, after ``simplify``, or numerically
        within 1e-4 relative for non-integer golds) or math-verify does.
    """
    pe, ge = to_sympy(pred), to_sympy(gold)
    if pe is not None and ge is not None and _sympy_equal(pe, ge):
        return True
    return _math_verify_equal(pred, gold)


def equation_equal(pred: str, gold: str) -> bool:
    """Whether two equations ``l1=r1`` and ``l2=r2`` describe the same relation.

    They do when ``l1-r1`` is a nonzero constant multiple of ``l2-r2``
    (``2x+2y=4`` and ``x+y=2``, or ``y=x`` and ``x=y``).

    Args:
        pred: normalised predicted equation with exactly one ``=``.
        gold: normalised reference equation with exactly one ``=``.

    Returns:
        True when the equations are equivalent.
    """
    from qmath_jax.grading.equiv import split_top

    sides = [split_top(s, "=") for s in (pred, gold)]
    exprs = [(to_sympy(lhs), to_sympy(rhs)) for lhs, rhs in sides]
    if any(e is None or not isinstance(e, sympy.Expr) for pair in exprs for e in pair):
        return _math_verify_equal(pred, gold)
    d_pred = exprs[0][0] - exprs[0][1]
    d_gold = exprs[1][0] - exprs[1][1]
    try:
        if sympy.simplify(d_pred - d_gold) == 0 or sympy.simplify(d_pred + d_gold) == 0:
            return True
        if d_gold == 0:
            return d_pred == 0
        ratio = sympy.simplify(d_pred / d_gold)
        return bool(ratio.is_number and ratio != 0 and ratio.is_finite)
    except Exception:  # noqa: BLE001
        return False
