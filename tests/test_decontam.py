"""Decontamination: 13-gram + LCS ratio, on hand-made pairs and on MATH train vs test."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmath_jax.data import decontam

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def lcs_dp(a, b):
    """Textbook O(len(a) * len(b)) dynamic programme, the reference for the fast LCS."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_normalize_drops_symbols_and_splits_cjk():
    text = "What is $\\frac{1}{2}$ of  10?\nUse   $x^2$, NOT_this; 数学题"
    assert decontam.normalize(text) == [
        "what", "is", "frac", "1", "2", "of", "10", "use", "x", "2", "not", "this",
        "数", "学", "题",
    ]  # fmt: skip


def test_fast_lcs_equals_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert decontam.lcs_length(a, b) == lcs_dp(a, b)
    assert decontam.lcs_ratio(["a", "b", "c"], ["x", "a", "c", "y", "z"]) == pytest.approx(2 / 3)
    assert decontam.lcs_ratio([], ["a"]) == 0.0


def _words(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


def test_hand_made_pairs_at_the_thresholds():
    test_text = " ".join(_words("w", 25))
    index = decontam.build_index({"toy": [test_text]})
    shared13 = _words("w", 13)
    # 25 tokens each, LCS 15 (13 shared in a row + w13 w14): ratio 15/25 = 0.6, not > 0.6.
    at_threshold = " ".join(shared13 + _words("z", 10) + ["w13", "w14"])
    # One more common word: 16/25 = 0.64 > 0.6.
    above = " ".join(shared13 + _words("z", 9) + ["w13", "w14", "w15"])
    # High LCS but no 13 consecutive common words: every 10th word differs.
    no_gram = " ".join(w if i % 10 != 9 else "q" for i, w in enumerate(_words("w", 25)))
    near_dup = "W0, w1; w2 (w3) " + " ".join(_words("w", 25)[4:]) + "!!"
    assert decontam.lcs_ratio(decontam.normalize(at_threshold), _words("w", 25)) == 0.6
    assert decontam.find_matches(at_threshold, index) == []
    assert decontam.find_matches(at_threshold, index, threshold=0.59)[0]["lcs_ratio"] == 0.6
    (m,) = decontam.find_matches(above, index)
    assert m == {
        "test_set": "toy",
        "test_index": 0,
        "test_id": "0",
        "ngram": " ".join(shared13),
        "lcs_ratio": 0.64,
    }
    assert decontam.lcs_ratio(decontam.normalize(no_gram), _words("w", 25)) > 0.9
    assert decontam.find_matches(no_gram, index) == []
    assert decontam.find_matches(near_dup, index)[0]["lcs_ratio"] == 1.0
    kept, removed = decontam.decontaminate(
        [{"q": at_threshold}, {"q": above}, {"q": no_gram}, {"q": near_dup}],
        {"toy": [test_text]},
        text_field="q",
    )
    assert [r["q"] for r in kept] == [at_threshold, no_gram]
    assert [r["train_index"] for r in removed] == [1, 3]


def test_short_texts_match_only_when_equal_after_normalisation():
    index = decontam.build_index({"t": ["Compute $\\dbinom{8}{4}$.", "What is 2+2?"]})
    assert decontam.find_matches("compute \\dbinom{8}{4}", index)[0]["test_index"] == 0
    assert decontam.find_matches("Compute $\\dbinom{8}{5}$.", index) == []


def _load(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def math_result():
    if not (BENCH / "math" / "train.jsonl").is_file():
        pytest.skip(f"benchmarks not found at {BENCH}")
    train = _load(BENCH / "math" / "train.jsonl")
    tests = {
        "math": _load(BENCH / "math" / "test.jsonl"),
        "math500": _load(BENCH / "math500" / "test.jsonl"),
    }
    start = time.perf_counter()
    kept, removed = decontam.decontaminate(
        train,
        {k: [r["problem"] for r in v] for k, v in tests.items()},
        text_field="problem",
        test_ids={k: [r["unique_id"] for r in v] for k, v in tests.items()},
    )
    return train, tests, kept, removed, time.perf_counter() - start


def _removed_by_text(removed, fragment):
    hits = [r for r in removed if fragment in r["record"]["problem"]]
    assert len(hits) == 1, f"{fragment!r}: {len(hits)} removed records"
    return hits[0]


def test_math_train_near_duplicates_of_the_qwen_report_are_removed(math_result):
    train, tests, kept, removed, seconds = math_result
    assert seconds < 60  # 7500 x 5500 texts (about 1 s on one core)
    assert len(kept) + len(removed) == len(train) == 7500
    # "... first exceed $\$2$?" (train) vs "... first exceed $\$5$?" (test).
    krista = _removed_by_text(removed, "Krista put 1 cent")
    assert "$\\$2$" in krista["record"]["problem"]
    assert krista["match"]["test_id"] == "test/algebra/2664.json"
    assert "$\\$5$" in tests["math"][krista["match"]["test_index"]]["problem"]
    # "... 1 + 2 + ... + 10$ is divided by 8?" (train) vs "... divided by 9?" (test).
    ap = _removed_by_text(removed, "$1 + 2 + 3 + 4 + \\dots + 9 + 10$ is  divided by 8")
    assert ap["match"]["test_id"] == "test/number_theory/466.json"
    # Every removal is a real 13-gram + LCS match, recomputed with the slow reference.
    for r in removed[::25]:
        a = decontam.normalize(r["record"]["problem"])
        m = r["match"]
        b = decontam.normalize(tests[m["test_set"]][m["test_index"]]["problem"])
        assert lcs_dp(a, b) / min(len(a), len(b)) == pytest.approx(m["lcs_ratio"], abs=1e-4)
        assert m["lcs_ratio"] > 0.6 and m["ngram"] in " ".join(b) and m["ngram"] in " ".join(a)
    # MATH-500 is a subset of MATH test, so its matches come with MATH matches.
    sets_hit = {m["test_set"] for r in removed for m in r["matches"]}
    assert sets_hit == {"math", "math500"}
    # Nothing kept is an exact (normalised) copy of a test problem.
    test_norm = {tuple(decontam.normalize(r["problem"])) for v in tests.values() for r in v}
    assert not [r for r in kept if tuple(decontam.normalize(r["problem"])) in test_norm]
    assert 200 < len(removed) < 1500


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qmath_jax.data.decontam", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_writes_outputs_and_reports_malformed_lines(tmp_path):
    test_text = " ".join(_words("w", 20))
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"question": test_text, "idx": 7}) + "\n" + "{broken\n"
    )
    train_lines = [
        json.dumps({"problem": "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16"}),
        json.dumps({"problem": "something else entirely, about triangles"}),
        "{not json",
        json.dumps({"text": "no problem field"}),
        json.dumps({"problem": "   "}),
        json.dumps(["a", "list"]),
        "",
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    out = tmp_path / "out"
    proc = _run_cli(
        "--train", str(tmp_path / "train.jsonl"),
        "--test", f"toy={tmp_path / 'test.jsonl'}:question",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train_records"] == 2 and summary["kept"] == 1 and summary["removed"] == 1
    assert summary["malformed"] == 5 and summary["removed_by_test_set"] == {"toy": 1}
    (removed,) = _load(out / "removed.jsonl")
    assert removed["train_line"] == 1 and removed["match"]["test_id"] == "7"
    assert removed["match"]["test_text"] == test_text
    assert _load(out / "kept.jsonl") == [json.loads(train_lines[1])]
    bad = {
        (b["file"].rsplit("/", 1)[-1], b["line"]): b["reason"]
        for b in _load(out / "malformed.jsonl")
    }
    assert set(bad) == {("test.jsonl", 2), ("train.jsonl", 3), ("train.jsonl", 4),
                        ("train.jsonl", 5), ("train.jsonl", 6)}  # fmt: skip
    assert bad[("train.jsonl", 3)].startswith("broken JSON")
    assert "missing field 'problem'" in bad[("train.jsonl", 4)]
    assert "is empty" in bad[("train.jsonl", 5)]
    assert "expected a JSON object" in bad[("train.jsonl", 6)]
    assert "train.jsonl:3: broken JSON" in proc.stderr

    strict = _run_cli(
        "--train", str(tmp_path / "train.jsonl"),
        "--test", f"toy={tmp_path / 'test.jsonl'}:question",
        "--out", str(tmp_path / "strict"), "--strict",
    )  # fmt: skip
    assert strict.returncode == 2
    assert "test.jsonl:2: broken JSON" in strict.stderr and "drop --strict" in strict.stderr
    missing = _run_cli("--train", str(tmp_path / "nope.jsonl"), "--test", "t=x.jsonl", "--out", "o")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_spec = _run_cli("--train", "a", "--test", "nameless", "--out", "o")
    assert bad_spec.returncode == 2 and "NAME=PATH.jsonl[:FIELD]" in bad_spec.stderr
