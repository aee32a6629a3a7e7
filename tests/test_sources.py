"""Sources: JSONL / Parquet / ArrayRecord / TFDS readers, malformed-input policy, benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmath_jax.data import sources as S

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


MIXED_LINES = [
    json.dumps({"text": "one", "id": 1}),
    '{"text": "broken", ',  # line 2: broken JSON
    json.dumps({"id": 3}),  # line 3: missing field
    json.dumps({"text": "   ", "id": 4}),  # line 4: empty text
    "",  # line 5: blank line
    json.dumps(["not", "an", "object"]),  # line 6
    json.dumps({"text": "seven", "id": 7}),
]


def test_jsonl_skips_and_reports_malformed_lines(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "mixed.jsonl", MIXED_LINES)
    src = S.JsonlSource(path, required=["text"])
    assert len(src) == 2
    assert [src[i]["text"] for i in range(len(src))] == ["one", "seven"]
    assert src[1]["_loc"] == f"{path}:7"
    rep = src.report
    assert (rep.total, rep.kept, rep.num_skipped) == (7, 2, 5)
    assert dict(rep.skipped) == {
        "broken JSON": 1,
        "missing field 'text'": 1,
        "empty field 'text'": 1,
        "blank line": 1,
        "not a JSON object": 1,
    }
    assert [loc for loc, _ in rep.problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert f"{path}:2" in caplog.text and "broken JSON" in caplog.text
    assert "kept 2 of 7" in rep.summary()
    json.dumps(rep.to_json())
    with pytest.raises(IndexError):
        src[2]


def test_jsonl_strict_raises_with_file_line_and_fix(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", MIXED_LINES)
    with pytest.raises(S.MalformedRecordError, match=rf"{path}:2: broken JSON.*fix"):
        S.JsonlSource(path, required=["text"], strict=True)
    good = _write_jsonl(tmp_path / "good.jsonl", [MIXED_LINES[0], MIXED_LINES[3]])
    with pytest.raises(S.MalformedRecordError, match=rf"{good}:2: empty field 'text'"):
        S.JsonlSource(good, required=["text"], strict=True)


def test_jsonl_lazy_validation_raises_on_read(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", MIXED_LINES[:3])
    src = S.JsonlSource(path, required=["text"], validate=False)
    assert len(src) == 3 and src[0]["text"] == "one"
    with pytest.raises(S.MalformedRecordError, match=rf"{path}:2: broken JSON"):
        src[1]


def test_jsonl_several_files_and_no_trailing_newline(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "a1"})])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": "b1"}) + "\n" + json.dumps({"text": "b2"}))
    src = S.JsonlSource([a, b], required=["text"])
    assert [src[i]["text"] for i in range(3)] == ["a1", "b1", "b2"]
    assert src[2]["_loc"] == f"{b}:2"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        S.JsonlSource(tmp_path / "nope.jsonl")


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"text": ["alpha", None, "", "delta"], "n": [1, 2, 3, 4]})
    pq.write_table(table, path)
    src = S.ParquetSource(path, required=["text"])
    assert len(src) == 2
    assert src[1] == {"text": "delta", "n": 4, "_loc": f"{path}[3]"}
    assert dict(src.report.skipped) == {"missing field 'text'": 1, "empty field 'text'": 1}
    assert [loc for loc, _ in src.report.problems] == [f"{path}[1]", f"{path}[2]"]
    with pytest.raises(ValueError, match="required column"):
        S.ParquetSource(path, required=["question"])


def test_array_record_source(tmp_path):
    from array_record.python import array_record_module as arm

    path = tmp_path / "d.array_record"
    n = S.write_array_record(path, [{"text": f"r{i}", "i": i} for i in range(5)])
    assert n == 5
    src = S.ArrayRecordSource(path, required=["text"])
    assert len(src) == 5 and src[3]["text"] == "r3" and src[3]["_loc"] == f"{path}[3]"

    # A second shard with a corrupt record and a record missing the field.
    bad = tmp_path / "bad.array_record"
    writer = arm.ArrayRecordWriter(str(bad), "group_size:1")
    for raw in (b'{"text": "ok"}', b"{not json", b'{"other": 1}'):
        writer.write(raw)
    writer.close()
    both = S.ArrayRecordSource([path, bad], required=["text"])
    assert len(both) == 6 and both[5]["text"] == "ok"
    assert [loc for loc, _ in both.report.problems] == [f"{bad}[1]", f"{bad}[2]"]
    assert S.open_source(path, required=["text"])[0]["text"] == "r0"


def test_tfds_source_from_a_locally_built_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyMathProblems(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"question": tfds.features.Text(), "answer": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"question": f"What is {i}+{i}?", "answer": "" if i == 4 else str(2 * i)}

    TinyMathProblems(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = S.open_source("tfds:tiny_math_problems/train", data_dir=tmp_path, required=["answer"])
    assert isinstance(src, S.TfdsSource)
    assert len(src) == 5 and src.report.skipped == {"empty field 'answer'": 1}
    got = sorted((src[i]["question"], src[i]["answer"]) for i in range(len(src)))
    assert got == sorted((f"What is {i}+{i}?", str(2 * i)) for i in range(6) if i != 4)
    assert src[0]["_loc"].startswith("tfds:tiny_math_problems/train[")


def test_open_source_rejects_unknown_types(tmp_path):
    with pytest.raises(ValueError, match="unknown source type"):
        S.open_source(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="tfds:NAME/SPLIT"):
        S.open_source("tfds:noslash")


@pytest.mark.parametrize(
    "text, boxed",
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{x^{2}+\{y\}}", r"x^{2}+\{y\}"),
        (r"answer \boxed 5$", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{unclosed", None),
        ("no box", None),
        (r"\boxed{}", ""),
    ],
)
def test_last_boxed(text, boxed):
    assert S.last_boxed(text) == boxed


def _lines(rel: str) -> int:
    with open(BENCH / rel) as f:
        return sum(1 for _ in f)


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks not present")
@pytest.mark.parametrize("name", sorted(S.BENCHMARKS))
def test_every_benchmark_loads_with_all_rows_accounted(name):
    rows = S.load_benchmark(name, BENCH)
    spec = S.BENCHMARKS[name]
    total = _lines(spec.path)
    assert 0 < len(rows) <= total
    assert [r["idx"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert isinstance(r["question"], str) and r["question"].strip()
        assert isinstance(r["answer"], str) and r["answer"].strip()
    # Rows the loader skipped are exactly the ones with an empty gold, never silently lost.
    skipped = total - len(rows)
    with open(BENCH / spec.path) as f:
        raw = [json.loads(line) for line in f]
    empty = 0
    for rec in raw:
        no_field = any(rec.get(k) in (None, "", []) for k in spec.required)
        if no_field or spec.get("answer", rec) in (None, ""):
            empty += 1
    assert skipped == empty


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks not present")
def test_benchmark_field_mappings_against_the_files():
    gsm = S.load_benchmark("gsm8k", BENCH)
    assert gsm[0]["answer"] == "18"  # "... #### 18" in the README and the file
    assert gsm[0]["question"].startswith("Janet")
    math = S.load_benchmark("math", BENCH)
    assert math[0]["answer"] == "2" and r"\boxed{2}" in math[0]["solution"]
    mmlu = S.load_benchmark("mmlu_stem", BENCH)
    assert mmlu[0]["answer"] == "C"  # "answer": 2 -> third choice
    assert "Answer Choices: (A) maintain" in mmlu[0]["question"]
    svamp = S.load_benchmark("svamp", BENCH)
    assert svamp[0]["answer"] == "145"
    assert svamp[0]["question"].endswith(". How big is each group of bananas?")
    assert S.load_benchmark("asdiv", BENCH)[0]["answer"] == "9"  # "9 (apples)"
    assert S.load_benchmark("amc23", BENCH)[0]["answer"] == "27"  # 27.0
    assert S.load_benchmark("gaokao2024_mix", BENCH)[0]["answer"] == "C"
    assert S.load_benchmark("college_math", BENCH)[0]["answer"] == "10-4 n"
    olymp = S.load_benchmark("olympiadbench", BENCH)
    assert olymp[1]["answer"] == r"\frac{1}{2 n+2}"


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks not present")
def test_math_train_rows_without_a_gold_are_reported_with_their_line(caplog):
    rows = S.load_benchmark("math_train", BENCH)
    assert len(rows) == 7498
    assert f"{BENCH / 'math/train.jsonl'}:5530" in caplog.text
    with pytest.raises(S.MalformedRecordError, match=r"train.jsonl:5530: no gold answer"):
        S.load_benchmark("math_train", BENCH, strict=True)


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown benchmark"):
        S.load_benchmark("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="QMATH_BENCHMARKS"):
        S.load_benchmark("gsm8k", tmp_path / "missing")
