"""Synthetic math corpus: gold answers, CoT steps and TIR outputs checked independently."""

import json
import os
import re
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest
import sympy

from qmath_jax.data import chat
from qmath_jax.data.synthetic import KINDS, SyntheticMath, problem, question_split
from qmath_jax.data.tokenizer import train_bpe_tokenizer

N_PER_SPLIT = 270  # 30 of each kind per split


def _samples(split: str, n: int = N_PER_SPLIT, seed: int = 7) -> list[dict]:
    ds = SyntheticMath(seed=seed, split=split)
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return _samples("train") + _samples("test")


# ----------------------------------------------------------------------------- helpers


def tex_value(expr: str, x: Fraction | None = None) -> Fraction:
    """Evaluates the arithmetic LaTeX used in the corpus with exact fractions."""
    py = expr.replace("\\times", "*").replace("\\div", "/")
    while "\\frac" in py:
        py = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", py)
    py = py.replace("^", "**")
    py = re.sub(r"(\d)\s*x", r"\1*x", py)
    if re.search(r"[^0-9x+\-*/(). ]", py):
        raise ValueError(f"unexpected symbol in {expr!r}")
    py = re.sub(r"\d+", lambda m: f"F({m.group()})", py)
    return eval(py, {"__builtins__": {}}, {"F": Fraction, "x": x})


def check_equations(text: str, x: Fraction | None = None) -> int:
    """Asserts every `$a = b = ...$` chain in `text` holds; returns how many were checked."""
    checked = 0
    for seg in re.findall(r"\$([^$]+)\$", text):
        if "=" not in seg:
            continue
        sides = [tex_value(s, x) for s in seg.split("=")]
        assert len(set(sides)) == 1, f"false equation ${seg}$ in:\n{text}"
        checked += 1
    return checked


def boxed(text: str) -> str:
    m = re.findall(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", text)
    assert m, f"no boxed answer in {text!r}"
    return m[-1]


def gold_from_question(kind: str, q: str):
    """Recomputes the answer from the question text alone (sympy / Python arithmetic)."""
    nums = [int(v) for v in re.findall(r"-?\d+", q)]
    if kind in ("add", "sub", "mul", "big_mul"):
        a, b = re.search(r"\$(\d+) (\+|-|\\times) (\d+)\$", q).group(1, 3)
        op = re.search(r"\$\d+ (\+|-|\\times) \d+\$", q).group(1)
        return {"+": int(a) + int(b), "-": int(a) - int(b)}.get(op, int(a) * int(b))
    if kind in ("frac_add", "frac_mul"):
        a, b, c, d = (sympy.Integer(v) for v in nums)
        return a / b + c / d if kind == "frac_add" else (a / b) * (c / d)
    if kind == "percent":
        p, n = nums
        return sympy.Rational(p, 100) * n
    if kind == "linear":
        lhs, rhs = re.search(r"\$([^$]+) = (-?\d+)\$", q).group(1, 2)
        xs = sympy.Symbol("x")
        expr = sympy.sympify(re.sub(r"(\d)x", r"\1*x", lhs))
        (sol,) = sympy.solve(sympy.Eq(expr, int(rhs)), xs)
        return sol
    if "buys" in q and "boxes" in q:
        a, boxes, per = nums
        return a + boxes * per
    if "shares" in q:
        total, friends = nums
        return sympy.Rational(total, friends)
    if "kilometers per hour" in q:
        speed, hours = nums
        return speed * hours
    if "change" in q:
        count, price, paid = nums
        return paid - count * price
    raise AssertionError(f"unknown question form: {q}")


# ----------------------------------------------------------------------------- tests


def test_every_kind_appears_and_fields_are_complete(samples):
    assert {s["kind"] for s in samples} == set(KINDS)
    for s in samples:
        assert set(s) == {"id", "split", "kind", "digits", "question", "answer", "cot", "tir"}
        assert all(isinstance(s[k], str) and s[k] for k in ("question", "answer", "cot", "tir"))


def test_gold_answers_match_an_independent_computation(samples):
    for s in samples:
        expected = sympy.nsimplify(gold_from_question(s["kind"], s["question"]))
        got = sympy.Rational(tex_value(s["answer"]))
        assert got == expected, s
        # Fractions are given in lowest terms, integers without a denominator.
        m = re.fullmatch(r"-?\\frac\{(\d+)\}\{(\d+)\}", s["answer"])
        if m:
            num, den = int(m.group(1)), int(m.group(2))
            assert den > 1 and sympy.gcd(num, den) == 1
        else:
            assert re.fullmatch(r"-?\d+", s["answer"]), s["answer"]


def test_cot_steps_are_all_true_and_boxed_answer_is_gold(samples):
    checked = 0
    for s in samples:
        x = Fraction(s["answer"]) if s["kind"] == "linear" else None
        checked += check_equations(s["cot"], x)
        assert boxed(s["cot"]) == s["answer"]
        assert s["cot"].rstrip().endswith(f"The answer is $\\boxed{{{s['answer']}}}$.")
    assert checked > 3 * len(samples)  # the chains are really there, not skipped


def test_big_mul_cot_is_long_multiplication(samples):
    s = next(s for s in samples if s["kind"] == "big_mul")
    a, b = (int(v) for v in re.findall(r"\d+", s["question"]))
    assert len(str(a)) == len(str(b)) == 5
    for digit_value in (int(d) * 10**k for k, d in enumerate(reversed(str(b))) if d != "0"):
        assert f"${a} \\times {digit_value} = {a * digit_value}$" in s["cot"]


TIR_RE = re.compile(r"```python\n(.*?)\n```\n```output\n(.*?)```\n", re.DOTALL)

_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    outs = []
    for code in json.load(sys.stdin):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(code, {"__name__": "__main__"})
        outs.append(buf.getvalue())
    json.dump(outs, sys.stdout)
    """
)


def test_tir_code_prints_exactly_the_output_block(samples):
    codes, outputs = [], []
    for s in samples:
        m = TIR_RE.search(s["tir"])
        assert m, s["tir"]
        codes.append(m.group(1))
        outputs.append(m.group(2))
        assert boxed(s["tir"][m.end() :]) == s["answer"]  # boxed answer after the output
    # Every snippet runs in a fresh namespace of a separate interpreter.
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(codes),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout) == outputs
    # And a few as real standalone processes, byte for byte.
    for code, out in list(zip(codes, outputs))[:: len(KINDS) * 6]:
        real = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
        )
        assert real.returncode == 0 and real.stdout == out


def test_deterministic_across_processes():
    here = [problem(3, i, "test") for i in range(20)]
    code = (
        "import json; from qmath_jax.data.synthetic import problem; "
        "print(json.dumps([problem(3, i, 'test') for i in range(20)]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout) == here
    assert problem(3, 5, "train") != problem(4, 5, "train")


def test_train_and_test_questions_never_overlap():
    n = 3000
    train = {problem(0, i, "train")["question"] for i in range(n)}
    train |= {problem(1, i, "train")["question"] for i in range(n)}
    test = {problem(0, i, "test")["question"] for i in range(n)}
    assert not train & test
    assert len(test) > 0.75 * n  # thousands of distinct test questions (small kinds repeat)
    assert all(question_split(q) == "train" for q in train)
    assert all(question_split(q) == "test" for q in test)


def test_digits_knob_changes_difficulty():
    easy = SyntheticMath(seed=0, kinds=["add"], digits={"add": 2})
    hard = SyntheticMath(seed=0, kinds=["big_mul"], digits={"big_mul": 6})
    for i in range(20):
        a, b = (int(v) for v in re.findall(r"\d+", easy[i]["question"]))
        assert 10 <= a < 100 and 10 <= b < 100
        a, b = (int(v) for v in re.findall(r"\d+", hard[i]["question"]))
        assert 10**5 <= a < 10**6 and 10**5 <= b < 10**6


def test_pretrain_documents_are_true_and_train_only():
    ds = SyntheticMath(seed=0, split="test")
    docs = [ds.pretrain_document(i) for i in range(60)]
    assert docs == [ds.pretrain_document(i) for i in range(60)]
    assert len(set(docs)) == len(docs)
    questions = []
    for doc in docs:
        assert 30 < len(doc) < 4000
        for block in doc.split("\n\n"):
            if block.startswith("Problem: "):
                q, sol = block[len("Problem: ") :].split("\nSolution: ")
                questions.append(q)
                x = Fraction(boxed(sol)) if q.startswith("Solve for $x$") else None
                check_equations(sol, x)
            else:
                check_equations(block)
    assert questions and all(question_split(q) == "train" for q in questions)


def test_examples_fit_a_512_token_context():
    texts = [SyntheticMath(seed=1).pretrain_document(i) for i in range(200)]
    tok = train_bpe_tokenizer(texts, vocab_size=1000)
    for s in _samples("train", 180, seed=2):
        for mode in ("cot", "tir"):
            prompt, target = chat.format_sft(s["question"], s[mode], mode)
            assert len(tok.encode(prompt + target)) <= 512, (s["kind"], mode)


def test_a_split_with_no_room_is_an_error(monkeypatch):
    from qmath_jax.data import synthetic

    monkeypatch.setattr(synthetic, "TEST_FRACTION", 0.0)  # every question is now train
    assert problem(0, 0, "train")["split"] == "train"
    with pytest.raises(ValueError, match="question space is too small for a test split"):
        problem(0, 0, "test", kinds=["add"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown kinds \\['division'\\]"):
        SyntheticMath(kinds=["division"])
    with pytest.raises(ValueError, match="split must be one of"):
        problem(0, 0, "validation")
    with pytest.raises(ValueError, match="digits\\['add'\\] = 0"):
        problem(0, 0, digits={"add": 0})
    with pytest.raises(IndexError):
        SyntheticMath(num_records=5)[5]
    with pytest.raises(ValueError, match="tir_by_hand = 1.5"):
        SyntheticMath(tir_by_hand=1.5)


def test_by_hand_tir_share_keeps_questions_and_writes_true_equations():
    kinds = ["add", "sub", "mul", "big_mul", "linear"]
    plain = SyntheticMath(seed=5, kinds=kinds)
    mixed = SyntheticMath(seed=5, kinds=kinds, tir_by_hand=0.4)
    n = 600
    by_hand = {k: 0 for k in kinds}
    for i in range(n):
        a, b = plain[i], mixed[i]
        assert {k: v for k, v in a.items() if k != "tir"} == {
            k: v for k, v in b.items() if k != "tir"
        }
        assert boxed(b["tir"]) == b["answer"] and "```python" in a["tir"]
        if "```python" in b["tir"]:
            assert b["tir"] == a["tir"]  # the same draw of wording and program
        else:
            by_hand[b["kind"]] += 1
            assert check_equations(b["tir"]) == 1, b["tir"]
    share = sum(by_hand.values()) / (n * 4 / len(kinds))
    assert 0.33 < share < 0.47, by_hand  # 480 arithmetic problems at 0.4: sd 0.022
    assert by_hand["linear"] == 0  # kinds without a by-hand equation always call Python
    assert all(by_hand[k] > 0 for k in ("add", "sub", "mul", "big_mul"))


def test_tir_wording_varies_but_not_its_output_block(samples):
    adds = [s for s in samples if s["kind"] == "add"]
    openings = {s["tir"].split("\n", 1)[0] for s in adds}
    closings = {s["tir"].rsplit("\n", 1)[1].split("$")[0] for s in adds}
    assert len(openings) == 3 and len(closings) == 4, (openings, closings)
    for s in adds:
        assert f"```output\n{s['answer']}\n```" in s["tir"]
