"""The eval stage: metrics against hand computations and a real reference set, then the
stage end to end on a tiny random HF model (CoT and TIR, greedy and k samples, an RM),
checked against PyTorch greedy decoding, and interrupt-resume."""

import collections
import importlib
import json
import operator
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_peer import tiny_qwen2

from qmath_jax.data import chat
from qmath_jax.data.sources import load_benchmark
from qmath_jax.grading import extract_answer, is_equiv
from qmath_jax.model import Transformer, get_preset, init_params
from qmath_jax.run_config import base
from qmath_jax.sampling import sampler
from qmath_jax.stages import common, evaluate
from qmath_jax.train.checkpoint import save_params

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
REFERENCE = BENCHMARKS / "eval_rm_maj_example" / "math_cot_100.jsonl"


def _rows(answers, correct, scores=None, idx=0, kind="sampled", name="s", mode="cot"):
    scores = scores or [None] * len(answers)
    return [
        {
            "set": name,
            "idx": idx,
            "mode": mode,
            "kind": kind,
            "sample": s,
            "answer": a,
            "correct": c,
            "rm_score": r,
        }
        for s, (a, c, r) in enumerate(zip(answers, correct, scores))
    ]


def _hand_rows():
    rows = []
    # p0: a 2-2 tie between "1" (first) and "2": the earlier class wins, and it is wrong.
    rows += _rows(["1", "2", "2", "1"], [0, 1, 1, 0], [0.1, 0.5, 0.2, 0.9], idx=0)
    # p1: None answers never vote and best_of_n skips them even with the top score.
    rows += _rows([None, None, "3", None], [0, 0, 1, 0], [5.0, 1.0, 0.0, 2.0], idx=1)
    # p2: no answer at all.
    rows += _rows([None] * 4, [0] * 4, [1.0, 2.0, 3.0, 4.0], idx=2)
    # p3: 0.5 and 1/2 are one class (by is_equiv), tied 2-2 with 1/3; an RM tie -> earliest.
    rows += _rows(["0.5", "\\frac{1}{2}", "1/3", "1/3"], [1, 1, 0, 0], [1.0, 3.0, 3.0, 0.0], idx=3)
    for i, ok in enumerate([1, 0, 0, 1]):
        rows += _rows(["x"], [ok], idx=i, kind="greedy")
    return rows


def test_summarize_matches_hand_computation():
    out = evaluate.summarize(_hand_rows(), 4)["s"]["cot"]
    assert out == {
        "n_greedy": 4,
        "greedy": 0.5,
        "n_sampled": 4,
        "maj@4": 0.5,
        "rm@4": 0.5,
        "pass@4": 0.75,
        "avg@4": 5 / 16,
    }
    # The first two samples only: p0 "1" vs "2" tie -> "1" (wrong), RM picks "2" (right);
    # p1 has no answer; p3 0.5 and 1/2 agree and the RM picks 1/2.
    out2 = evaluate.summarize(_hand_rows(), 2)["s"]["cot"]
    assert out2 == {
        "n_greedy": 4,
        "greedy": 0.5,
        "n_sampled": 4,
        "maj@2": 0.25,
        "rm@2": 0.5,
        "pass@2": 0.5,
        "avg@2": 3 / 8,
    }
    assert evaluate.summarize(_hand_rows(), 0)["s"]["cot"] == {"n_greedy": 4, "greedy": 0.5}


def test_summarize_without_rm_scores_and_with_missing_samples():
    rows = _rows(["1", "1"], [1, 1], idx=0) + _rows(["2", "3"], [0, 1], [0.0, 1.0], idx=1)
    out = evaluate.summarize(rows, 2)["s"]["cot"]
    assert out["rm@2"] is None and out["maj@2"] == 0.5 and out["greedy"] is None
    with pytest.raises(ValueError, match="lack samples \\[2\\]"):
        evaluate.summarize(rows, 3)
    with pytest.raises(ValueError, match="k must be"):
        evaluate.summarize(rows, -1)


def test_summarize_reproduces_reference_maj_and_rm_at_8():
    records = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
    rows = []
    for r in records:
        answers = [extract_answer(t, "math") for t in r["code"]]
        rows += _rows(
            answers,
            [is_equiv(a, r["gt"]) for a in answers],
            [s[0] for s in r["pred_score"]],
            idx=r["idx"],
            name="math",
        )
    got = evaluate.summarize(rows, 8)["math"]["cot"]

    def reference(labels):  # the Qwen2.5-Math evaluation's way, from the reference preds
        maj = rm = passed = 0
        for r in records:
            ok = labels(r)
            top = collections.Counter(r["pred"]).most_common(1)[0][0]
            maj += ok[r["pred"].index(top)]
            scores = [s[0] for s in r["pred_score"]]
            rm += ok[max(range(8), key=lambda i: (scores[i], -i))]
            passed += any(ok)
        return maj, rm, passed  # counts of problems

    # Row idx 72 sample 7 answers 10000 for the gold 10{,}000: correct, labelled wrong.
    fixed = reference(
        lambda r: [s or (r["idx"] == 72 and i == 7) for i, s in enumerate(r["score"])]
    )
    as_labelled = reference(lambda r: r["score"])
    n = len(records)
    assert (got["maj@8"], got["rm@8"], got["pass@8"]) == tuple(c / n for c in fixed)
    assert fixed == (93, 95, 97)  # the figures of this sample
    assert all(0 <= a - b <= 1 for a, b in zip(fixed, as_labelled))  # that row alone
    assert got["n_sampled"] == 100


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random HF policy with our trained BPE beside it, and a tiny random RM."""
    root = tmp_path_factory.mktemp("models")
    tok = common.tokenizer(base("eval"), str(root / "tok"))
    hf_dir = root / "policy"
    torch_model = tiny_qwen2(str(hf_dir), vocab=tok.vocab_size, seed=3)
    tok.save(hf_dir)
    rm_cfg = get_preset("tiny-rm", vocab_size=tok.vocab_size)
    rm_params = init_params(rm_cfg, jax.random.key(7))
    save_params(str(root / "rm"), rm_cfg, rm_params)
    return {
        "tok": tok,
        "hf_dir": str(hf_dir),
        "torch": torch_model,
        "rm_dir": str(root / "rm"),
        "rm_cfg": rm_cfg,
        "rm_params": rm_params,
    }


def _config(models, **eval_overrides):
    from qmath_jax.configs import eval_tiny

    cfg = eval_tiny.get_config()
    cfg.init.hf_dir = models["hf_dir"]
    cfg.mesh.num_devices = 1
    settings = {
        "sets": "gsm8k",
        "limit": 4,
        "modes": "cot,tir",
        "k": 2,
        "max_new_tokens": 8,
        "batch_size": 2,
        "sandbox_workers": 1,
        "rm_checkpoint": models["rm_dir"],
    }
    cfg.eval.update({**settings, **eval_overrides})
    return cfg


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the harness catches it."""


class _Counter:
    """Wraps sampler.generate: counts response rows and can fail at a given call."""

    def __init__(self, monkeypatch, fail_at=None):
        self.rows, self.calls, self.fail_at = 0, 0, fail_at
        real = sampler.generate

        def generate(cfg, params, prompts, max_new_tokens, **kw):
            self.calls += 1
            if self.calls == self.fail_at:
                raise _Killed
            self.rows += len(prompts) * kw.get("n", 1)
            return real(cfg, params, prompts, max_new_tokens, **kw)

        monkeypatch.setattr(sampler, "generate", generate)


def _torch_greedy(model, ids, steps, stop):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop:
                break
    return out


@pytest.fixture(scope="module")
def full_run(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval_full")
    with pytest.MonkeyPatch.context() as mp:
        counter = _Counter(mp)
        summary = evaluate.run(_config(models), str(workdir))
    rows = [json.loads(x) for x in (workdir / "samples.jsonl").read_text().splitlines()]
    return {"workdir": workdir, "summary": summary, "rows": rows, "counter": counter}


def test_eval_stage_end_to_end(models, full_run):
    rows, tok = full_run["rows"], models["tok"]
    gold = {p["idx"]: p for p in load_benchmark("gsm8k", BENCHMARKS)[:4]}
    assert len(rows) == 4 * 2 * (1 + 2) == full_run["counter"].rows
    units = collections.Counter((r["mode"], r["kind"]) for r in rows)
    assert units == {
        ("cot", "greedy"): 4,
        ("cot", "sampled"): 8,
        ("tir", "greedy"): 4,
        ("tir", "sampled"): 8,
    }
    for r in rows:  # graded independently of the harness
        assert r["gold"] == gold[r["idx"]]["answer"]
        assert r["answer"] == extract_answer(r["text"], "gsm8k")
        assert r["correct"] == is_equiv(r["answer"], r["gold"])
        assert 1 <= r["length"] <= 8 and r["num_tool_calls"] == 0
    # Greedy CoT answers are PyTorch's greedy decoding of the HF checkpoint (one problem
    # of each sampler batch).
    stop = {tok.eos_id, tok.im_end_id}
    for r in (
        r for r in rows if (r["mode"], r["kind"]) == ("cot", "greedy") and r["idx"] in (0, 3)
    ):
        prompt = tok.encode(chat.format_prompt(gold[r["idx"]]["question"], "cot"))
        want = _torch_greedy(models["torch"], prompt, 8, stop)
        assert r["text"] == tok.decode(want[:-1] if want[-1] in stop else want)
    # RM scores: the RM on prompt + response, unpadded, read at the last token.
    r = rows[-1]
    p, t = chat.format_sft(gold[r["idx"]]["question"], r["text"], r["mode"])
    ids = np.array([tok.encode(p) + tok.encode(t)], np.int32)
    pos = np.arange(ids.shape[1])[None]
    want = Transformer(models["rm_cfg"]).apply(
        {"params": models["rm_params"]}, ids, pos, np.ones_like(ids)
    )[0, -1]
    np.testing.assert_allclose(r["rm_score"], float(want), rtol=1e-4, atol=1e-5)
    # The summary on disk is summarize() of the rows.
    summary = json.loads((full_run["workdir"] / "summary.json").read_text())
    assert summary["results"] == evaluate.summarize(rows, 2)
    assert summary["rows"] == 24
    assert summary["results"]["gsm8k"]["tir"]["n_sampled"] == 4
    assert summary["results"]["gsm8k"]["cot"]["n_greedy"] == 4


def test_eval_resumes_without_redoing_finished_rows(models, full_run, tmp_path, monkeypatch):
    workdir = tmp_path / "eval"
    # Calls: cot greedy (2 batches), cot sampled (2), tir greedy (2), tir sampled (2).
    with monkeypatch.context() as mp:
        _Counter(mp, fail_at=5)
        with pytest.raises(_Killed):
            evaluate.run(_config(models), str(workdir))
    path = workdir / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4 + 8  # cot done; the kill came at the first tir batch
    # A kill while the last cot batch (problems 2, 3) was being written: problem 2 keeps
    # one of its two samples, the second is torn in half, problem 3 has none.
    path.write_text("".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    kept = "".join(lines[:8])
    with monkeypatch.context() as mp:
        counter = _Counter(mp)
        evaluate.run(_config(models), str(workdir))
    final = path.read_text()
    assert final.startswith(kept)  # finished rows kept byte for byte
    assert counter.rows == 24 - 8  # only the missing units were sampled
    rows = [json.loads(x) for x in final.splitlines()]
    # Batches are redone whole, so the rows are those of the uninterrupted run.
    key = operator.itemgetter("mode", "kind", "idx", "sample")
    assert sorted(rows, key=key) == sorted(full_run["rows"], key=key)
    with pytest.raises(ValueError, match="other settings"):
        evaluate.run(_config(models, k=3), str(workdir))


def test_bad_settings_are_refused(models, tmp_path):
    # launch imports qmath_jax.stages.<cfg.stage>: the eval stage is this module's run.
    assert importlib.import_module("qmath_jax.stages.eval").run is evaluate.run
    with pytest.raises(ValueError, match="unknown set 'gsm9k'"):
        evaluate.load_problems("gsm9k")
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate.run(_config(models, modes="cot,pot"), str(tmp_path))
    cfg = _config(models)
    cfg.init.hf_dir = ""
    with pytest.raises(ValueError, match="init.hf_dir"):
        evaluate.run(cfg, str(tmp_path))
