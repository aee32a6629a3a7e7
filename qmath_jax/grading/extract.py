"""Final-answer extraction from model responses and reference solutions.

The order of the rules follows the Qwen2.5-Math evaluation (``parser.extract_answer``):
the Minerva "final answer is $...$. I hope" form, then the last ``\\boxed{}`` /
``\\fbox{}``, then "the answer is", GSM8K's ``####``, the Chinese "答案是", and the last
number as a fallback. Multiple-choice sets return one capital letter.
"""

from __future__ import annotations

import re

from qmath_jax.grading.normalize import strip_answer

# Sets whose answers are option letters (A-E).
MULTIPLE_CHOICE_SETS = frozenset({"mmlu_stem", "mmlu", "sat_math", "aqua", "gaokao2023"})
# Sets whose answers keep their text units (the reference skips unit removal there).
KEEP_UNIT_SETS = frozenset({"minerva_math", "carp_en"})

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")
_CHOICE_RE = re.compile(r"\b([A-E])\b")


def find_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}``, nested braces included.

    Args:
        text: a model response or a reference solution.

    Returns:
        The content without the command and the outer braces, or None when there is no
        box. ``\\boxed 5`` (no braces) yields the token after the command.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed") :] if rest.startswith("\\boxed") else rest[len("\\fbox") :]
    if rest.startswith("{"):
        return _braced(rest)
    token = rest.strip().split("$")[0].strip()
    return token.split()[0] if token else None


def _braced(s: str) -> str | None:
    """Content of the brace group opening ``s`` (``s[0] == "{"``); None if unclosed."""
    depth = 0
    for i, ch in enumerate(s):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return s[1:i]
    return None


def _after_trigger(text: str, trigger: str) -> str:
    """Text after the last ``trigger``, up to the end of its paragraph."""
    tail = text.rsplit(trigger, 1)[1].strip()
    tail = tail.split("\n\n")[0].strip()
    tail = tail.lstrip(":").strip()
    # "The answer is $5$." -> "5": math delimiters around the whole answer.
    m = re.fullmatch(r"\$+(.*?)\$+\.?", tail, flags=re.DOTALL)
    if m:
        tail = m.group(1)
    return tail


def extract_choice(text: str) -> str | None:
    """The option letter (A-E) a multiple-choice response picks, or None.

    The boxed content wins; then the letter after the last "answer is" / "choice is";
    then the last standalone capital A-E in the text.

    Args:
        text: the response.

    Returns:
        One capital letter, or None when none is found.
    """
    boxed = find_boxed(text)
    if boxed is not None:
        letters = _CHOICE_RE.findall(re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed).upper())
        if letters:
            return letters[0]
    lowered = text.replace("choice is", "answer is")
    if "answer is" in lowered:
        letters = _CHOICE_RE.findall(_after_trigger(lowered, "answer is").upper())
        if letters:
            return letters[0]
    letters = _CHOICE_RE.findall(text)
    return letters[-1] if letters else None


def _raw_answer(text: str, use_last_number: bool) -> str | None:
    """The answer span before normalisation, by the first rule that applies."""
    if "final answer is $" in text and "$. I hope" in text:
        return text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    boxed = find_boxed(text)
    if boxed is not None:
        return boxed
    for trigger in ("he answer is", "final answer is"):
        if trigger in text:
            return _after_trigger(text, trigger)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    if "答案是" in text:
        return text.split("答案是", 1)[1].strip().split("\n\n")[0].strip()
    if use_last_number:
        numbers = _LAST_NUMBER_RE.findall(text.replace(",", ""))
        if numbers:
            return numbers[-1]
    return None


def extract_answer(
    text: str | None, dataset: str | None = None, *, use_last_number: bool = True
) -> str | None:
    """Extracts and normalises the final answer of a response or a reference solution.

    Args:
        text: the full response (or a gold solution such as a MATH ``solution``).
        dataset: the benchmark name (``"math"``, ``"gsm8k"``, ``"mmlu_stem"``,
            ``"minerva_math"``, ...). Multiple-choice sets return a letter; Minerva
            keeps units. None means a free-form math answer.
        use_last_number: fall back to the last number in the text when no answer
            marker is found.

    Returns:
        The normalised answer string, or None when nothing answer-like is found.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects the response text as str, got {type(text)!r}")
    text = text.replace("\u043a\u0438", "")
    if dataset in MULTIPLE_CHOICE_SETS:
        return extract_choice(text)
    raw = _raw_answer(text, use_last_number)
    if raw is None:
        return None
    raw = re.sub(r"\n\s*", "", raw).strip()
    answer = strip_answer(raw, strip_units=dataset not in KEEP_UNIT_SETS)
    return answer or None
