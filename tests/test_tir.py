"""Tests of the TIR loop, driven by a scripted model over a byte-level tokenizer.

The scripted model behaves like a sampler: it stops after the stop string (its tokens
included) and at max_new_tokens. Executor outputs come from the real sandbox; expected
values are computed here independently (Python, sympy).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import pytest
import sympy

from qmath_jax.sampling.tir import (
    MAX_CALLS_MESSAGE,
    NO_BLOCK_ERROR,
    STOP,
    extract_last_python_block,
    format_tool_output,
    run_tir,
)
from qmath_jax.sandbox import SandboxPool, SandboxResult

pytestmark = pytest.mark.timeout(120)


class ByteTokenizer:
    """One token per UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


@dataclasses.dataclass
class FakeCompletion:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


def fake_logprob(token: int) -> float:
    return -0.01 - (token % 13) / 10


class ScriptedModel:
    """Replays pre-written turns per prompt, cutting them as a sampler would.

    Args:
      scripts: prompt text -> the model's turns, in order.
      overshoot: Extra characters kept after the stop string (a token that runs past it).
    """

    def __init__(self, scripts: dict[str, list[str]], overshoot: str = "") -> None:
        self.scripts = scripts
        self.overshoot = overshoot
        self.turn: dict[str, int] = defaultdict(int)
        self.batches: list[int] = []

    def __call__(self, prompts, max_new_tokens, stop):
        assert stop == [STOP]
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            text = TOK.decode(p)
            key = next(k for k in self.scripts if text.startswith(k))
            seg = self.scripts[key][self.turn[key]]
            self.turn[key] += 1
            reason = "eos"
            at = seg.find(STOP)
            if at >= 0:
                seg = seg[: at + len(STOP)] + self.overshoot
                reason = "stop_string"
            ids = TOK.encode(seg)
            if len(ids) > max_new_tokens:
                ids, reason = ids[:max_new_tokens], "length"
            out.append(FakeCompletion(ids, [fake_logprob(t) for t in ids], reason))
        return out


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2, timeout_s=5.0) as p:
        yield p


def _prompt(text: str) -> list[int]:
    return TOK.encode(text)


def _check_masks(traj, pieces):
    """pieces: (text, is_model) in order; checks text, tokens, mask and logprobs."""
    expected_ids, expected_mask = [], []
    for text, is_model in pieces:
        ids = TOK.encode(text)
        expected_ids += ids
        expected_mask += [int(is_model)] * len(ids)
    assert traj.text == "".join(t for t, _ in pieces)
    assert traj.tokens == expected_ids
    assert traj.loss_mask == expected_mask
    assert len(traj.logprobs) == len(traj.tokens)
    for tok, m, lp in zip(traj.tokens, traj.loss_mask, traj.logprobs):
        assert lp == (fake_logprob(tok) if m else 0.0)


def test_extract_last_python_block():
    text = "a\n```python\nx = 1\n```\nmid\n```python\ny = 2\nprint(y)\n```\n```output"
    assert extract_last_python_block(text) == "y = 2\nprint(y)\n"
    assert extract_last_python_block("no code here") is None
    assert extract_last_python_block("```python\nx = 1\n```\n```python\nunfinished") is None
    assert extract_last_python_block("Let us code: ```python\nz = 3\n```") == "z = 3\n"


def test_format_tool_output():
    def res(stdout="", error="", timed_out=False):
        return SandboxResult(stdout, error, timed_out, False, False, "", 0.1)

    assert format_tool_output(res("  42\n")) == "42"
    assert format_tool_output(res("")) == "Done"
    assert format_tool_output(res("partial\n", "ValueError: bad")) == "ValueError: bad"
    assert format_tool_output(res(error="TimeoutError: x", timed_out=True)) == "Timeout Error"
    long = "".join(str(i % 10) for i in range(1000))
    assert format_tool_output(res(long)) == long[:200] + "..." + long[-200:]


def test_trajectories_are_well_formed(pool):
    x = 2**100
    y = sympy.Symbol("y")
    roots = str(sympy.solve(y**2 - x, y))
    a1 = "Compute first.\n```python\nx = 2**100\nprint(x)\n```\n```output"
    a2 = "Now solve.\n```python\nimport sympy as sp\ny = sp.Symbol('y')\nprint(sp.solve(y**2 - x, y))\n```\n```output"
    a3 = "So the answer is $\\boxed{2^{50}}$."
    b1 = "```python\nprint(1/0)\n```\n```output"
    b2 = "```python\nz = 5\n```\n```output"
    b3 = "```python\nw = z * 2\nprint(undefined)\n```\n```output"
    b4 = "```python\n(z + 1, 'w' in globals())\n```\n```output"  # failed cells are not replayed
    b5 = "Finished."
    model = ScriptedModel({"Problem A": [a1, a2, a3], "Problem B": [b1, b2, b3, b4, b5]})
    trajs = run_tir(model, TOK, [_prompt("Problem A"), _prompt("Problem B")],
                    max_new_tokens=4000, max_tool_calls=4, pool=pool)  # fmt: skip
    ta, tb = trajs
    assert ta.tool_outputs == [str(x), roots]
    assert ta.num_tool_calls == 2 and ta.stop_reason == "eos"
    _check_masks(ta, [(a1, 1), (f"\n{x}\n```\n", 0), (a2, 1), (f"\n{roots}\n```\n", 0), (a3, 1)])
    outs = ["ZeroDivisionError: division by zero", "Done",
            "NameError: name 'undefined' is not defined", "(6, False)"]  # fmt: skip
    assert tb.tool_outputs == outs
    assert tb.num_tool_calls == 4 and tb.stop_reason == "eos"
    pieces = []
    for seg, out in zip([b1, b2, b3, b4], outs):
        pieces += [(seg, 1), (f"\n{out}\n```\n", 0)]
    pieces[-1] = (pieces[-1][0] + MAX_CALLS_MESSAGE, 0)
    _check_masks(tb, pieces + [(b5, 1)])
    assert model.batches == [2, 2, 2, 1, 1]  # all open trajectories generate together


def test_tool_call_cap(pool):
    c1 = "```python\nprint(7)\n```\n```output"
    c2 = "```python\nprint(8)\n```\n```output"
    model = ScriptedModel({"Q": [c1, c2]})
    (t,) = run_tir(model, TOK, [_prompt("Q")], max_new_tokens=1000, max_tool_calls=1, pool=pool)
    assert t.num_tool_calls == 1 and t.stop_reason == "tool_limit"
    _check_masks(t, [(c1, 1), ("\n7\n```\n" + MAX_CALLS_MESSAGE, 0), (c2, 1)])


def test_token_budget(pool):
    seg = "```python\nprint('a' * 50)\n```\n```output"
    model = ScriptedModel({"Q": [seg, "never reached"]})
    budget = len(TOK.encode(seg)) + 20  # runs out inside the executor's output block
    (t,) = run_tir(model, TOK, [_prompt("Q")], max_new_tokens=budget, pool=pool)
    assert t.stop_reason == "length" and len(t.tokens) == budget
    assert t.loss_mask[-1] == 0 and t.text.endswith("\n" + "a" * 19)
    model = ScriptedModel({"Q": ["x" * 100]})
    (t,) = run_tir(model, TOK, [_prompt("Q")], max_new_tokens=30, pool=pool)
    assert t.stop_reason == "length" and t.text == "x" * 30 and t.loss_mask == [1] * 30


def test_stop_token_running_past_the_stop_string(pool):
    seg = "```python\nprint(3 * 3)\n```\n```output"
    model = ScriptedModel({"Q": [seg, "Nine."]}, overshoot="\n")
    (t,) = run_tir(model, TOK, [_prompt("Q")], max_new_tokens=500, pool=pool)
    _check_masks(t, [(seg + "\n", 1), ("9\n```\n", 0), ("Nine.", 1)])


def test_missing_block_and_timeout(pool):
    model = ScriptedModel({
        "A": ["I will just open ```output", "ok"],
        "B": ["```python\nwhile True:\n    pass\n```\n```output", "ok"],
    })  # fmt: skip
    ta, tb = run_tir(model, TOK, [_prompt("A"), _prompt("B")], max_new_tokens=500,
                     timeout_s=1.0, pool=pool)  # fmt: skip
    assert ta.tool_outputs == [NO_BLOCK_ERROR] and tb.tool_outputs == ["Timeout Error"]


def test_executions_run_in_parallel(pool):
    seg = "```python\nimport time\ntime.sleep(0.6)\nprint('slept')\n```\n```output"
    model = ScriptedModel({"A": [seg, "a"], "B": [seg, "b"]})
    t0 = time.monotonic()
    trajs = run_tir(model, TOK, [_prompt("A"), _prompt("B")], max_new_tokens=500, pool=pool)
    elapsed = time.monotonic() - t0
    assert [t.tool_outputs for t in trajs] == [["slept"], ["slept"]]
    assert elapsed < 1.15, f"two 0.6 s cells took {elapsed:.2f} s: not run in parallel"


def test_bad_generate_fn_is_reported(pool):
    with pytest.raises(ValueError, match="exactly one per prompt"):
        run_tir(lambda p, n, s: [], TOK, [_prompt("Q")], max_new_tokens=10, pool=pool)

    def bad(prompts, max_new_tokens, stop):
        return [FakeCompletion([65], [0.0], "done")]

    with pytest.raises(ValueError, match="unknown Completion.stop_reason"):
        run_tir(bad, TOK, [_prompt("Q")], max_new_tokens=10, pool=pool)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_tir(bad, TOK, [_prompt("Q")], max_new_tokens=0, pool=pool)


def test_sft_trains_on_the_tokens_the_loop_produces(pool):
    """A TIR response tokenized for SFT equals the loop's trajectory when the model writes it.

    With a BPE tokenizer, text and ids are not interchangeable: if SFT cut the executor's
    block at another place than the loop appends it, the model would be trained on token
    boundaries it never sees when sampling (a small model then repeats the fence).
    """
    import numpy as np

    from qmath_jax.data import chat, pipelines, synthetic
    from qmath_jax.data.tokenizer import train_bpe_tokenizer

    synth = synthetic.SyntheticMath(0, kinds=["add", "big_mul"])
    records = [synth[i] for i in range(6)]
    tok = train_bpe_tokenizer([r["tir"] + r["cot"] for r in (synth[i] for i in range(300))], 400)
    for rec in records:
        prompt, response = chat.format_sft(rec["question"], rec["tir"], "tir")
        ds = pipelines.sft_dataset(
            [{"question": rec["question"], "response": rec["tir"], "mode": "tir"}], tok,
            seq_len=256, batch_size=1, num_epochs=1, shuffle=False, add_eos=False,
            shard_index=0, shard_count=1,
        )  # fmt: skip
        row = {k: v[0] for k, v in next(iter(ds)).items()}
        seg = row["segment_ids"] == 1
        ids = np.append(row["tokens"][seg], row["targets"][seg][-1]).tolist()
        mask = np.append(0, row["loss_mask"][seg]).tolist()  # mask[i]: token i is trained
        n_prompt = len(tok.encode(prompt))
        assert tok.decode(ids[:n_prompt]) == prompt
        want_ids, want_mask = ids[n_prompt:], mask[n_prompt:]
        runs, start = [], 0  # the model's own turns: maximal runs of trained tokens
        for i in range(1, len(want_mask) + 1):
            if i == len(want_mask) or want_mask[i] != want_mask[start]:
                if want_mask[start]:
                    runs.append(want_ids[start:i])
                start = i
        turns = iter(runs)

        def replay(prompts, max_new_tokens, stop, turns=turns):
            out = []
            for _ in prompts:
                t = next(turns)
                reason = "stop_string" if tok.decode(t).endswith(STOP) else "eos"
                out.append(FakeCompletion(t, [fake_logprob(x) for x in t], reason))
            return out

        (traj,) = run_tir(replay, tok, [ids[:n_prompt]], max_new_tokens=200, pool=pool)
        assert traj.text == response
        assert traj.tokens == want_ids
        assert traj.loss_mask == want_mask
