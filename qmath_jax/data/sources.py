"""Random-access record sources (JSONL, Parquet, ArrayRecord, TFDS) and the benchmark sets.

Every source is a Grain random-access data source (``len(src)`` and ``src[i]``) whose records
are dicts. Each record carries ``"_loc"``, where it came from (``path:line`` for JSONL, 1-based;
``path[row]`` for Parquet and ArrayRecord, 0-based; ``tfds:name/split[i]``), so that later
stages can name the file and line of a record they reject.

Malformed input policy (the same for every format):

* A record is malformed when it is not valid JSON / not an object (JSONL, ArrayRecord), when a
  required field is missing or null, or when a required field is an empty (whitespace-only)
  string or an empty list. A blank JSONL line is counted as ``blank line`` too.
* Default (``strict=False``): the record is skipped, a warning names ``file:line`` and the
  reason (the first ``MAX_WARNINGS`` of them, then one summary line), and the source's
  :class:`ReadReport` counts it per reason and lists its location. Nothing is dropped silently.
* ``strict=True``: the first malformed record raises :class:`MalformedRecordError` naming
  ``file:line``, the reason and the fix.

Sources validate every record once when they are opened (``validate=True``, the default), so
``len(src)`` is the number of good records and the report is complete before training starts.
For corpora too large to scan up front, ``validate=False`` skips the scan: every record is then
checked when it is read and a malformed one raises :class:`MalformedRecordError` (fail fast,
since a random-access source cannot skip an index it has already promised).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import mmap
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qmath_jax import fileio

log = logging.getLogger(__name__)

MAX_WARNINGS = 20  # per source; the rest are only counted, to keep logs readable
MAX_LISTED = 100  # problem locations kept in a ReadReport

Record = dict[str, Any]


class MalformedRecordError(ValueError):
    """A record failed validation under ``strict=True`` (or when read with ``validate=False``)."""


@dataclasses.dataclass
class ReadReport:
    """What a source read and what it skipped.

    Attributes:
      source: The file(s) or dataset the report is about.
      total: Records (lines, rows) seen.
      kept: Records served by the source.
      skipped: Count per reason (``broken JSON``, ``missing field 'x'``, ...).
      problems: ``(location, reason)`` of the first ``MAX_LISTED`` skipped records.
    """

    source: str
    total: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.skipped.values())

    def add_problem(self, loc: str, reason: str) -> None:
        """Counts one skipped record, lists it and warns about it (first few only)."""
        key = reason.split(":")[0]
        self.skipped[key] += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append((loc, reason))
        if self.num_skipped <= MAX_WARNINGS:
            log.warning("skipping malformed record at %s: %s", loc, reason)

    def summary(self) -> str:
        """One line: kept / total and the skip counts per reason."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.source}: kept {self.kept} of {self.total} records" + (
            f"; skipped {self.num_skipped} ({reasons})" if self.skipped else ""
        )

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "problems": [list(p) for p in self.problems],
        }


def check_record(record: Any, required: Sequence[str]) -> str | None:
    """Returns why ``record`` is malformed, or None when it is fine.

    Args:
      record: A decoded record.
      required: Fields that must be present, non-null and (for strings and lists) non-empty.
    """
    if not isinstance(record, Mapping):
        return f"not a JSON object: got {type(record).__name__}"
    for name in required:
        if name not in record or record[name] is None:
            return f"missing field '{name}'"
        value = record[name]
        if isinstance(value, str) and not value.strip():
            return f"empty field '{name}'"
        if isinstance(value, (list, tuple)) and len(value) == 0:
            return f"empty field '{name}'"
    return None


def _fix_hint(reason: str) -> str:
    if reason.startswith(("broken JSON", "not a JSON object")):
        return "fix: make each line one JSON object, or pass strict=False to skip and count it"
    return "fix: fill in the field, remove the record, or pass strict=False to skip and count it"


class _ValidatedSource:
    """Shared logic: validate on open, serve good records by index, report the rest."""

    def __init__(self, name: str, required: Sequence[str], strict: bool, validate: bool):
        self.required = tuple(required)
        self.strict = strict
        self.validate = validate
        self.report = ReadReport(source=name)
        self._good: np.ndarray | None = None  # raw position of each served record

    # Subclasses implement these two.
    def _num_raw(self) -> int:
        raise NotImplementedError

    def _read_raw(self, pos: int) -> tuple[Any, str, str | None]:
        """Returns (record or None, location, error reason or None)."""
        raise NotImplementedError

    def _validate_all(self) -> None:
        good = []
        n = self._num_raw()
        for pos in range(n):
            record, loc, err = self._read_raw(pos)
            if err is None:
                err = check_record(record, self.required)
            if err is not None:
                self._reject(loc, err)
                continue
            good.append(pos)
        self.report.total = n
        self.report.kept = len(good)
        self._good = np.asarray(good, dtype=np.int64)
        if self.report.num_skipped:
            log.warning("%s", self.report.summary())

    def _reject(self, loc: str, reason: str) -> None:
        if self.strict:
            raise MalformedRecordError(f"{loc}: {reason}; {_fix_hint(reason)}")
        self.report.add_problem(loc, reason)

    def _setup(self) -> None:
        if self.validate:
            self._validate_all()
        else:
            n = self._num_raw()
            self.report.total = self.report.kept = n

    def __len__(self) -> int:
        return len(self._good) if self._good is not None else self.report.total

    def __getitem__(self, index: int) -> Record:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for {self.report.source} ({n})")
        pos = int(self._good[index]) if self._good is not None else index % n
        record, loc, err = self._read_raw(pos)
        if err is None and not self.validate:
            err = check_record(record, self.required)
        if err is not None:
            # Only reachable with validate=False (or a file changed after opening).
            raise MalformedRecordError(f"{loc}: {reason_with_fix(err)}")
        out = dict(record)
        out["_loc"] = loc
        return out


def reason_with_fix(reason: str) -> str:
    """``reason`` followed by how to fix it."""
    return f"{reason}; {_fix_hint(reason)}"


def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Local paths of the input files; a file in a bucket (gs://...), such as a synth
    round's output in a bucket workdir, is downloaded first (sources memory-map files)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("no input files given; pass one path or a list of paths")
    for p in out:
        if not fileio.exists(p):
            raise FileNotFoundError(f"{p}: no such file; check the path")
    return [fileio.fetch(p) for p in out]


class JsonlSource(_ValidatedSource):
    """Records from one or more JSONL files (one JSON object per line).

    Lines are located by byte offset (memory-mapped), so only the good lines' offsets stay in
    memory; a record is parsed when it is read.

    Args:
      paths: A path or a list of paths, read in order.
      required: Fields every record must have (non-null, non-empty).
      strict: Raise on the first malformed line instead of skipping it.
      validate: Check every line on open (see the module docstring).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        required: Sequence[str] = (),
        strict: bool = False,
        validate: bool = True,
    ):
        self.paths = _as_paths(paths)
        super().__init__(",".join(self.paths), required, strict, validate)
        self._maps: list[mmap.mmap | None] = [None] * len(self.paths)
        spans = [self._line_spans(i) for i in range(len(self.paths))]
        self._file_of = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(spans)])
        self._spans = np.concatenate([s for s in spans]) if spans else np.zeros((0, 3), np.int64)
        self._setup()

    def _mmap(self, i: int) -> mmap.mmap | bytes:
        if self._maps[i] is None:
            with open(self.paths[i], "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                self._maps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[i]

    def _line_spans(self, i: int) -> np.ndarray:
        """[start, end, line_number] of every line of file i."""
        data = self._mmap(i)
        size = len(data)
        ends = []
        pos = data.find(b"\n")
        while pos != -1:
            ends.append(pos)
            pos = data.find(b"\n", pos + 1)
        if size and (not ends or ends[-1] != size - 1):
            ends.append(size)  # last line without a trailing newline
        ends_arr = np.asarray(ends, dtype=np.int64)
        starts = np.concatenate([[0], ends_arr[:-1] + 1]) if len(ends) else ends_arr
        lines = np.arange(1, len(ends) + 1, dtype=np.int64)
        return np.stack([starts, ends_arr, lines], axis=1).reshape(-1, 3)

    def _num_raw(self) -> int:
        return len(self._spans)

    def _read_raw(self, pos: int) -> tuple[Any, str, str | None]:
        fi = int(self._file_of[pos])
        start, end, line = (int(x) for x in self._spans[pos])
        loc = f"{self.paths[fi]}:{line}"
        raw = self._mmap(fi)[start:end]
        if not raw.strip():
            return None, loc, "blank line"
        try:
            return json.loads(raw), loc, None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, loc, f"broken JSON: {e}"

    def __getstate__(self) -> dict[str, Any]:
        # mmaps cannot be pickled (Grain worker processes); they reopen lazily.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.paths)
        return state


class ParquetSource(_ValidatedSource):
    """Records (rows) from one or more Parquet files, read with pyarrow.

    Args:
      paths: A path or a list of paths, read in order.
      columns: Columns to read (default: all).
      required: Columns every row must have non-null and non-empty.
      strict: Raise on the first malformed row instead of skipping it.
      validate: Check every row on open.

    Raises:
      ValueError: A required column is absent from a file's schema (every row would be
        dropped, so this is a configuration error, not a record error).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        columns: Sequence[str] | None = None,
        required: Sequence[str] = (),
        strict: bool = False,
        validate: bool = True,
    ):
        import pyarrow.parquet as pq

        self.paths = _as_paths(paths)
        super().__init__(",".join(self.paths), required, strict, validate)
        self._rows: list[tuple[int, int]] = []
        self._columns: list[dict[str, list[Any]]] = []
        for fi, path in enumerate(self.paths):
            table = pq.read_table(path, columns=list(columns) if columns else None)
            absent = [c for c in self.required if c not in table.column_names]
            if absent:
                raise ValueError(
                    f"{path}: required column(s) {absent} not in the file's columns "
                    f"{table.column_names}; fix the `required`/`columns` arguments or the file"
                )
            # Python lists make row reads O(1) and cheap (no per-row Arrow slicing).
            self._columns.append({c: table.column(c).to_pylist() for c in table.column_names})
            self._rows.extend((fi, r) for r in range(table.num_rows))
        self._setup()

    def _num_raw(self) -> int:
        return len(self._rows)

    def _read_raw(self, pos: int) -> tuple[Any, str, str | None]:
        fi, row = self._rows[pos]
        cols = self._columns[fi]
        return {c: v[row] for c, v in cols.items()}, f"{self.paths[fi]}[{row}]", None


def _decode_json_bytes(raw: bytes) -> Any:
    return json.loads(raw)


class ArrayRecordSource(_ValidatedSource):
    """Records from ArrayRecord files (each record one serialised JSON object by default).

    Reads through ``grain.sources.ArrayRecordDataSource``. Write such files with
    :func:`write_array_record`.

    Args:
      paths: A path or a list of paths (shards), read in order.
      required: Fields every record must have (non-null, non-empty).
      strict: Raise on the first malformed record instead of skipping it.
      validate: Check every record on open.
      decode: Turns a record's bytes into a dict (default: UTF-8 JSON).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        required: Sequence[str] = (),
        strict: bool = False,
        validate: bool = True,
        decode: Callable[[bytes], Any] = _decode_json_bytes,
    ):
        import grain

        self.paths = _as_paths(paths)
        super().__init__(",".join(self.paths), required, strict, validate)
        self._decode = decode
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        # Grain concatenates the shards; keep their boundaries to name file and record.
        self._starts = np.cumsum([0] + [_array_record_len(p) for p in self.paths])
        self._setup()

    def _num_raw(self) -> int:
        return len(self._source)

    def _read_raw(self, pos: int) -> tuple[Any, str, str | None]:
        fi = int(np.searchsorted(self._starts, pos, side="right") - 1)
        loc = f"{self.paths[fi]}[{pos - int(self._starts[fi])}]"
        try:
            return self._decode(self._source[pos]), loc, None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, loc, f"broken JSON: {e}"


def _array_record_len(path: str) -> int:
    from array_record.python import array_record_module as arm

    reader = arm.ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def write_array_record(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes ``records`` as UTF-8 JSON to one ArrayRecord file; returns how many.

    ``group_size:1`` makes single-record random access cheap, as Grain expects.
    """
    from array_record.python import array_record_module as arm

    writer = arm.ArrayRecordWriter(os.fspath(path), "group_size:1")
    n = 0
    try:
        for rec in records:
            writer.write(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
            n += 1
    finally:
        writer.close()
    return n


def _decode_tfds_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_decode_tfds_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class TfdsSource(_ValidatedSource):
    """Records from a prepared TFDS dataset through ``tfds.data_source`` (ArrayRecord format).

    Text features come back from TFDS as bytes; they are decoded to ``str``.

    Args:
      name: TFDS dataset name (optionally ``name/config:version``).
      split: Split, e.g. ``"train"`` or ``"train[:10%]"``.
      data_dir: Where the prepared dataset lives (no download is attempted).
      required: Fields every record must have (non-null, non-empty).
      strict: Raise on the first malformed record instead of skipping it.
      validate: Check every record on open.
    """

    def __init__(
        self,
        name: str,
        *,
        split: str,
        data_dir: str | os.PathLike | None = None,
        required: Sequence[str] = (),
        strict: bool = False,
        validate: bool = True,
    ):
        import tensorflow_datasets as tfds

        super().__init__(f"tfds:{name}/{split}", required, strict, validate)
        self._source = tfds.data_source(
            name, split=split, data_dir=os.fspath(data_dir) if data_dir else None, download=False
        )
        self._setup()

    def _num_raw(self) -> int:
        return len(self._source)

    def _read_raw(self, pos: int) -> tuple[Any, str, str | None]:
        raw = self._source[pos]
        record = {k: _decode_tfds_value(v) for k, v in raw.items()}
        return record, f"{self.report.source}[{pos}]", None


def open_source(spec: str | os.PathLike, **kwargs: Any) -> _ValidatedSource:
    """Opens a source by file extension (``.jsonl``, ``.parquet``, ``.array_record``) or
    ``tfds:NAME/SPLIT`` (pass ``data_dir=`` for TFDS). Extra kwargs go to the source class.
    """
    s = os.fspath(spec)
    if s.startswith("tfds:"):
        name, _, split = s[len("tfds:") :].rpartition("/")
        if not name or not split:
            raise ValueError(f"{s!r}: write a TFDS source as 'tfds:NAME/SPLIT'")
        return TfdsSource(name, split=split, **kwargs)
    if s.endswith((".jsonl", ".json")):
        return JsonlSource(s, **kwargs)
    if s.endswith(".parquet"):
        return ParquetSource(s, **kwargs)
    if ".array_record" in s:
        return ArrayRecordSource(s, **kwargs)
    raise ValueError(
        f"{s!r}: unknown source type; use a .jsonl, .parquet or .array_record file, "
        "or 'tfds:NAME/SPLIT'"
    )


# ---------------------------------------------------------------------------------------------
# Benchmark sets in ../shared/benchmarks


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed 5``) in ``text``.

    Braces are matched, so ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``. Returns None when
    there is no box or its braces never close.
    """
    starts = [m.start() for m in re.finditer(r"\\boxed|\\fbox", text)]
    for start in reversed(starts):
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        if text.startswith(" ", i):  # "\boxed 5": the answer runs to the next "$" or space
            m = re.match(r" +([^\s$]+)", text[i:])
            if m:
                return m.group(1)
            continue
        if not text.startswith("{", i):
            continue
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        return None
    return None


def _number_text(value: Any) -> str:
    # 27.0 -> "27" so that numeric golds from JSON floats read like the problem's answers.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _field(name: str) -> Callable[[Mapping[str, Any]], Any]:
    def get(r: Mapping[str, Any]) -> Any:
        return r[name]

    get.__name__ = f"field_{name}"
    return get


def _gsm8k_answer(r: Mapping[str, Any]) -> str:
    return r["answer"].split("####")[-1].strip()


def _boxed_solution(r: Mapping[str, Any]) -> str | None:
    return last_boxed(r["solution"])


def _strip_dollars(name: str) -> Callable[[Mapping[str, Any]], str]:
    def get(r: Mapping[str, Any]) -> str:
        return _number_text(r[name]).strip().strip("$").strip()

    return get


def _olympiad_answer(r: Mapping[str, Any]) -> str:
    return ", ".join(str(a).strip().strip("$").strip() for a in r["final_answer"])


def _olympiad_solution(r: Mapping[str, Any]) -> str:
    return "\n\n".join(r["solution"])


def _svamp_question(r: Mapping[str, Any]) -> str:
    body = r["Body"].strip()
    if not body.endswith("."):
        body += "."
    return f"{body} {r['Question'].strip()}"


def _asdiv_question(r: Mapping[str, Any]) -> str:
    return f"{r['body'].strip()} {r['question'].strip()}"


def _asdiv_answer(r: Mapping[str, Any]) -> str:
    # "9 (apples)" -> "9": the unit in parentheses is not part of the gold answer.
    return re.sub(r"\(.*?\)", "", str(r["answer"])).strip()


def _mmlu_question(r: Mapping[str, Any]) -> str:
    choices = " ".join(f"({label}) {str(c).strip()}" for label, c in zip("ABCD", r["choices"]))
    return f"{r['question'].strip()}\nAnswer Choices: {choices}"


def _mmlu_answer(r: Mapping[str, Any]) -> str:
    return "ABCD"[int(r["answer"])]


def _gaokao2024_answer(r: Mapping[str, Any]) -> str:
    # Multiple-choice rows carry the letter in choice_answer; the rest have it empty.
    return r.get("choice_answer") or r["answer"]


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark file.

    Attributes:
      path: JSONL file relative to the benchmarks root.
      question: Field name, or a function of the record, giving the question text.
      answer: Field name, or a function of the record, giving the gold answer.
      solution: Field name, or a function, giving a worked solution; None when there is none.
      required: Fields a record must have to be read (the rest are skipped and reported).
    """

    path: str
    question: str | Callable[[Mapping[str, Any]], str]
    answer: str | Callable[[Mapping[str, Any]], Any]
    solution: str | Callable[[Mapping[str, Any]], str] | None
    required: tuple[str, ...]

    def get(self, what: str, record: Mapping[str, Any]) -> Any:
        """Applies the mapping for ``what`` (question / answer / solution) to ``record``."""
        how = getattr(self, what)
        if how is None:
            return None
        return record[how] if isinstance(how, str) else how(record)


def _spec(path, question, answer, solution=None, required=None) -> BenchmarkSpec:
    if required is None:
        required = tuple(x for x in (question, answer, solution) if isinstance(x, str))
    return BenchmarkSpec(path, question, answer, solution, tuple(required))


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "gsm8k": _spec("gsm8k/test.jsonl", "question", _gsm8k_answer, "answer"),
    "gsm8k_train": _spec("gsm8k/train.jsonl", "question", _gsm8k_answer, "answer"),
    "math": _spec("math/test.jsonl", "problem", _boxed_solution, "solution"),
    "math_train": _spec("math/train.jsonl", "problem", _boxed_solution, "solution"),
    "math500": _spec("math500/test.jsonl", "problem", "answer", "solution"),
    "minerva_math": _spec("minerva_math/test.jsonl", "problem", _boxed_solution, "solution"),
    "gaokao2023en": _spec(
        "gaokao2023en/test.jsonl",
        "question",
        _strip_dollars("answer"),
        None,
        ("question", "answer"),
    ),
    "olympiadbench": _spec(
        "olympiadbench/test.jsonl",
        "question",
        _olympiad_answer,
        _olympiad_solution,
        ("question", "final_answer"),
    ),
    "college_math": _spec(
        "college_math/test.jsonl",
        "question",
        _strip_dollars("answer"),
        None,
        ("question", "answer"),
    ),
    "aime24": _spec("aime24/test.jsonl", "problem", _strip_dollars("answer"), "solution"),
    "amc23": _spec(
        "amc23/test.jsonl", "question", _strip_dollars("answer"), None, ("question", "answer")
    ),
    "mmlu_stem": _spec(
        "mmlu_stem/test.jsonl",
        _mmlu_question,
        _mmlu_answer,
        None,
        ("question", "choices", "answer"),
    ),
    "cmath": _spec("cmath/test.jsonl", "question", _strip_dollars("answer")),
    "gaokao2024_mix": _spec(
        "gaokao2024_mix/test.jsonl", "question", _gaokao2024_answer, None, ("question", "answer")
    ),
    "svamp": _spec(
        "svamp/test.jsonl",
        _svamp_question,
        _strip_dollars("Answer"),
        None,
        ("Body", "Question", "Answer"),
    ),
    "asdiv": _spec(
        "asdiv/test.jsonl", _asdiv_question, _asdiv_answer, None, ("body", "question", "answer")
    ),
    "rm_maj_example": _spec("eval_rm_maj_example/math_cot_100.jsonl", "question", "gt", "gt_cot"),
}

BENCHMARKS_ENV = "QMATH_BENCHMARKS"


def benchmarks_root(root: str | os.PathLike | None = None) -> Path:
    """The benchmark directory: ``root``, else ``$QMATH_BENCHMARKS``, else ``../shared/benchmarks``
    beside the repository checkout."""
    if root is None:
        root = os.environ.get(BENCHMARKS_ENV) or (
            Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
        )
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"benchmark directory {path} not found; pass root= or set ${BENCHMARKS_ENV}"
        )
    return path


def load_benchmark(
    name: str, root: str | os.PathLike | None = None, *, strict: bool = False
) -> list[dict[str, Any]]:
    """Loads a benchmark set as ``[{idx, question, answer, solution, loc}]``.

    ``idx`` is the record's position among the kept records; ``loc`` is ``file:line``.
    Records whose required fields are missing or empty, or whose gold answer cannot be
    extracted (e.g. no ``\\boxed{}`` in a MATH solution), are skipped and reported
    (``strict=True`` raises instead), per the module's malformed-input policy.

    Args:
      name: A key of :data:`BENCHMARKS`.
      root: The benchmarks directory (see :func:`benchmarks_root`).
      strict: Raise on the first malformed record.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    src = JsonlSource(benchmarks_root(root) / spec.path, required=spec.required, strict=strict)
    out = []
    for i in range(len(src)):
        rec = src[i]
        answer = spec.get("answer", rec)
        if answer is None or not str(answer).strip():
            reason = "no gold answer could be extracted"
            if strict:
                raise MalformedRecordError(f"{rec['_loc']}: {reason}; fix the record")
            src.report.add_problem(rec["_loc"], reason)
            src.report.kept -= 1
            continue
        out.append(
            {
                "idx": len(out),
                "question": spec.get("question", rec),
                "answer": _number_text(answer),
                "solution": spec.get("solution", rec),
                "loc": rec["_loc"],
            }
        )
    return out
