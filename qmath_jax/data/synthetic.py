"""Synthetic math corpus: the embedded default data, so the demo and tests need no download.

Problems are generated procedurally with exact gold answers. Each has a chain-of-thought
(CoT) solution whose every written equation holds (long multiplication by partial products,
place-by-place addition, ...) and a tool-integrated (TIR) solution in the Qwen2.5-Math
format: reasoning, a ```python block, a ```output block holding exactly what that code
prints, and a closing sentence with the boxed answer. The TIR text varies its wording, its
program and its closing sentence from problem to problem (`_tir_text`).

By-hand TIR answers (`tir_by_hand`): for the arithmetic kinds, that share of the TIR
solutions does not call Python but writes the result by hand ("$a + b = c$"). Every one
is right, as written data; a small model cannot reproduce them, though, so its sampled TIR
answers branch at the first sentence into a path that is mostly wrong and several code
paths that are mostly right. That is the shape in which majority voting beats greedy
decoding (greedy takes the single likeliest opening) and in which RL and rejection
fine-tuning move the model onto the tool.

Determinism and splits: `problem(seed, index, split)` is a pure function of its arguments.
Whether a question belongs to the train or the test split is decided by a hash of the
question text alone (`question_split`), so no question can ever appear in both splits, for
any seeds; generation simply redraws until the drawn question falls in the wanted split.

Problems are drawn with replacement, so a kind with a small question space at a low
difficulty (e.g. fractions with denominators up to 12) repeats questions within a split.

Difficulty: each kind takes a `digits` knob (see `KINDS`). At the defaults a small model on
CPU learns the easy kinds (add, sub, mul, linear, ...) quickly, while `big_mul` (5-digit x
5-digit) stays hard without a calculator, so TIR beats CoT there.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # share of the question space that belongs to the test split
_MAX_DRAWS = 2000


@dataclass(frozen=True)
class _Draft:
    """What a kind's generator returns; `problem` adds the split, id and final texts."""

    question: str
    answer: str
    cot_steps: list[str]
    tir_intro: str
    code: str
    output: str  # exactly what `code` prints, trailing newline included
    more_tir: tuple[tuple[str, str], ...] = ()  # other (intro, code) pairs printing `output`
    by_hand: str = ""  # "$a + b = c$": the by-hand TIR answer's equation (arithmetic kinds)


@dataclass(frozen=True)
class Kind:
    """One problem family.

    Attributes:
        name: key in `KINDS`.
        default_digits: difficulty used when none is given.
        digits_meaning: what `digits` controls for this kind.
        generate: (rng, digits) -> draft.
    """

    name: str
    default_digits: int
    digits_meaning: str
    generate: Callable[[random.Random, int], _Draft]


# ----------------------------------------------------------------------------- helpers


def _num(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly `digits` digits."""
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _place_parts(n: int) -> list[int]:
    """Nonzero place values of n, largest first: 3405 -> [3000, 400, 5]."""
    s = str(n)
    return [int(d) * 10 ** (len(s) - 1 - k) for k, d in enumerate(s) if d != "0"]


def _frac_tex(f: Fraction) -> str:
    """LaTeX of a reduced fraction; integers plain, sign in front."""
    if f.denominator == 1:
        return str(f.numerator)
    sign = "-" if f < 0 else ""
    return f"{sign}\\frac{{{abs(f.numerator)}}}{{{f.denominator}}}"


def _boxed_line(answer: str) -> str:
    return f"The answer is $\\boxed{{{answer}}}$."


def _times(a: int | str, b: int | str) -> str:
    return f"{a} \\times {b}"


# ----------------------------------------------------------------------------- kinds


def _gen_add(rng: random.Random, digits: int) -> _Draft:
    a, b = _num(rng, digits), _num(rng, digits)
    steps = [f"We add ${b}$ to ${a}$ one place value at a time."]
    total = a
    parts = _place_parts(b)
    if len(parts) > 1:
        steps.append(f"${a} + {b} = {a} + {' + '.join(map(str, parts))}$")
    for p in parts:
        steps.append(f"${total} + {p} = {total + p}$")
        total += p
    steps.append(f"So ${a} + {b} = {total}$.")
    return _Draft(
        question=f"What is ${a} + {b}$?",
        answer=str(a + b),
        cot_steps=steps,
        tir_intro="I will compute the sum with Python.",
        code=f"print({a} + {b})",
        output=f"{a + b}\n",
        more_tir=(
            ("Let me add the two numbers in Python.", f"a = {a}\nb = {b}\nprint(a + b)"),
            ("Python adds these exactly.", f"total = {a} + {b}\nprint(total)"),
        ),
        by_hand=f"${a} + {b} = {a + b}$",
    )


def _gen_sub(rng: random.Random, digits: int) -> _Draft:
    a = _num(rng, digits)
    b = rng.randint(1, a - 1) if a > 1 else 1
    steps = [f"We subtract ${b}$ from ${a}$ one place value at a time."]
    parts = _place_parts(b)
    if len(parts) > 1:
        steps.append(f"${a} - {b} = {a} - {' - '.join(map(str, parts))}$")
    rest = a
    for p in parts:
        steps.append(f"${rest} - {p} = {rest - p}$")
        rest -= p
    steps.append(f"So ${a} - {b} = {rest}$.")
    return _Draft(
        question=f"What is ${a} - {b}$?",
        answer=str(a - b),
        cot_steps=steps,
        tir_intro="I will compute the difference with Python.",
        code=f"print({a} - {b})",
        output=f"{a - b}\n",
        more_tir=(
            ("Let me subtract in Python.", f"a = {a}\nb = {b}\nprint(a - b)"),
            ("Python subtracts these exactly.", f"difference = {a} - {b}\nprint(difference)"),
        ),
        by_hand=f"${a} - {b} = {a - b}$",
    )


def _gen_mul(rng: random.Random, digits: int) -> _Draft:
    a, b = _num(rng, digits), rng.randint(2, 9)
    parts = _place_parts(a)
    steps = [
        f"We split ${a}$ by place value and multiply each part by ${b}$.",
        f"${_times(a, b)} = {' + '.join(_times(p, b) for p in parts)}$",
    ]
    steps += [f"${_times(p, b)} = {p * b}$" for p in parts]
    if len(parts) > 1:
        steps.append(f"${' + '.join(str(p * b) for p in parts)} = {a * b}$")
    return _Draft(
        question=f"What is ${_times(a, b)}$?",
        answer=str(a * b),
        cot_steps=steps,
        tir_intro="I will compute the product with Python.",
        code=f"print({a} * {b})",
        output=f"{a * b}\n",
        more_tir=(
            ("Let me multiply in Python.", f"a = {a}\nb = {b}\nprint(a * b)"),
            ("Python multiplies these exactly.", f"product = {a} * {b}\nprint(product)"),
        ),
        by_hand=f"${_times(a, b)} = {a * b}$",
    )


def _gen_big_mul(rng: random.Random, digits: int) -> _Draft:
    a, b = _num(rng, digits), _num(rng, digits)
    parts = _place_parts(b)
    steps = [
        f"We use long multiplication: split ${b}$ by place value.",
        f"${_times(a, b)} = {' + '.join(_times(a, p) for p in parts)}$",
    ]
    steps += [f"${_times(a, p)} = {a * p}$" for p in parts]
    total = a * parts[0]
    for p in parts[1:]:
        steps.append(f"${total} + {a * p} = {total + a * p}$")
        total += a * p
    return _Draft(
        question=f"Compute ${_times(a, b)}$.",
        answer=str(a * b),
        cot_steps=steps,
        tir_intro="Multiplying large numbers by hand is error-prone, so I will use Python.",
        code=f"a = {a}\nb = {b}\nprint(a * b)",
        output=f"{a * b}\n",
        more_tir=(
            ("Let me multiply the two numbers in Python.", f"print({a} * {b})"),
            ("Python multiplies these exactly.", f"product = {a} * {b}\nprint(product)"),
        ),
        by_hand=f"${_times(a, b)} = {a * b}$",
    )


def _fractions(rng: random.Random, digits: int) -> tuple[int, int, int, int]:
    hi = 12 if digits == 1 else 10**digits - 1  # denominators 2..12 at the easiest level
    b, d = rng.randint(2, hi), rng.randint(2, hi)
    return rng.randint(1, b - 1), b, rng.randint(1, d - 1), d


def _reduce_steps(num: int, den: int) -> list[str]:
    g = math.gcd(num, den)
    if g == 1:
        return []
    result = _frac_tex(Fraction(num, den))
    return [
        (
            f"Dividing numerator and denominator by ${g}$: "
            f"$\\frac{{{num}}}{{{den}}} = \\frac{{{num} \\div {g}}}{{{den} \\div {g}}} = {result}$"
        )
    ]


def _gen_frac_add(rng: random.Random, digits: int) -> _Draft:
    a, b, c, d = _fractions(rng, digits)
    lcd = math.lcm(b, d)
    na, nc = a * (lcd // b), c * (lcd // d)
    total = Fraction(a, b) + Fraction(c, d)
    steps = [
        f"The least common denominator of ${b}$ and ${d}$ is ${lcd}$.",
        (
            f"$\\frac{{{a}}}{{{b}}} = \\frac{{{na}}}{{{lcd}}}$ and "
            f"$\\frac{{{c}}}{{{d}}} = \\frac{{{nc}}}{{{lcd}}}$"
        ),
        (
            f"$\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}} = \\frac{{{na} + {nc}}}{{{lcd}}} = "
            f"\\frac{{{na + nc}}}{{{lcd}}}$"
        ),
        *_reduce_steps(na + nc, lcd),
    ]
    return _Draft(
        question=f"Compute $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$ in lowest terms.",
        answer=_frac_tex(total),
        cot_steps=steps,
        tir_intro="I will add the fractions exactly with Python's Fraction type.",
        code=(f"from fractions import Fraction\nprint(Fraction({a}, {b}) + Fraction({c}, {d}))"),
        output=f"{total}\n",
    )


def _gen_frac_mul(rng: random.Random, digits: int) -> _Draft:
    a, b, c, d = _fractions(rng, digits)
    prod = Fraction(a, b) * Fraction(c, d)
    steps = [
        "Multiply the numerators and the denominators.",
        (
            f"$\\frac{{{a}}}{{{b}}} \\times \\frac{{{c}}}{{{d}}} = "
            f"\\frac{{{_times(a, c)}}}{{{_times(b, d)}}} = \\frac{{{a * c}}}{{{b * d}}}$"
        ),
        *_reduce_steps(a * c, b * d),
    ]
    return _Draft(
        question=f"Compute $\\frac{{{a}}}{{{b}}} \\times \\frac{{{c}}}{{{d}}}$ in lowest terms.",
        answer=_frac_tex(prod),
        cot_steps=steps,
        tir_intro="I will multiply the fractions exactly with Python's Fraction type.",
        code=(f"from fractions import Fraction\nprint(Fraction({a}, {b}) * Fraction({c}, {d}))"),
        output=f"{prod}\n",
    )


def _gen_percent(rng: random.Random, digits: int) -> _Draft:
    p = rng.randint(1, 99)
    step = 100 // math.gcd(p, 100)  # n must be a multiple of this for an integer answer
    n = step * rng.randint(1, max(1, 10**digits // step))
    ans = p * n // 100
    steps = [
        f"${p}\\%$ of ${n}$ means $\\frac{{{p}}}{{100}} \\times {n}$.",
        (
            f"$\\frac{{{p}}}{{100}} \\times {n} = \\frac{{{_times(p, n)}}}{{100}} = "
            f"\\frac{{{p * n}}}{{100}} = {ans}$"
        ),
    ]
    return _Draft(
        question=f"What is ${p}\\%$ of ${n}$?",
        answer=str(ans),
        cot_steps=steps,
        tir_intro="I will compute the percentage exactly with Python.",
        code=f"from fractions import Fraction\nprint(Fraction({p}, 100) * {n})",
        output=f"{ans}\n",
    )


def _linear_lhs(a: int, b: int) -> str:
    return f"{a}x {'+' if b > 0 else '-'} {abs(b)}"


def _gen_linear(rng: random.Random, digits: int) -> _Draft:
    a = rng.randint(2, max(2, 10**digits - 1))
    x = rng.randint(-20, 20)
    b = rng.choice([v for v in range(-50, 51) if v != 0])
    c = a * x + b
    move = f"Subtract ${b}$ from" if b > 0 else f"Add ${-b}$ to"
    rhs = f"{c} - {b}" if b > 0 else f"{c} + {-b}"
    steps = [
        f"{move} both sides: ${a}x = {rhs} = {c - b}$.",
        f"Divide both sides by ${a}$: $x = \\frac{{{c - b}}}{{{a}}} = {x}$.",
        f"Check: ${a} \\times ({x}) {'+' if b > 0 else '-'} {abs(b)} = {c}$.",
    ]
    return _Draft(
        question=f"Solve for $x$: ${_linear_lhs(a, b)} = {c}$.",
        answer=str(x),
        cot_steps=steps,
        tir_intro="From $a x + b = c$ we get $x = (c - b) / a$; I will compute it with Python.",
        code=(
            f"from fractions import Fraction\n"
            f"a, b, c = {a}, {b}, {c}\n"
            f"x = Fraction(c - b, a)\n"
            f"print(x)"
        ),
        output=f"{x}\n",
    )


_NAMES = ("Ava", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "cards")


def _word_boxes(rng: random.Random, digits: int, name: str, item: str) -> _Draft:
    a, boxes, per = _num(rng, digits), rng.randint(2, 9), _num(rng, max(1, digits - 1))
    bought = boxes * per
    return _Draft(
        question=(
            f"{name} has {a} {item}. {name} buys {boxes} boxes with {per} {item} in each box. "
            f"How many {item} does {name} have now?"
        ),
        answer=str(a + bought),
        cot_steps=[
            f"The boxes hold ${_times(boxes, per)} = {bought}$ {item}.",
            f"Together ${a} + {bought} = {a + bought}$ {item}.",
        ],
        tir_intro="I will add the starting amount and the boxes with Python.",
        code=f"start = {a}\nbought = {boxes} * {per}\nprint(start + bought)",
        output=f"{a + bought}\n",
    )


def _word_share(rng: random.Random, digits: int, name: str, item: str) -> _Draft:
    each, friends = _num(rng, digits), rng.randint(2, 9)
    total = each * friends
    return _Draft(
        question=(
            f"{name} shares {total} {item} equally among {friends} friends. "
            f"How many {item} does each friend get?"
        ),
        answer=str(each),
        cot_steps=[f"Each friend gets $\\frac{{{total}}}{{{friends}}} = {each}$ {item}."],
        tir_intro="I will divide the total by the number of friends with Python.",
        code=f"print({total} // {friends})",
        output=f"{each}\n",
    )


def _word_travel(rng: random.Random, digits: int, name: str, item: str) -> _Draft:
    del item
    speed, hours = _num(rng, digits), rng.randint(2, 9)
    return _Draft(
        question=(
            f"{name} drives at {speed} kilometers per hour for {hours} hours. "
            f"How many kilometers does {name} drive?"
        ),
        answer=str(speed * hours),
        cot_steps=[f"Distance is speed times time: ${_times(speed, hours)} = {speed * hours}$."],
        tir_intro="Distance is speed times time; I will compute it with Python.",
        code=f"speed = {speed}\nhours = {hours}\nprint(speed * hours)",
        output=f"{speed * hours}\n",
    )


def _word_change(rng: random.Random, digits: int, name: str, item: str) -> _Draft:
    count, price = rng.randint(2, 9), _num(rng, digits)
    cost = count * price
    paid = (cost // 100 + 1) * 100  # the smallest whole hundred above the cost
    return _Draft(
        question=(
            f"{name} buys {count} {item} at {price} dollars each and pays with {paid} dollars. "
            f"How many dollars of change does {name} get?"
        ),
        answer=str(paid - cost),
        cot_steps=[
            f"The {item} cost ${_times(count, price)} = {cost}$ dollars.",
            f"The change is ${paid} - {cost} = {paid - cost}$ dollars.",
        ],
        tir_intro="I will compute the cost and the change with Python.",
        code=f"cost = {count} * {price}\nprint({paid} - cost)",
        output=f"{paid - cost}\n",
    )


_WORD_TEMPLATES = (_word_boxes, _word_share, _word_travel, _word_change)


def _gen_word(rng: random.Random, digits: int) -> _Draft:
    template = rng.choice(_WORD_TEMPLATES)
    return template(rng, digits, rng.choice(_NAMES), rng.choice(_ITEMS))


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("add", 3, "digits of each addend", _gen_add),
        Kind("sub", 3, "digits of the minuend", _gen_sub),
        Kind("mul", 3, "digits of the first factor (the second is 2..9)", _gen_mul),
        Kind("big_mul", 5, "digits of each factor", _gen_big_mul),
        Kind("frac_add", 1, "denominators up to 12 (1) or 10**digits - 1", _gen_frac_add),
        Kind("frac_mul", 1, "denominators up to 12 (1) or 10**digits - 1", _gen_frac_mul),
        Kind("percent", 3, "about the digits of the base number", _gen_percent),
        Kind("linear", 1, "max digits of the coefficient of x", _gen_linear),
        Kind("word", 2, "digits of the main quantity", _gen_word),
    )
}
EASY_KINDS = ("add", "sub", "mul", "linear", "word")


# ----------------------------------------------------------------------------- problems


def question_split(question: str) -> str:
    """The split a question belongs to, from a hash of its text ("train" or "test")."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def _check_args(
    kinds: Sequence[str], split: str, digits: Mapping[str, int], tir_by_hand: float
) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not kinds:
        raise ValueError("kinds is empty; pass kind names from KINDS")
    unknown = [k for k in list(kinds) + list(digits) if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known kinds are {sorted(KINDS)}")
    for k, d in digits.items():
        if not isinstance(d, int) or not 1 <= d <= 30:
            raise ValueError(f"digits[{k!r}] = {d!r}; use an int between 1 and 30")
    if not 0.0 <= tir_by_hand <= 1.0:
        raise ValueError(f"tir_by_hand = {tir_by_hand!r}; use a share between 0 and 1")


_TIR_CLOSINGS = (
    "The answer is $\\boxed{{{}}}$.",
    "So the result is $\\boxed{{{}}}$.",
    "Therefore the answer is $\\boxed{{{}}}$.",
    "The output gives $\\boxed{{{}}}$.",
)
_BY_HAND_INTRO = "This is quick to do by hand:"


def _tir_text(d: _Draft, rng: random.Random, by_hand: float) -> str:
    """The TIR solution: one of the kind's (intro, program) pairs and closing sentences;
    with probability `by_hand`, for a kind that has one, the by-hand answer instead."""
    if d.by_hand and rng.random() < by_hand:
        return f"{_BY_HAND_INTRO} {d.by_hand}.\n{_boxed_line(d.answer)}"
    intro, code = rng.choice(((d.tir_intro, d.code), *d.more_tir))
    closing = rng.choice(_TIR_CLOSINGS).format(d.answer)
    return f"{intro}\n```python\n{code}\n```\n```output\n{d.output}```\n{closing}"


def problem(
    seed: int,
    index: int,
    split: str = "train",
    kinds: Sequence[str] | None = None,
    digits: Mapping[str, int] | None = None,
    tir_by_hand: float = 0.0,
) -> dict[str, str | int]:
    """The `index`-th problem of a seed and split; a pure function of its arguments.

    Args:
        seed: corpus seed.
        index: any non-negative int (the corpus is unlimited).
        split: "train" or "test"; questions of the two never overlap.
        kinds: kind names to cycle through (index % len(kinds)); default all of `KINDS`.
        digits: per-kind difficulty overrides, e.g. {"add": 2}.
        tir_by_hand: share of by-hand TIR solutions in the kinds that have one (add, sub,
            mul, big_mul); the question and the CoT text do not depend on it.

    Returns:
        dict with id, split, kind, question, answer (gold), cot, tir, digits.

    Raises:
        ValueError: bad split/kind/digits, or a kind whose question space at that difficulty
            has no room for the split.
    """
    kinds = list(kinds) if kinds is not None else list(KINDS)
    digits = dict(digits or {})
    _check_args(kinds, split, digits, tir_by_hand)
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    kind = KINDS[kinds[index % len(kinds)]]
    nd = digits.get(kind.name, kind.default_digits)
    for draw in range(_MAX_DRAWS):
        rng = random.Random(f"{seed}:{split}:{index}:{draw}")
        d = kind.generate(rng, nd)
        if question_split(d.question) == split:
            break
    else:
        raise ValueError(
            f"kind {kind.name!r} with digits={nd} found no {split} question in {_MAX_DRAWS} "
            f"draws: its question space is too small for a {split} split; raise digits"
        )
    return {
        "id": f"synth-{split}-{seed}-{index}",
        "split": split,
        "kind": kind.name,
        "digits": nd,
        "question": d.question,
        "answer": d.answer,
        "cot": "\n".join([*d.cot_steps, _boxed_line(d.answer)]),
        "tir": _tir_text(d, random.Random(f"{seed}:{split}:{index}:tir"), tir_by_hand),
    }


# ----------------------------------------------------------------------------- pretraining


def _facts_times_table(rng: random.Random) -> str:
    n = rng.randint(2, 19)
    rows = ", ".join(f"${_times(n, k)} = {n * k}$" for k in range(1, 11))
    return f"Multiples of {n}: {rows}."


def _facts_squares(rng: random.Random) -> str:
    start = rng.randint(1, 40)
    rows = ", ".join(f"${k}^2 = {k * k}$" for k in range(start, start + 6))
    return f"Perfect squares: {rows}."


def _facts_fraction(rng: random.Random) -> str:
    a, b = rng.randint(1, 9), rng.randint(2, 12)
    g = rng.randint(2, 9)
    r = Fraction(a * g, b * g)
    return (
        f"To simplify $\\frac{{{a * g}}}{{{b * g}}}$, divide the numerator and the denominator "
        f"by their greatest common divisor ${math.gcd(a * g, b * g)}$: "
        f"$\\frac{{{a * g}}}{{{b * g}}} = {_frac_tex(r)}$."
    )


def _facts_gcd(rng: random.Random) -> str:
    a, b = rng.randint(4, 200), rng.randint(4, 200)
    return (
        f"The greatest common divisor of {a} and {b} is {math.gcd(a, b)}, and their least "
        f"common multiple is {math.lcm(a, b)}; indeed "
        f"${_times(math.gcd(a, b), math.lcm(a, b))} = {_times(a, b)} = {a * b}$."
    )


_EXPLANATIONS = (
    "To add two whole numbers, add one place value of the second number at a time.",
    "Multiplying a number by a one-digit number: multiply each place value and add the parts.",
    "Long multiplication splits one factor by place value and adds the partial products.",
    "A fraction is in lowest terms when its numerator and denominator have no common factor.",
    "To add fractions, rewrite them over the least common denominator, then add numerators.",
    "p percent of n equals p times n divided by 100.",
    "To solve a x + b = c, subtract b from both sides and then divide both sides by a.",
)
_FACTS = (_facts_times_table, _facts_squares, _facts_fraction, _facts_gcd)


class SyntheticMath:
    """Indexable synthetic math corpus for one seed and split.

    `ds[i]` is `problem(seed, i, split, kinds, digits, tir_by_hand)`; `len(ds)` is
    `num_records` so Grain and plain iteration see a finite source, but any index works
    through `problem`.
    """

    def __init__(
        self,
        seed: int = 0,
        kinds: Sequence[str] | None = None,
        split: str = "train",
        digits: Mapping[str, int] | None = None,
        num_records: int = 100_000,
        tir_by_hand: float = 0.0,
    ) -> None:
        """Creates the corpus view.

        Args:
            seed: corpus seed.
            kinds: kinds to cycle through; default all of `KINDS` (`EASY_KINDS` for a
                quick tiny-model run).
            split: "train" or "test".
            digits: per-kind difficulty overrides, e.g. {"big_mul": 4}.
            num_records: reported length.
            tir_by_hand: share of by-hand TIR solutions (see `problem`).
        """
        self.seed = seed
        self.kinds = tuple(kinds) if kinds is not None else tuple(KINDS)
        self.split = split
        self.digits = dict(digits or {})
        self.tir_by_hand = tir_by_hand
        _check_args(self.kinds, split, self.digits, tir_by_hand)
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        self.num_records = num_records

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, str | int]:
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} outside [0, {self.num_records})")
        return problem(
            self.seed, int(index), self.split, self.kinds, self.digits, self.tir_by_hand
        )

    def __iter__(self) -> Iterator[dict[str, str | int]]:
        return (self[i] for i in range(self.num_records))

    def pretrain_document(self, index: int) -> str:
        """A pretraining document: explanations, facts and worked train-split examples.

        Worked examples always come from the train split (whatever this view's split), so
        pretraining never sees a test question.

        Args:
            index: any non-negative int.

        Returns:
            Plain text of a few hundred characters to about 2 KB.
        """
        rng = random.Random(f"{self.seed}:pretrain:{index}")
        parts = []
        for _ in range(rng.randint(2, 4)):
            roll = rng.random()
            if roll < 0.5:
                j = rng.randrange(1 << 40)
                p = problem(self.seed, j, "train", self.kinds, self.digits)
                parts.append(f"Problem: {p['question']}\nSolution: {p['cot']}")
            elif roll < 0.85:
                parts.append(rng.choice(_FACTS)(rng))
            else:
                parts.append(rng.choice(_EXPLANATIONS))
        return "\n\n".join(parts)
