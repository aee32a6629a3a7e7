"""Normalisation of final answers (LaTeX or plain text) before comparison.

The steps follow the Qwen2.5-Math evaluation's ``strip_string`` in spirit (fraction
spellings, ``\\left``/``\\right``, units, degrees, percent, trailing
periods, LaTeX spacing), with two deliberate differences that make it safer:
unit words are removed only when they follow a number (the reference removes single
letters such as "a" or "m" anywhere), and commas are removed only where they are
thousands separators ("3,250"), never inside lists ("1,2").
"""

from __future__ import annotations

import re

# Answers longer than this are compared as plain stripped strings only: real final
# answers are short, and a bound keeps every regex pass cheap on hostile input.
MAX_ANSWER_CHARS = 1000

_UNIT_WORDS = frozenset(
    [
        "unit",
        "units",
        "square",
        "sq",
        "cubic",
        "cu",
        "cm",
        "mm",
        "km",
        "m",
        "meter",
        "meters",
        "metre",
        "metres",
        "centimeter",
        "centimeters",
        "millimeter",
        "millimeters",
        "kilometer",
        "kilometers",
        "inch",
        "inches",
        "in",
        "ft",
        "foot",
        "feet",
        "yard",
        "yards",
        "yd",
        "mile",
        "miles",
        "mi",
        "mph",
        "kmh",
        "kph",
        "km/h",
        "m/s",
        "ft/s",
        "g",
        "kg",
        "gram",
        "grams",
        "kilogram",
        "kilograms",
        "mg",
        "lb",
        "lbs",
        "pound",
        "pounds",
        "oz",
        "ounce",
        "ounces",
        "ton",
        "tons",
        "l",
        "liter",
        "liters",
        "litre",
        "litres",
        "ml",
        "gallon",
        "gallons",
        "gal",
        "quart",
        "quarts",
        "pint",
        "pints",
        "cup",
        "cups",
        "degree",
        "degrees",
        "deg",
        "radian",
        "radians",
        "rad",
        "dollar",
        "dollars",
        "cent",
        "cents",
        "euro",
        "euros",
        "yuan",
        "rs",
        "rupee",
        "rupees",
        "second",
        "seconds",
        "sec",
        "s",
        "minute",
        "minutes",
        "min",
        "hour",
        "hours",
        "hr",
        "hrs",
        "h",
        "day",
        "days",
        "week",
        "weeks",
        "month",
        "months",
        "year",
        "years",
        "yr",
        "yrs",
        "people",
        "persons",
        "students",
        "apples",
        "points",
        "ways",
        "times",
        "percent",
        "cents",
    ]
)

_WORD_NUMBERS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}

_NUMBER_RE = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_TRAILING_TEXT_RE = re.compile(
    r"^(.+?)\s*\\(?:text|mbox|mathrm)\s*\{([^{}]*)\}(?:\^\{?[23]\}?)?\s*$"
)
_UNIT_TAIL_RE = re.compile(
    r"^(" + _NUMBER_RE + r"|.*\d\}?)\s*([a-zA-Z][a-zA-Z ./]*(?:\^\{?[23]\}?)?)$"
)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def words_to_number(text: str) -> str:
    """Turns a spelled-out number such as "twenty five" into "25"; other text is kept.

    Args:
        text: a candidate answer.

    Returns:
        The digits when ``text`` is entirely a number word (0..99), else ``text``.
    """
    words = text.strip().lower().replace("-", " ").split()
    if not words or len(words) > 2 or any(w not in _WORD_NUMBERS for w in words):
        return text
    if len(words) == 2:
        tens, ones = _WORD_NUMBERS[words[0]], _WORD_NUMBERS[words[1]]
        if tens < 20 or tens % 10 or ones >= 10:
            return text
        return str(tens + ones)
    return str(_WORD_NUMBERS[words[0]])


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
        elif part[1] == "{":
            out += "{" + part[0] + "}" + part[1:]
        else:
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt2`` -> ``\\sqrt{2}``."""
    return re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` (two integers) -> ``\\frac{3}{4}``."""
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if not m:
        return s
    return "\\frac{" + m.group(1) + "}{" + m.group(2) + "}"


def _strip_unit_tail(s: str) -> str:
    """Drops a trailing unit phrase ("100 square units", "5 cm^2") after a number."""
    m = _UNIT_TAIL_RE.match(s)
    if not m:
        return s
    words = re.sub(r"\^\{?[23]\}?$", "", m.group(2)).replace(".", " ").split()
    if not words or not all(w.lower() in _UNIT_WORDS for w in words):
        return s
    if len(m.group(2)) == 1 and not s[len(m.group(1)) :].startswith(" "):
        # "4s" is more likely a product with a variable than "4 seconds".
        return s
    return m.group(1).strip()


def _strip_outer_braces(s: str) -> str:
    """``{5}`` -> ``5`` when the braces wrap the whole answer."""
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _matching_close(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def _matching_close(s: str, start: int) -> int:
    """Index of the bracket closing ``s[start]``, or -1."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "{([":
            depth += 1
        elif s[i] in "})]":
            depth -= 1
            if depth == 0:
                return i
    return -1


def strip_answer(answer: str, *, strip_units: bool = True) -> str:
    """Normalises a final answer so that equal answers usually become equal strings.

    Args:
        answer: the raw answer, e.g. ``"\\dfrac{1}{2}\\text{ cm}"``.
        strip_units: remove units, degrees, currency and percent signs.

    Returns:
        The normalised string (``"\\frac{1}{2}"`` for the example).
    """
    s = str(answer).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = s.replace("\n", " ").replace("\u2212", "-").strip()
    s = s.lstrip(":").strip()
    s = s.rstrip(".").rstrip("/").strip()
    # LaTeX spacing commands and thousands-separator spellings.
    s = s.replace("{,}", ",").replace(",\\!", ",").replace("\\!", "")
    s = (
        re.sub(r"(?<!\\)\\[,;: ]", " ", s)
        .replace("~", " ")
        .replace("\\quad", " ")
        .replace("\\qquad", " ")
    )
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}", r"\\begin{pmatrix}", s)
    s = s.replace("\\end{array}", "\\end{pmatrix}")
    s = s.replace("bmatrix", "pmatrix").replace("vmatrix", "pmatrix")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\neq(?![a-zA-Z])", r"\\ne", s)
    s = re.sub(r"\\leq(?![a-zA-Z])", r"\\le", s)
    s = re.sub(r"\\geq(?![a-zA-Z])", r"\\ge", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    if strip_units:
        s = _remove_units(s)
    s = _TEXT_CMD_RE.sub(r"\1", s)
    if strip_units:
        s = _strip_unit_tail(s.strip())
    s = re.sub(r"\s+and\s+", ",", s)
    s = words_to_number(s)
    s = s.replace("\\emptyset", "{}").replace("\\varnothing", "{}")
    s = s.replace("infinity", "\\infty")
    s = s.replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = re.sub(r"^(?:[a-z]\s*\\in|[a-z]\s*\\to)\s*", "", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = re.sub(r"(\d+)\.0+(?!\d)", r"\1", s)
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)
    if s.startswith("."):
        s = "0" + s
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _strip_outer_braces(s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _fix_fracs(s)
    s = _fix_a_slash_b(s)
    return s


def _remove_units(s: str) -> str:
    """Units, degrees, currency and percent signs."""
    m = _TRAILING_TEXT_RE.match(s)
    if m and re.search(r"\d|\}", m.group(1)):
        # "\text{...}" after a number is a unit ("100\text{ square units}").
        s = m.group(1).strip()
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?:mathrm|text)\{\s*(?:cm|m|km|mm|g|kg|s)\s*\}(?:\^\{?[23]\}?)?$", "", s).strip()
    for _ in range(2):
        s = _strip_unit_tail(s.strip())
    return s.strip()
