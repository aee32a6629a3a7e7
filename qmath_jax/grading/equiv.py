"""Answer equivalence: cheap checks in-process, symbolic checks in a bounded worker.

``is_equiv`` first normalises both answers (``normalize.strip_answer``) and decides
what it can without sympy: equal strings, numbers (exact rationals, percent forms,
relative tolerance 1e-4), multiple-choice letters, and the structure of tuples,
intervals, sets, matrices and equations, element by element. Only when some element
stays undecided (``\\sqrt{2}/2`` against ``\\frac{\\sqrt{2}}{2}``) does the pair go to a
worker process (``pool.SymbolicPool``) that repeats the same walk with sympy and
math-verify at the leaves, under a deadline after which the worker is killed.

Comparison walks are three-valued: True (equal), False (certainly different) and
None (undecided without symbolic algebra).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction

from qmath_jax.grading.extract import extract_choice
from qmath_jax.grading.normalize import MAX_ANSWER_CHARS, strip_answer

DEFAULT_TIMEOUT_S = 2.0
REL_TOL = 1e-4
# Numbers with more digits than this are not parsed into exact rationals in-process.
_MAX_NUMBER_CHARS = 80
_MAX_EXPONENT = 400
_MAX_DEPTH = 12
_MAX_ITEMS = 32

Verdict = bool | None
Leaf = Callable[[str, str], Verdict]

_DEC = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_RE = re.compile(rf"([-+]?)({_DEC})")
_SCI_RE = re.compile(rf"([-+]?)({_DEC})(?:[eE]|\\times10\^|\\cdot10\^)\{{?([-+]?\d+)\}}?")
_FRAC_RE = re.compile(rf"([-+]?)\\frac\{{([-+]?{_DEC})\}}\{{([-+]?{_DEC})\}}")
_MIXED_RE = re.compile(r"([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_MATRIX_RE = re.compile(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", re.DOTALL)
_CHOICE_RE = re.compile(r"\b([A-E])\b")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z ]*")
_SYMBOL_LHS_RE = re.compile(r"\\?[a-zA-Z]+(?:_(?:\{\w+\}|\w))?(?:\([a-zA-Z]\))?")
_INEQUALITY = ("<", ">", "\\le", "\\ge", "\\ne")


def parse_number(s: str) -> Fraction | None:
    """Exact value of a plain numeric answer ("-3", "0.25", "\\frac{3}{8}", "1\\frac{1}{4}",
    "6.02\\times10^{23}"), or None for anything else.

    Args:
        s: a normalised answer.

    Returns:
        The value as a Fraction, or None.
    """
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    m = _PLAIN_RE.fullmatch(s)
    if m:
        return _signed(m.group(1), Fraction(m.group(2)))
    m = _FRAC_RE.fullmatch(s)
    if m:
        den = Fraction(m.group(3))
        return None if den == 0 else _signed(m.group(1), Fraction(m.group(2)) / den)
    m = _MIXED_RE.fullmatch(s)
    if m:
        den = int(m.group(4))
        if den == 0:
            return None
        return _signed(m.group(1), int(m.group(2)) + Fraction(int(m.group(3)), den))
    m = _SCI_RE.fullmatch(s)
    if m and abs(int(m.group(3))) <= _MAX_EXPONENT:
        return _signed(m.group(1), Fraction(m.group(2)) * Fraction(10) ** int(m.group(3)))
    return None


def _signed(sign: str, value: Fraction) -> Fraction:
    return -value if sign == "-" else value


def numbers_equal(pred: Fraction, gold: Fraction) -> bool:
    """Numeric equality with percent forms: ``pred`` may equal gold, gold/100 or gold*100.

    An integer target must be hit exactly (9999 is not 10000); other targets allow a
    relative error of 1e-4 (0.3333 is 1/3).

    Args:
        pred: predicted value.
        gold: reference value.

    Returns:
        Whether they are equal under these rules.
    """
    for target in (gold, gold / 100, gold * 100):
        if pred == target:
            return True
        if target.denominator != 1 and abs(pred - target) <= REL_TOL * max(abs(pred), abs(target)):
            return True
    return False


def _is_word(s: str) -> bool:
    return bool(_WORD_RE.fullmatch(s))


def cheap_leaf(pred: str, gold: str) -> Verdict:
    """Decides two atomic answers without sympy, or returns None."""
    if pred.lower() == gold.lower():
        return True
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:
        return numbers_equal(pn, gn)
    # Plain words ("north", "Evelyn") are equal only as strings; a number never
    # equals a word.
    if (_is_word(pred) and _is_word(gold) and min(len(pred), len(gold)) >= 3) or (
        (pn is not None and _is_word(gold) and len(gold) >= 2)
        or (gn is not None and _is_word(pred) and len(pred) >= 2)
    ):
        return False
    return None


def cheap_equation(pred: str, gold: str) -> Verdict:
    """Two equations are cheaply equal only when their sides match as strings."""
    pl, pr = split_top(pred, "=")
    gl, gr = split_top(gold, "=")
    if (pl, pr) in ((gl, gr), (gr, gl)):
        return True
    return None


def all_of(verdicts: Iterable[Verdict]) -> Verdict:
    """Three-valued AND that stops at the first False."""
    result: Verdict = True
    for verdict in verdicts:
        if verdict is False:
            return False
        if verdict is None:
            result = None
    return result


def split_top(s: str, sep: str) -> list[str]:
    """Splits ``s`` at ``sep`` where no bracket is open."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _closing_index(s: str) -> int:
    depth = 0
    for i, ch in enumerate(s):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _bracketed(s: str) -> tuple[str, str, str] | None:
    """(open, close, inner) when one bracket pair wraps all of ``s``."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and _closing_index(s) == len(s) - 1:
        return s[0], s[-1], s[1:-1]
    return None


def _matrix_cells(s: str) -> list[list[str]] | None:
    m = _MATRIX_RE.fullmatch(s)
    if not m:
        return None
    rows = [r for r in m.group(1).split("\\\\") if r.strip()]
    return [[c.strip() for c in r.split("&")] for r in rows]


def _match_unordered(preds: Sequence[str], golds: Sequence[str], cmp: Leaf) -> Verdict:
    """Whether the items can be paired one-to-one into equal pairs (sets, solution lists)."""
    if len(preds) != len(golds):
        return False
    if len(preds) > _MAX_ITEMS:
        return sorted(preds) == sorted(golds) or None
    diagonal = all_of(cmp(p, g) for p, g in zip(preds, golds))
    if diagonal is True:
        return True
    table = [[cmp(p, g) for g in golds] for p in preds]
    if _perfect_matching(table, lambda v: v is True):
        return True
    if not _perfect_matching(table, lambda v: v is not False):
        return False
    return None


def _perfect_matching(table: list[list[Verdict]], usable: Callable[[Verdict], bool]) -> bool:
    """Bipartite perfect matching by augmenting paths (tables are tiny)."""
    owner: dict[int, int] = {}

    def augment(row: int, seen: set[int]) -> bool:
        for col, verdict in enumerate(table[row]):
            if usable(verdict) and col not in seen:
                seen.add(col)
                if col not in owner or augment(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    return all(augment(row, set()) for row in range(len(table)))


class _Walker:
    """Structural comparison with pluggable leaf tests (cheap in-process, full in workers)."""

    def __init__(self, leaf: Leaf, equation: Leaf) -> None:
        self.leaf = leaf
        self.equation = equation

    def compare(self, pred: str, gold: str, depth: int = 0) -> Verdict:
        pred, gold = pred.strip(), gold.strip()
        if pred.lower() == gold.lower():
            return True
        if not pred or not gold:
            return False
        if depth > _MAX_DEPTH:
            return None
        for step in (self._matrices, self._unions, self._lists, self._equations):
            verdict = step(pred, gold, depth)
            if verdict != "pass":
                return verdict
        return self.leaf(pred, gold)

    def _sub(self, depth: int) -> Leaf:
        return lambda p, g: self.compare(p, g, depth + 1)

    def _matrices(self, pred: str, gold: str, depth: int) -> Verdict | str:
        pm, gm = _matrix_cells(pred), _matrix_cells(gold)
        if pm is None and gm is None:
            return "pass"
        if pm is not None and gm is not None:
            if [len(r) for r in pm] != [len(r) for r in gm]:
                return False
            cells = zip((c for r in pm for c in r), (c for r in gm for c in r))
            return all_of(self.compare(p, g, depth + 1) for p, g in cells)
        # A vector written as a tuple against a one-row or one-column matrix.
        matrix = pm if pm is not None else gm
        other = gold if pm is not None else pred
        flat = [c for r in matrix for c in r]
        if len(matrix) != 1 and any(len(r) != 1 for r in matrix):
            return False
        inner = _bracketed(other)
        items = split_top(inner[2], ",") if inner and inner[0] == "(" else [other]
        if len(items) != len(flat):
            return False
        pairs = zip(flat, items) if pm is not None else zip(items, flat)
        return all_of(self.compare(p, g, depth + 1) for p, g in pairs)

    def _unions(self, pred: str, gold: str, depth: int) -> Verdict | str:
        pu, gu = split_top(pred, "\\cup"), split_top(gold, "\\cup")
        if len(pu) == 1 and len(gu) == 1:
            return "pass"
        if len(pu) != len(gu):
            return None  # "[1,3]\cup[2,4]" may equal "[1,4]": leave it to sympy
        return _match_unordered(pu, gu, self._sub(depth))

    def _lists(self, pred: str, gold: str, depth: int) -> Verdict | str:
        pb, gb = _bracketed(pred), _bracketed(gold)
        p_items = split_top(pb[2] if pb else pred, ",")
        g_items = split_top(gb[2] if gb else gold, ",")
        if len(p_items) == 1 and len(g_items) == 1:
            # "(5)" against "5": a bracket around one item is grouping, not a tuple.
            if pb and pb[0] in "([" and not gb:
                return self.compare(pb[2], gold, depth + 1)
            if gb and gb[0] in "([" and not pb:
                return self.compare(pred, gb[2], depth + 1)
            return "pass"
        if len(p_items) != len(g_items):
            return False
        sub = self._sub(depth)
        if pb and gb:
            if pb[0] == gb[0] == "{":
                return _match_unordered(p_items, g_items, sub)
            if (pb[0], pb[1]) != (gb[0], gb[1]):
                return False  # (1,2) is not [1,2]: tuple vs interval, open vs closed
            return all_of(sub(p, g) for p, g in zip(p_items, g_items))
        bracket = pb or gb
        if bracket is None:
            return _match_unordered(p_items, g_items, sub)  # "1, 2" lists of solutions
        if bracket[0] == "{":
            return _match_unordered(p_items, g_items, sub)
        if bracket[0] == "(" and bracket[1] == ")":
            return all_of(sub(p, g) for p, g in zip(p_items, g_items))
        return False

    def _equations(self, pred: str, gold: str, depth: int) -> Verdict | str:
        if any(op in pred or op in gold for op in _INEQUALITY):
            return "pass"
        # Only an "=" outside brackets makes an equation ("\sum_{n=1}^{5}n" is none).
        ps, gs = split_top(pred, "="), split_top(gold, "=")
        if len(ps) == 2 and len(gs) == 2:
            return self.equation(pred, gold)
        if len(ps) == 2 and len(gs) == 1 and _SYMBOL_LHS_RE.fullmatch(ps[0]):
            return self.compare(ps[1], gold, depth + 1)
        if len(gs) == 2 and len(ps) == 1 and _SYMBOL_LHS_RE.fullmatch(gs[0]):
            return self.compare(pred, gs[1], depth + 1)
        return "pass"


_CHEAP = _Walker(cheap_leaf, cheap_equation)


def _choice_letter(raw_pred: str) -> str | None:
    """The option letter in a raw (unnormalised) prediction: "B", "(b)", "The answer is B"."""
    short = raw_pred.strip().strip("().:$ ")
    if len(short) == 1:
        return short.upper()
    return extract_choice(raw_pred)


def normalize_pair(pred: str, gold: str) -> tuple[str, str]:
    """Normalises both answers the same way."""
    return strip_answer(str(pred)), strip_answer(str(gold))


def full_equiv(pred: str, gold: str) -> bool:
    """The complete check with sympy and math-verify at the leaves; unbounded in time.

    Only for use inside a worker process (``qmath_jax.grading.worker``).

    Args:
        pred: normalised prediction.
        gold: normalised reference.

    Returns:
        Whether they are equivalent.
    """
    from qmath_jax.grading import symbolic

    def leaf(p: str, g: str) -> bool:
        verdict = cheap_leaf(p, g)
        return symbolic.symbolic_equal(p, g) if verdict is None else verdict

    def equation(p: str, g: str) -> bool:
        verdict = cheap_equation(p, g)
        return symbolic.equation_equal(p, g) if verdict is None else verdict

    return _Walker(leaf, equation).compare(pred, gold) is True


def cheap_equiv(pred: str, gold: str) -> Verdict:
    """In-process verdict on two raw answers: True, False, or None (needs sympy)."""
    p, g = normalize_pair(pred, gold)
    if not p or not g:
        return False
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
        return p == g
    if len(g) == 1 and g in "ABCDE":
        return _choice_letter(str(pred)) == g
    return _CHEAP.compare(p, g)


def is_equiv(
    pred: str | None,
    gold: str | None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    symbolic: bool = True,
) -> bool:
    """Whether a predicted answer equals the reference answer.

    Cheap checks run in the calling thread; undecided pairs go to a symbolic worker
    process with a deadline. Never raises, never hangs: thread-safe and usable inside
    worker processes (including daemonic ``multiprocessing`` pool workers).

    Args:
        pred: the predicted answer (e.g. from ``extract_answer``); None is never equal.
        gold: the reference answer.
        timeout_s: seconds allowed for the symbolic check (waiting for a free worker
            included; a worker's one-off start-up is not). Past it the answer is False.
        symbolic: allow the sympy / math-verify check; False keeps everything
            in-process and treats undecided pairs as different.

    Returns:
        True when the answers are equivalent.
    """
    if pred is None or gold is None:
        return False
    try:
        verdict = cheap_equiv(pred, gold)
        if verdict is not None:
            return verdict
        if not symbolic:
            return False
        return _symbolic_verdict(*normalize_pair(pred, gold), timeout_s)
    except Exception:  # noqa: BLE001 - a grader must not crash its caller on odd input
        return False


# Verdicts of the worker, keyed by the normalised pair and the time limit: votes and
# samples repeat the same answers, and a worker round trip costs tens of milliseconds.
_CACHE: dict[tuple[str, str, float], bool] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 100_000


def clear_cache() -> None:
    """Forgets the cached symbolic verdicts (for benchmarks)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _symbolic_verdict(pred: str, gold: str, timeout_s: float) -> bool:
    key = (pred, gold, timeout_s)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    from qmath_jax.grading.pool import get_pool

    verdict = get_pool().run("equiv", pred, gold, timeout_s)
    if verdict is None:
        return False  # no worker was free in time: not a property of the answers, not cached
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = verdict
    return verdict
