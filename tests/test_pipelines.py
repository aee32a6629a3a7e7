"""Grain pipelines: packing, SFT masks, RM groups, RL batches, resume, sharding, bad input."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest

from qmath_jax.data import pipelines as P
from qmath_jax.data.packing import pipeline_report
from qmath_jax.data.sources import JsonlSource


class ByteTokenizer:
    """One token per UTF-8 byte; 256 = eos, 257 = pad. Independent of the project's tokenizer."""

    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


TOK = ByteTokenizer()
ONE_SHARD = {"shard_index": 0, "shard_count": 1}


def _docs(n: int, seed: int = 0, max_len: int = 40) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"text": "".join(rng.choices(string.ascii_letters, k=rng.randint(1, max_len)))}
        for _ in range(n)
    ]


def _all(ds) -> list[dict]:
    return list(iter(ds))


def _segments(row: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, targets) of each segment of a packed row, checking the row's layout."""
    seg, pos = row["segment_ids"], row["positions"]
    n = int(seg.max())
    assert set(np.unique(seg)) <= set(range(n + 1))
    out = []
    for s in range(1, n + 1):
        idx = np.nonzero(seg == s)[0]
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
        assert np.array_equal(pos[idx], np.arange(len(idx)))  # positions restart at 0
        # Next-token targets within the segment.
        assert np.array_equal(row["targets"][idx[:-1]], row["tokens"][idx[1:]])
        out.append((row["tokens"][idx], row["targets"][idx]))
    pad = seg == 0
    assert np.all(row["loss_mask"][pad] == 0) and np.all(row["tokens"][pad] == TOK.pad_id)
    assert np.all(pad[np.argmax(pad) :]) if pad.any() else True  # padding only at the end
    return out


def test_pretrain_packing_loses_and_duplicates_nothing():
    docs = _docs(60, max_len=50)
    T = 16
    ds = P.pretrain_dataset(
        docs, TOK, seq_len=T, batch_size=1, num_epochs=1, shuffle=False, **ONE_SHARD
    )
    it = iter(ds)
    got = []
    for batch in it:
        assert batch["tokens"].shape == (1, T) and batch["tokens"].dtype == np.int32
        row = {k: v[0] for k, v in batch.items()}
        assert np.array_equal(row["loss_mask"], (row["segment_ids"] > 0).astype(np.int32))
        got += [tuple(np.concatenate([t, g[-1:]])) for t, g in _segments(row)]
    # Expected by hand: bytes + eos, split into chunks of T (input, target) pairs.
    want = []
    for d in docs:
        ids = list(d["text"].encode()) + [TOK.eos_id]
        for s in range(0, len(ids) - 1, T):
            want.append(tuple(ids[s : s + T + 1]))
    assert sorted(got) == sorted(want)
    rep = pipeline_report(it)["counts"]
    assert rep["documents"] == 60
    assert rep["tokens"] == sum(len(d["text"].encode()) for d in docs)
    assert rep["too_long_split"] == sum(len(d["text"]) > T for d in docs)


def test_pretrain_truncate_and_drop_policies():
    docs = [{"text": "a" * 5}, {"text": "b" * 30}, {"text": "c" * 3}]
    kw = dict(seq_len=8, batch_size=1, num_epochs=1, shuffle=False, **ONE_SHARD)
    it = iter(P.pretrain_dataset(docs, TOK, too_long="truncate", **kw))
    rows = [b for b in it]
    seqs = sorted(tuple(t) for r in rows for t, _ in _segments({k: v[0] for k, v in r.items()}))
    assert seqs == sorted([(97,) * 5, (98,) * 8, (99,) * 3])
    counts = pipeline_report(it)["counts"]
    assert (
        counts["too_long_truncated"] == 1 and counts["truncated_tokens"] == 30 - 8
    )  # 31 ids = 30 pairs
    it = iter(P.pretrain_dataset(docs, TOK, too_long="drop", **kw))
    seqs = [tuple(t) for r in it for t, _ in _segments({k: v[0] for k, v in r.items()})]
    assert sorted(seqs) == sorted([(97,) * 5, (99,) * 3])
    assert pipeline_report(it)["problems"] == [["too_long_dropped", "source0[1]"]]


def test_pretrain_mixes_weighted_sources():
    a = [{"text": "A" * 3} for _ in range(200)]
    b = [{"text": "B" * 3} for _ in range(200)]
    ds = P.pretrain_dataset(
        {"a": a, "b": b}, TOK, weights={"a": 3, "b": 1}, seq_len=32, batch_size=4, **ONE_SHARD
    )
    it = iter(ds)
    toks = np.concatenate([next(it)["tokens"].ravel() for _ in range(10)])
    n_a, n_b = int((toks == ord("A")).sum()), int((toks == ord("B")).sum())
    assert abs(n_a / (n_a + n_b) - 0.75) < 0.03


def _resume_check(make, n_total: int, n_first: int) -> None:
    straight = []
    it = iter(make())
    for _ in range(n_total):
        straight.append(next(it))
    report_straight = pipeline_report(it)

    it = iter(make())
    for _ in range(n_first):
        next(it)
    blob = json.dumps(it.get_state()).encode()  # what goes into the checkpoint
    del it
    resumed = iter(make())
    resumed.set_state(json.loads(blob.decode()))
    rest = [next(resumed) for _ in range(n_total - n_first)]
    for want, got in zip(straight[n_first:], rest):
        assert want.keys() == got.keys()
        for k in want:
            if isinstance(want[k], np.ndarray):
                np.testing.assert_array_equal(want[k], got[k], err_msg=k)
            else:
                assert want[k] == got[k], k
    assert pipeline_report(resumed) == report_straight


def test_pretrain_resume_is_exact():
    docs_a, docs_b = _docs(150, seed=1, max_len=60), _docs(90, seed=2, max_len=20)

    def make():
        return P.pretrain_dataset(
            {"a": docs_a, "b": docs_b},
            TOK,
            weights=[0.7, 0.3],
            seq_len=24,
            batch_size=2,
            seed=5,
            tokenize_batch=7,
            **ONE_SHARD,
        )

    _resume_check(make, 100, 50)


def test_pipelines_are_deterministic_in_the_seed():
    docs = _docs(50)

    def first(seed):
        it = iter(P.pretrain_dataset(docs, TOK, seq_len=16, batch_size=2, seed=seed, **ONE_SHARD))
        return next(it)["tokens"]

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


def test_sharding_gives_disjoint_covering_shards():
    records = [{"question": f"q{i}", "answer": str(i), "idx": i} for i in range(23)]
    seen = []
    for shard in range(3):
        ds = P.rl_dataset(
            records,
            TOK,
            batch_size=1,
            max_prompt_len=16,
            prompt_fn=lambda r: r["question"],
            num_epochs=1,
            shard_index=shard,
            shard_count=3,
        )
        seen.append([b["ids"][0] for b in ds])
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(23))  # covering, each once: disjoint
    assert [len(s) for s in seen] == [8, 8, 7]
    with pytest.raises(ValueError, match="both shard_index and shard_count"):
        P.rl_dataset(records, TOK, batch_size=1, max_prompt_len=8, shard_index=0)


def _simple_format(record):
    return f"Q: {record['question']}\nA: ", record["response"]


TIR_RESPONSE = (
    "Compute it.\n```python\nprint(2+3)\n```\n```output\n5\n```\n"
    "Check.\n```python\nprint(5*1)\n```\n```output\n5\n```\nSo \\boxed{5}."
)


def test_tir_output_spans_cover_exactly_the_interpreter_text():
    spans = P.tir_output_spans(TIR_RESPONSE)
    assert [TIR_RESPONSE[a:b] for a, b in spans] == ["\n5\n```\n", "\n5\n```\n"]
    assert P.tir_output_spans("x ```output\n12") == [(11, 14)]  # unclosed: to the end


def test_sft_loss_mask_is_exactly_the_response_without_output_blocks():
    records = [
        {"question": "2+3?", "response": TIR_RESPONSE},
        {"question": "1+1?", "response": "It is \\boxed{2}."},
    ]
    ds = P.sft_dataset(
        records,
        TOK,
        format_fn=_simple_format,
        seq_len=256,
        batch_size=1,
        num_epochs=1,
        shuffle=False,
        **ONE_SHARD,
    )
    rows = [{k: v[0] for k, v in b.items()} for b in ds]
    assert len(rows) == 1  # both fit one row
    row = rows[0]
    segs = _segments(row)
    assert len(segs) == 2
    for s, rec in zip((1, 2), records):
        idx = row["segment_ids"] == s
        prompt, response = _simple_format(rec)
        # Whole segment is the prompt + response bytes.
        full = bytes(np.append(row["tokens"][idx], row["targets"][idx][-1]).tolist()).decode()
        assert full == prompt + response
        # Trained targets, by hand: the response minus the interpreter's output text.
        trained = bytes(row["targets"][idx][row["loss_mask"][idx] == 1].tolist()).decode()
        expected = response.replace("```output\n5\n```\n", "```output")
        assert trained == expected
    assert np.all(row["loss_mask"][row["segment_ids"] == 0] == 0)


def test_sft_mixes_cot_and_tir_with_the_chat_format():
    chat = pytest.importorskip("qmath_jax.data.chat")
    base = [
        {"question": f"What is {i}+{i}?", "cot": f"{2 * i}", "tir": TIR_RESPONSE} for i in range(8)
    ]
    cot = P.with_fields(base, question="question", response="cot", mode=lambda r: "cot")
    tir = P.with_fields(base, question="question", response="tir", mode=lambda r: "tir")
    ds = P.sft_dataset({"cot": cot, "tir": tir}, TOK, seq_len=512, batch_size=2, **ONE_SHARD)
    batch = next(iter(ds))
    modes = set()
    for b in range(2):
        row = {k: v[b] for k, v in batch.items()}
        for s in range(1, int(row["segment_ids"].max()) + 1):
            idx = row["segment_ids"] == s
            text = bytes(np.append(row["tokens"][idx], row["targets"][idx][-1]).tolist()).decode()
            mode = "tir" if chat.TIR_SYSTEM in text else "cot"
            modes.add(mode)
            question = text.split("<|im_start|>user\n")[1].split(chat.IM_END)[0]
            prompt = chat.format_prompt(question, mode)
            assert text.startswith(prompt)
            trained = bytes(row["targets"][idx][row["loss_mask"][idx] == 1].tolist()).decode()
            assert trained == text[len(prompt) :].replace("```output\n5\n```\n", "```output")
            assert trained.endswith(chat.IM_END + "\n")
    assert modes == {"cot", "tir"}


def test_sft_resume_is_exact():
    base = [{"question": f"q{i}", "response": f"r{i} " * (i % 7 + 1)} for i in range(40)]

    def make():
        return P.sft_dataset(
            base, TOK, format_fn=_simple_format, seq_len=48, batch_size=2, seed=1, **ONE_SHARD
        )

    _resume_check(make, 30, 13)


def _rm_records():
    out = []
    for i in range(12):
        labels = [1, 0, 1, 0, 0, 1]
        if i == 3:
            labels = [1] * 6
        if i == 5:
            labels = [0] * 6
        responses = [f"ans{i}-{j}" + "x" * j for j in range(6)]
        out.append({"question": f"q{i}", "responses": responses, "labels": labels})
    out.append({"question": "short group", "responses": ["a", "b"], "labels": [1, 0]})
    return out


def test_rm_groups():
    recs = _rm_records()
    ds = P.rm_dataset(
        recs,
        TOK,
        format_fn=_simple_format,
        seq_len=32,
        batch_size=2,
        num_epochs=1,
        shuffle=False,
        **ONE_SHARD,
    )
    it = iter(ds)
    batches = list(it)
    assert len(batches) == 5  # 10 usable groups
    b = batches[0]
    assert b["tokens"].shape == (2, 6, 32) and b["last_index"].shape == (2, 6)
    np.testing.assert_array_equal(b["labels"][0], [1, 0, 1, 0, 0, 1])
    for j in range(6):
        prompt, response = _simple_format({"question": "q0", "response": f"ans0-{j}" + "x" * j})
        ids = list((prompt + response).encode())
        n = len(ids)
        assert b["last_index"][0, j] == n - 1
        np.testing.assert_array_equal(b["tokens"][0, j, :n], ids)
        assert np.all(b["tokens"][0, j, n:] == TOK.pad_id)
        np.testing.assert_array_equal(b["segment_ids"][0, j], (np.arange(32) < n).astype(int))
        np.testing.assert_array_equal(b["positions"][0, j, :n], np.arange(n))
    questions = [bytes(t[0, :6].tolist()) for bb in batches for t in bb["tokens"]]
    assert b"Q: q3\n" not in questions and b"Q: q5\n" not in questions
    rep = pipeline_report(it)
    assert rep["counts"]["all_correct"] == 1 and rep["counts"]["all_wrong"] == 1
    assert rep["counts"]["groups"] == 10
    assert rep["problems"] == [["wrong_group_size", "source0[12]"]]


def test_rm_resume_is_exact():
    recs = _rm_records()

    def make():
        return P.rm_dataset(
            recs, TOK, format_fn=_simple_format, seq_len=32, batch_size=3, seed=2, **ONE_SHARD
        )

    _resume_check(make, 12, 5)


def test_rm_groups_render_each_record_in_its_sampling_mode():
    """A TIR group is rendered under the TIR system prompt (as the RM scores it later in
    GRPO, synth and eval), a record without `mode` under the CoT one."""
    from qmath_jax.data.chat import COT_SYSTEM, TIR_SYSTEM

    recs = [dict(r, mode=m) for r, m in zip(_rm_records()[:2], ("tir", None))]
    del recs[1]["mode"]
    ds = P.rm_dataset(recs, TOK, seq_len=400, batch_size=2, num_epochs=1, shuffle=False,
                      **ONE_SHARD)
    (batch,) = list(ds)
    text = [bytes(row[row < 256].tolist()).decode() for row in batch["tokens"][:, 0]]
    assert TIR_SYSTEM in text[0] and COT_SYSTEM not in text[0]
    assert COT_SYSTEM in text[1] and TIR_SYSTEM not in text[1]


def test_rl_batches():
    recs = [{"question": "q" * (i + 1), "answer": str(i), "idx": i} for i in range(6)]
    recs.append({"question": "q" * 50, "answer": "long", "idx": 99})
    ds = P.rl_dataset(
        recs,
        TOK,
        batch_size=3,
        max_prompt_len=8,
        samples_per_prompt=2,
        prompt_fn=lambda r: r["question"],
        num_epochs=1,
        shuffle=False,
        **ONE_SHARD,
    )
    it = iter(ds)
    b = next(it)
    assert b["prompt_tokens"].shape == (6, 8)
    assert b["ids"] == [0, 0, 1, 1, 2, 2] and b["answers"] == ["0", "0", "1", "1", "2", "2"]
    np.testing.assert_array_equal(b["prompt_lengths"], [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(b["prompt_tokens"][2], [TOK.pad_id] * 6 + [ord("q")] * 2)
    assert b["prompt_ids"][4] == [ord("q")] * 3
    rest = list(it)
    assert len(rest) == 1 and rest[0]["ids"][::2] == [3, 4, 5]
    assert pipeline_report(it)["problems"] == [["too_long_dropped", "source0[6]"]]


def test_malformed_input_is_counted_and_reported_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"text": "good one"}),
        '{"text": "broken',
        json.dumps({"title": "no text"}),
        json.dumps({"text": ""}),
        json.dumps({"text": "z" * 100}),  # longer than the row
        json.dumps({"text": "good two"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    src = JsonlSource(path, required=["text"])
    assert [loc for loc, _ in src.report.problems] == [f"{path}:{i}" for i in (2, 3, 4)]
    kw = dict(seq_len=32, batch_size=1, num_epochs=1, shuffle=False, **ONE_SHARD)
    it = iter(P.pretrain_dataset(src, TOK, too_long="drop", **kw))
    texts = sorted(
        bytes(t.tolist()).decode()
        for b in it
        for t, _ in _segments({k: v[0] for k, v in b.items()})
    )
    assert texts == ["good one", "good two"]
    rep = pipeline_report(it)
    assert rep["problems"] == [["too_long_dropped", f"{path}:5"]]
    assert f"too_long_dropped at {path}:5" in caplog.text
    with pytest.raises(ValueError, match=rf"{path}:5: too_long; fix: raise seq_len"):
        list(P.pretrain_dataset(src, TOK, too_long="error", **kw))
    # Raw records without a source report: missing / empty text counted by the pipeline.
    raw = [{"text": "ok"}, {"title": "x"}, {"text": "  "}]
    it = iter(P.pretrain_dataset(raw, TOK, **kw))
    list(it)
    assert pipeline_report(it)["problems"] == [
        ["missing_text", "source0[1]"],
        ["empty_text", "source0[2]"],
    ]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="too_long="):
        P.pretrain_dataset([{"text": "a"}], TOK, seq_len=8, batch_size=1, too_long="x", **ONE_SHARD)
    with pytest.raises(ValueError, match="too_long="):
        P.sft_dataset(
            [{"question": "a"}], TOK, seq_len=8, batch_size=1, too_long="split", **ONE_SHARD
        )
    with pytest.raises(ValueError, match="weights keys"):
        P.pretrain_dataset(
            {"a": [{"text": "a"}]}, TOK, weights={"b": 1}, seq_len=8, batch_size=1, **ONE_SHARD
        )
    with pytest.raises(ValueError, match="no records for shard 3"):
        P.pretrain_dataset(
            [{"text": "a"}] * 3, TOK, seq_len=8, batch_size=1, shard_index=3, shard_count=4
        )


BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/benchmarks not present")
def test_with_the_project_tokenizer_on_benchmark_text(tmp_path):
    tok_mod = pytest.importorskip("qmath_jax.data.tokenizer")
    from qmath_jax.data.sources import load_benchmark

    rows = load_benchmark("gsm8k", BENCH)[:200]
    tok = tok_mod.train_bpe_tokenizer([r["question"] + r["solution"] for r in rows], 400)
    docs = [{"text": r["question"] + "\n" + r["solution"]} for r in rows]
    ds = P.pretrain_dataset(docs, tok, seq_len=128, batch_size=2, num_epochs=1, **ONE_SHARD)
    it = iter(ds)
    batch = next(it)
    row = {k: v[0] for k, v in batch.items()}
    seg = row["segment_ids"] == 1
    text = tok.decode(np.append(row["tokens"][seg], row["targets"][seg][-1]).tolist())
    assert any(text.startswith(d["text"][:40]) for d in docs)
    recs = [{"question": r["question"], "answer": r["answer"], "idx": r["idx"]} for r in rows]
    rl = next(iter(P.rl_dataset(recs, tok, batch_size=4, max_prompt_len=256, **ONE_SHARD)))
    assert rl["prompt_tokens"].shape == (4, 256)
    assert tok.decode(rl["prompt_ids"][0]).endswith("<|im_start|>assistant\n")


def test_sft_on_the_synthetic_corpus_with_the_project_tokenizer():
    tok_mod = pytest.importorskip("qmath_jax.data.tokenizer")
    synthetic = pytest.importorskip("qmath_jax.data.synthetic")
    chat = pytest.importorskip("qmath_jax.data.chat")
    synth = synthetic.SyntheticMath(0)
    base = [synth[i] for i in range(64)]
    tok = tok_mod.train_bpe_tokenizer(
        [synth.pretrain_document(i) for i in range(100)] + [r["tir"] for r in base], 500
    )
    cot = P.with_fields(base, question="question", response="cot", mode=lambda r: "cot")
    tir = P.with_fields(base, question="question", response="tir", mode=lambda r: "tir")
    ds = P.sft_dataset({"cot": cot, "tir": tir}, tok, seq_len=512, batch_size=4, **ONE_SHARD)
    by_question = {r["question"]: r for r in base}
    batch = next(iter(ds))
    n_tir = 0
    for b in range(4):
        row = {k: v[b] for k, v in batch.items()}
        for s in range(1, int(row["segment_ids"].max()) + 1):
            idx = row["segment_ids"] == s
            text = tok.decode(np.append(row["tokens"][idx], row["targets"][idx][-1]).tolist())
            mode = "tir" if chat.TIR_SYSTEM in text else "cot"
            question = text.split("<|im_start|>user\n")[1].split(chat.IM_END)[0]
            prompt, target = chat.format_sft(question, by_question[question][mode], mode)
            assert text == prompt + target
            trained = tok.decode(row["targets"][idx][row["loss_mask"][idx] == 1].tolist())
            want = target
            for start, end in reversed(P.tir_output_spans(target)):
                want = want[:start] + want[end:]
            assert trained == want
            n_tir += mode == "tir"
            if mode == "tir":
                answer = by_question[question]["answer"]
                assert f"```output\n{answer}\n```" in text  # the interpreter's block
                assert f"```output\n{answer}" not in trained  # carries no loss,
                assert trained.count("```output") == text.count("```output")  # its fence does
    assert n_tir > 0
