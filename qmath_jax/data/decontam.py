"""Decontamination of training data against test sets, as the Qwen2.5-Math report does it.

A training text is contaminated by a test text when

1. after normalisation the two share at least one word 13-gram, and
2. their word-level longest-common-subsequence ratio exceeds 0.6, where

       lcs_ratio(a, b) = LCS(tokens(a), tokens(b)) / min(len(tokens(a)), len(tokens(b)))

   (the LCS length over the token length of the shorter text, so a training text that
   contains a whole test problem scores 1.0).

Normalisation: lowercase; every character that is not a letter or digit (punctuation, LaTeX
symbols, `$`, `\\`, braces, ...) becomes a space; whitespace collapses; tokens are the
remaining words, and each CJK ideograph is a token of its own (Chinese has no spaces).
A text shorter than n tokens has one "gram", its whole token sequence, so short texts match
only texts with the same normalised tokens.

Speed: test texts go into an inverted index from n-gram hash to test items; a training text
looks up its own n-grams and runs the LCS (bit-parallel, on Python ints) only against the
candidates found there. MATH train (7500) against MATH test + MATH-500 (5500) takes seconds.

CLI::

    python -m qmath_jax.data.decontam --train train.jsonl --train_field problem \\
        --test math=../shared/benchmarks/math/test.jsonl:problem \\
        --test math500=../shared/benchmarks/math500/test.jsonl:problem --out DIR

writes DIR/kept.jsonl, DIR/removed.jsonl (each with the matching test item), and
DIR/malformed.jsonl (input lines that could not be used: broken JSON, missing or empty field,
with file and line), and prints a JSON summary. Malformed lines are skipped and reported by
default; `--strict` stops at the first one with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NGRAM = 13
LCS_THRESHOLD = 0.6
ID_FIELDS = ("unique_id", "id", "idx")  # record fields used to name a test item

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize(text: str) -> list[str]:
    """Normalised word tokens of a text (see the module docstring).

    Args:
        text: any string.

    Returns:
        Lowercased tokens; punctuation and symbols removed.
    """
    return _TOKEN_RE.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """The set of word n-grams; a text shorter than n gives its whole token tuple."""
    if not tokens:
        return set()
    if len(tokens) < n:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel algorithm (Hyyrö 2004) on Python ints: O(len(a) * len(b) / word size).
    """
    if len(a) < len(b):
        a, b = b, a  # the bit vector runs over the longer sequence, fewer loop turns
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def lcs_ratio(a: Sequence[str], b: Sequence[str]) -> float:
    """LCS length over the token length of the shorter sequence (0.0 if one is empty)."""
    shorter = min(len(a), len(b))
    return lcs_length(a, b) / shorter if shorter else 0.0


@dataclass
class NgramIndex:
    """Inverted index from n-gram to the test items that contain it.

    Attributes:
        n: n-gram length.
        names: test-set name per item.
        positions: index of the item inside its set.
        ids: id of each item (its record id, else its position).
        tokens: normalised tokens per item.
        postings: n-gram -> item numbers.
    """

    n: int
    names: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    postings: dict[tuple[str, ...], list[int]] = field(default_factory=dict)

    def add(self, name: str, position: int, item_id: str, text: str) -> None:
        """Adds one test text."""
        item = len(self.tokens)
        toks = normalize(text)
        self.names.append(name)
        self.positions.append(position)
        self.ids.append(item_id)
        self.tokens.append(toks)
        for g in ngrams(toks, self.n):
            self.postings.setdefault(g, []).append(item)

    def __len__(self) -> int:
        return len(self.tokens)


def build_index(
    test_sets: Mapping[str, Sequence[str]],
    n: int = NGRAM,
    test_ids: Mapping[str, Sequence[str]] | None = None,
) -> NgramIndex:
    """Indexes every test text by its word n-grams.

    Args:
        test_sets: set name -> texts.
        n: n-gram length (13 in the report).
        test_ids: optional set name -> per-item ids (same length as the texts); default the
            item's position in its set.

    Returns:
        The index.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    index = NgramIndex(n=n)
    for name, texts in test_sets.items():
        ids = (test_ids or {}).get(name)
        if ids is not None and len(ids) != len(texts):
            raise ValueError(
                f"test_ids[{name!r}] has {len(ids)} ids for {len(texts)} texts; give one id "
                f"per text"
            )
        for pos, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"test set {name!r} item {pos} is {type(text).__name__}, not str")
            index.add(name, pos, str(ids[pos]) if ids is not None else str(pos), text)
    return index


def find_matches(
    text: str, index: NgramIndex, threshold: float = LCS_THRESHOLD
) -> list[dict[str, Any]]:
    """Every test item that contaminates `text`, best first.

    An item contaminates when it shares an n-gram with `text` and their LCS ratio exceeds
    `threshold`.

    Args:
        text: a training text.
        index: from `build_index`.
        threshold: LCS ratio that must be exceeded (strictly).

    Returns:
        [{"test_set", "test_index", "test_id", "ngram", "lcs_ratio"}], sorted by decreasing
        ratio (ties in index order); empty when the text is clean.
    """
    toks = normalize(text)
    shared: dict[int, tuple[str, ...]] = {}
    for g in ngrams(toks, index.n):
        for item in index.postings.get(g, ()):
            shared.setdefault(item, g)
    found = []
    for item in sorted(shared):
        r = lcs_ratio(toks, index.tokens[item])
        if r > threshold:
            found.append((r, item))
    found.sort(key=lambda ri: -ri[0])  # stable: equal ratios keep index order
    return [
        {
            "test_set": index.names[item],
            "test_index": index.positions[item],
            "test_id": index.ids[item],
            "ngram": " ".join(shared[item]),
            "lcs_ratio": round(r, 4),
        }
        for r, item in found
    ]


def _record_text(record: Any, text_field: str | None, i: int) -> str:
    if text_field is None:
        text = record
    elif not isinstance(record, Mapping):
        raise TypeError(f"train record {i} is {type(record).__name__}, expected a dict")
    elif text_field not in record:
        raise ValueError(
            f"train record {i} has no field {text_field!r} (fields: {sorted(record)}); pass "
            f"the right text_field"
        )
    else:
        text = record[text_field]
    if not isinstance(text, str):
        raise TypeError(f"train record {i}: text is {type(text).__name__}, expected str")
    return text


def decontaminate(
    train_records: Iterable[Any],
    test_sets: Mapping[str, Sequence[str]] | NgramIndex,
    text_field: str | None = "problem",
    n: int = NGRAM,
    threshold: float = LCS_THRESHOLD,
    test_ids: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Splits training records into kept and removed (contaminated) ones.

    Args:
        train_records: dicts holding `text_field`, or plain strings with text_field=None.
        test_sets: set name -> texts, or a prebuilt `NgramIndex`.
        text_field: field holding the text; None when records are strings.
        n: n-gram length.
        threshold: LCS ratio that must be exceeded.
        test_ids: optional per-set item ids for the report (see `build_index`).

    Returns:
        (kept records, removed) where each removed entry is {"train_index", "record",
        "match", "matches"}: `match` is the best test item {test_set, test_index, test_id,
        ngram, lcs_ratio} and `matches` lists every contaminating item, best first.

    Raises:
        ValueError: a record lacks the text field.
        TypeError: a record is not a dict, or its text is not a string.
    """
    index = test_sets if isinstance(test_sets, NgramIndex) else build_index(test_sets, n, test_ids)
    kept: list[Any] = []
    removed: list[dict[str, Any]] = []
    for i, record in enumerate(train_records):
        matches = find_matches(_record_text(record, text_field, i), index, threshold)
        if not matches:
            kept.append(record)
        else:
            removed.append(
                {"train_index": i, "record": record, "match": matches[0], "matches": matches}
            )
    return kept, removed


# ----------------------------------------------------------------------------- CLI


class MalformedInput(ValueError):
    """A JSONL line that cannot be used, with its file and line."""

    def __init__(self, path: str, line: int, reason: str, raw: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason, self.raw = path, line, reason, raw

    def as_dict(self) -> dict[str, Any]:
        """JSON-able report entry."""
        return {"file": self.path, "line": self.line, "reason": self.reason, "raw": self.raw}


def read_jsonl(
    path: str | Path, text_field: str, strict: bool = False
) -> tuple[list[tuple[int, dict[str, Any]]], list[MalformedInput]]:
    """Reads the records of a JSONL file that hold a non-empty string `text_field`.

    Args:
        path: JSONL file.
        text_field: field every record must hold as a non-empty string.
        strict: raise on the first malformed line instead of collecting it.

    Returns:
        ([(line number, record)], [malformed lines]).

    Raises:
        MalformedInput: with strict, the first bad line.
        FileNotFoundError: no such file.
    """
    path = str(path)
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[MalformedInput] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            problem = _check_line(raw, text_field)
            if isinstance(problem, str):
                err = MalformedInput(path, lineno, problem, raw.rstrip("\n"))
                if strict:
                    raise err
                bad.append(err)
            else:
                good.append((lineno, problem))
    return good, bad


def _check_line(raw: str, text_field: str) -> dict[str, Any] | str:
    """The record of a line, or the reason it is malformed."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        return f"broken JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if text_field not in record:
        return f"missing field {text_field!r} (fields: {sorted(record)})"
    text = record[text_field]
    if not isinstance(text, str):
        return f"field {text_field!r} is {type(text).__name__}, expected a string"
    if not text.strip():
        return f"field {text_field!r} is empty"
    return record


def _parse_test_spec(spec: str, default_field: str) -> tuple[str, str, str]:
    """`name=path[:field]` -> (name, path, field)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(
            f"--test {spec!r}: expected NAME=PATH.jsonl[:FIELD], e.g. "
            f"math=../shared/benchmarks/math/test.jsonl:problem"
        )
    path, colon, fld = rest.rpartition(":")
    if not colon or "/" in fld or fld.endswith(".jsonl"):
        path, fld = rest, default_field  # no field given (or the colon belongs to the path)
    return name, path, fld


def _record_id(record: Mapping[str, Any], lineno: int) -> str:
    for key in ID_FIELDS:
        if key in record and isinstance(record[key], (str, int)):
            return str(record[key])
    return f"line{lineno}"


def _write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m qmath_jax.data.decontam",
        description="Remove training records that overlap test sets (13-gram + LCS ratio).",
    )
    p.add_argument("--train", required=True, help="training JSONL file")
    p.add_argument("--train_field", default="problem", help="text field of training records")
    p.add_argument(
        "--test",
        action="append",
        required=True,
        metavar="NAME=PATH[:FIELD]",
        help="a test set (repeatable); FIELD defaults to --train_field",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=NGRAM, help="n-gram length")
    p.add_argument("--threshold", type=float, default=LCS_THRESHOLD, help="LCS ratio to exceed")
    p.add_argument(
        "--strict", action="store_true", help="fail on the first malformed line (exit 2)"
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        specs = [_parse_test_spec(s, args.train_field) for s in args.test]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    malformed: list[MalformedInput] = []
    try:
        test_sets, test_ids = {}, {}
        for name, path, fld in specs:
            rows, bad = read_jsonl(path, fld, args.strict)
            malformed += bad
            test_sets[name] = [r[fld] for _, r in rows]
            test_ids[name] = [_record_id(r, ln) for ln, r in rows]
        train_rows, bad = read_jsonl(args.train, args.train_field, args.strict)
        malformed += bad
    except MalformedInput as e:
        print(f"error: {e}; fix the line or drop --strict to skip it", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e.filename}: no such file", file=sys.stderr)
        return 2
    index = build_index(test_sets, args.n, test_ids)
    kept, removed = decontaminate(
        [r for _, r in train_rows], index, args.train_field, args.n, args.threshold
    )
    for entry in removed:  # report the training line number, not the position in the list
        entry["train_line"] = train_rows[entry.pop("train_index")][0]
        entry["match"]["test_text"] = test_sets[entry["match"]["test_set"]][
            entry["match"]["test_index"]
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "kept.jsonl", kept)
    _write_jsonl(out / "removed.jsonl", removed)
    _write_jsonl(out / "malformed.jsonl", (m.as_dict() for m in malformed))
    for m in malformed[:20]:
        print(f"skipped {m}", file=sys.stderr)
    if len(malformed) > 20:
        print(f"... and {len(malformed) - 20} more in malformed.jsonl", file=sys.stderr)
    by_set: dict[str, int] = {name: 0 for name in test_sets}
    for entry in removed:  # a record can match several sets; it counts once per set
        for name in {m["test_set"] for m in entry["matches"]}:
            by_set[name] += 1
    summary = {
        "train": args.train,
        "train_records": len(train_rows),
        "kept": len(kept),
        "removed": len(removed),
        "removed_by_test_set": by_set,
        "test_items": {name: len(t) for name, t in test_sets.items()},
        "malformed": len(malformed),
        "n": args.n,
        "threshold": args.threshold,
        "seconds": round(time.perf_counter() - start, 2),
        "out": str(out),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
