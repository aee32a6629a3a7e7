"""Evaluation: greedy, maj@k, rm@k and pass@k of a policy on math benchmarks, CoT and TIR.

For every benchmark set, prompt mode (CoT, TIR) and sample kind (greedy: temperature 0;
sampled: k draws at eval.temperature / eval.top_p, as the report does for maj@8 and RM@8),
problems go to the sampler in batches of eval.batch_size prompts; TIR runs through the TIR
loop with a sandbox pool. Each response is graded (`extract_answer(text, dataset=set)`,
`is_equiv` against the gold answer), scored by the reward model when one is given (the
prompt and response in the chat format, RM head at the last token), and written as one
JSONL row to `workdir/samples.jsonl`:

  {set, idx, mode, kind, sample, text, answer, gold, correct, rm_score, num_tool_calls,
   length, stop_reason}

`summarize(rows, k)` turns rows into the metrics; `workdir/summary.json` holds them and a
plain-text table is printed.

Resuming. A unit is (set, idx, mode, kind): one greedy row or k sampled rows of a problem.
A batch's rows are appended in one write once the batch is done (in a bucket, one
composed append), so an interrupted run leaves complete units, at most one incomplete unit
and maybe a torn last line. A rerun keeps the complete units (byte for byte), drops the rest, and samples only
the missing units. `eval_settings.json` records what shapes the samples (k, temperature,
max_new_tokens, the weights, ...); a rerun with other values is refused rather than mixing
samples of two settings in one file.

Randomness: sampled draws of a batch use fold_in(key(seed), crc32(set/mode/kind), first idx
of the batch), so a run is reproducible from its settings and eval.batch_size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from qmath_jax import fileio, parallel
from qmath_jax.data import chat
from qmath_jax.grading import best_of_n, extract_answer, is_equiv, majority_vote

log = logging.getLogger(__name__)

ROWS_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "eval_settings.json"
MODES = ("cot", "tir")
KINDS = ("greedy", "sampled")
SYNTHETIC = "synthetic"  # set name: the synthetic corpus's test split
SYNTHETIC_DEFAULT_SIZE = 500  # problems of the synthetic set when eval.limit is 0
# Settings that change what a sample is; a resumed run must match them.
_SAMPLE_SETTINGS = ("k", "temperature", "top_p", "max_new_tokens", "max_tool_calls", "seed",
                    "policy", "rm")  # fmt: skip

Row = dict[str, Any]
Equiv = Callable[[str, str], bool]


# ----------------------------------------------------------------------------- metrics


def metric_names(k: int) -> list[str]:
    """The metric keys `summarize` reports for k samples per problem."""
    names = ["greedy"]
    if k > 0:
        names += [f"maj@{k}", f"rm@{k}", f"pass@{k}", f"avg@{k}"]
    return names


def summarize(rows: Iterable[Mapping[str, Any]], k: int, equiv: Equiv = is_equiv) -> dict:
    """Metrics of sample rows, per set and mode (a pure function of the rows).

    For each (set, mode): greedy = mean `correct` of the greedy rows; over the problems with
    sampled rows, using samples 0..k-1 of each: maj@k = the majority answer's class is
    correct (`majority_vote`: None answers never vote, ties go to the earliest class);
    rm@k = the highest-`rm_score` answer is correct (`best_of_n`: None answers skipped, ties
    go to the earliest); pass@k = some sample is correct; avg@k = mean `correct` of the k.
    A vote's winner counts as correct when its representative row (the class's first
    member) is. rm@k is None when a sample lacks an rm_score; a metric without rows is None.

    Args:
      rows: dicts with set, idx, mode, kind ("greedy" | "sampled"), sample, answer (str or
        None), correct (bool) and, for rm@k, rm_score.
      k: samples per problem to use (the first k); 0 reports greedy only.
      equiv: answer equality for grouping votes.

    Returns:
      {set: {mode: {"n_greedy": int, "n_sampled": int, "greedy": float | None,
      "maj@k", "rm@k", "pass@k", "avg@k": float | None}}}, fractions in [0, 1], sets and
      modes in order of first appearance.

    Raises:
      ValueError: k < 0, an unknown kind, or a problem with sampled rows lacking one of
        samples 0..k-1.
    """
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["kind"] not in KINDS:
            raise ValueError(f"row {_unit(r)} has kind {r['kind']!r}; expected one of {KINDS}")
        g = groups.setdefault((r["set"], r["mode"]), {"greedy": {}, "sampled": {}})
        if r["kind"] == "greedy":
            g["greedy"].setdefault(r["idx"], r)
        else:
            g["sampled"].setdefault(r["idx"], {}).setdefault(int(r["sample"]), r)
    out: dict[str, dict] = {}
    for (name, mode), g in groups.items():
        out.setdefault(name, {})[mode] = _group_metrics(name, mode, g, k, equiv)
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group_metrics(name: str, mode: str, g: dict, k: int, equiv: Equiv) -> dict:
    greedy = [bool(r["correct"]) for r in g["greedy"].values()]
    m: dict[str, Any] = {"n_greedy": len(greedy), "greedy": _mean(greedy)}
    if k == 0:
        return m
    per_problem = []
    for idx, samples in g["sampled"].items():
        missing = [s for s in range(k) if s not in samples]
        if missing:
            raise ValueError(
                f"{name} {mode} idx {idx}: sampled rows lack samples {missing[:8]} of 0..{k - 1}; "
                f"summarize with k <= {min(missing)} or finish the run"
            )
        per_problem.append(_problem_metrics([samples[s] for s in range(k)], equiv))
    m["n_sampled"] = len(per_problem)
    for key in ("maj", "rm", "pass", "avg"):
        values = [p[key] for p in per_problem]
        m[f"{key}@{k}"] = None if any(v is None for v in values) else _mean(values)
    return m


def _problem_metrics(samples: list[Mapping[str, Any]], equiv: Equiv) -> dict:
    answers = [r["answer"] for r in samples]
    correct = [bool(r["correct"]) and r["answer"] is not None for r in samples]
    _, maj = majority_vote(answers, equiv)
    scores = [r.get("rm_score") for r in samples]
    rm = None
    if all(s is not None for s in scores):
        _, best = best_of_n(answers, [float(s) for s in scores])
        rm = float(correct[best])
    return {"maj": float(correct[maj]), "rm": rm, "pass": float(any(correct)),
            "avg": sum(correct) / len(correct)}  # fmt: skip


def mean_over_sets(results: Mapping[str, Mapping[str, Mapping[str, Any]]], k: int) -> dict:
    """Per mode, the unweighted mean of each metric over the sets that have it (as the
    report's "Avg." column); None when no set has it."""
    out: dict[str, dict] = {}
    for by_mode in results.values():
        for mode, m in by_mode.items():
            acc = out.setdefault(mode, {n: [] for n in metric_names(k)})
            for n in metric_names(k):
                if m.get(n) is not None:
                    acc[n].append(m[n])
    return {mode: {n: _mean(v) for n, v in acc.items()} for mode, acc in out.items()}


def format_table(results: Mapping, k: int, mean: Mapping | None = None) -> str:
    """A plain-text table of `summarize` results, accuracies in percent."""
    names = metric_names(k)
    header = ["set", "mode", "problems", *names]
    lines = []
    for name, by_mode in results.items():
        for mode, m in by_mode.items():
            n = max(m.get("n_greedy", 0), m.get("n_sampled", 0))
            lines.append([name, mode, str(n), *(_pct(m.get(x)) for x in names)])
    for mode, m in (mean or {}).items():
        lines.append(["mean", mode, "", *(_pct(m.get(x)) for x in names)])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*row) for row in lines)])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


# ----------------------------------------------------------------------------- problems


def load_problems(name: str, *, root: str | None = None, limit: int = 0, seed: int = 0,
                  synthetic_kinds: Sequence[str] | None = None) -> list[dict]:  # fmt: skip
    """The first `limit` problems (0 = all) of a benchmark set, as [{idx, question, answer}].

    Args:
      name: a key of `qmath_jax.data.sources.BENCHMARKS`, or "synthetic" for the synthetic
        corpus's test split (SYNTHETIC_DEFAULT_SIZE problems when limit is 0).
      root: the benchmarks directory; default ../shared/benchmarks beside the checkout.
      limit: problems to keep, from the start.
      seed: the synthetic corpus seed.
      synthetic_kinds: synthetic problem kinds (default all).
    """
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"eval.limit must be an int >= 0 (0 = all), got {limit!r}")
    if name == SYNTHETIC:
        from qmath_jax.data.synthetic import SyntheticMath

        corpus = SyntheticMath(seed=seed, kinds=synthetic_kinds, split="test")
        n = limit or SYNTHETIC_DEFAULT_SIZE
        return [{"idx": i, "question": p["question"], "answer": str(p["answer"])}
                for i, p in enumerate(corpus[j] for j in range(n))]  # fmt: skip
    from qmath_jax.data.sources import BENCHMARKS, load_benchmark

    if name not in BENCHMARKS:
        raise ValueError(
            f"eval.sets: unknown set {name!r}; choose from {sorted(BENCHMARKS)} or {SYNTHETIC!r}"
        )
    problems = load_benchmark(name, root)
    return problems[:limit] if limit else problems


# ----------------------------------------------------------------------------- reward model


def _bucket(x: int, minimum: int = 64) -> int:
    """Powers of two up to 2048, then multiples of 1024: few compiled shapes."""
    x = max(x, minimum)
    if x <= 2048:
        return 1 << (x - 1).bit_length()
    return -(-x // 1024) * 1024


class RewardScorer:
    """Scores responses with a reward model (Qwen2.5-Math-RM head) in fixed-size batches.

    A response is rendered as the RM stage trains on it: `chat.format_sft(question,
    response, mode)`, prompt and target encoded separately and concatenated, the score read
    at the last token. Rows longer than the model's max_positions are cut to it (the score
    is then read at the last kept token) and counted in `truncated`.
    """

    def __init__(self, model_cfg, params, tokenizer, *, batch_size: int = 16, mesh=None):
        """Builds the scorer.

        Args:
          model_cfg: a ModelConfig with head="rm".
          params: its params.
          tokenizer: the policy's tokenizer (the RM must share it).
          batch_size: rows per forward pass (rounded up to the data-parallel size).
          mesh: a ('data', 'fsdp', 'tensor') mesh, or None.
        """
        from qmath_jax.model import Transformer
        from qmath_jax.model.transformer import param_axes
        from qmath_jax.stages.reward_model import scores_at_last_token

        if model_cfg.head != "rm":
            raise ValueError(
                f"the reward model needs head='rm', got head={model_cfg.head!r}: point "
                "eval.rm_checkpoint / eval.rm_hf_dir at a reward model, not a policy"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"eval.rm_batch_size must be a positive int, got {batch_size!r}")
        multiple = parallel.data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = -(-batch_size // multiple) * multiple
        self.cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
        self.truncated = 0
        if mesh is not None:
            params = jax.device_put(
                params, parallel.logical_to_sharding(param_axes(model_cfg), mesh)
            )
        self.params = params
        model = Transformer(model_cfg, mesh)
        self._score = jax.jit(lambda p, b: scores_at_last_token(model, p, b))

    def score(self, questions: Sequence[str], responses: Sequence[str],
              modes: Sequence[str]) -> list[float]:  # fmt: skip
        """One score per (question, response, mode) triple."""
        if not len(questions) == len(responses) == len(modes):
            raise ValueError("score: questions, responses and modes must have equal lengths")
        texts = []
        for q, r, m in zip(questions, responses, modes):
            texts += list(chat.format_sft(q, r, m))
        ids = self.tokenizer.encode_batch(texts)
        return self.score_ids([ids[i] + ids[i + 1] for i in range(0, len(ids), 2)])

    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Scores of token rows (prompt + response ids), read at each row's last token."""
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            out += self._score_chunk(rows[start : start + self.batch_size])
        return out

    def _score_chunk(self, rows: Sequence[Sequence[int]]) -> list[float]:
        limit = self.cfg.max_positions
        cut = [list(r)[:limit] for r in rows]
        self.truncated += sum(len(r) > limit for r in rows)
        if any(not r for r in cut):
            raise ValueError("RewardScorer: an empty row has no last token to score")
        t = min(_bucket(max(len(r) for r in cut)), max(limit, 1))
        b = self.batch_size
        tokens = np.full((b, 1, t), int(getattr(self.tokenizer, "pad_id", 0) or 0), np.int32)
        segments = np.zeros((b, 1, t), np.int32)
        positions = np.zeros((b, 1, t), np.int32)
        last = np.zeros((b, 1), np.int32)
        for i, r in enumerate(cut):
            tokens[i, 0, : len(r)], segments[i, 0, : len(r)] = r, 1
            positions[i, 0, : len(r)] = np.arange(len(r))
            last[i, 0] = len(r) - 1
        segments[len(cut) :, 0, 0] = 1  # padding rows: one dummy token
        batch = {"tokens": tokens, "segment_ids": segments, "positions": positions,
                 "last_index": last}  # fmt: skip
        if self.mesh is None:
            scores = self._score(self.params, batch)
        else:
            with jax.set_mesh(self.mesh), parallel.axis_rules():
                scores = self._score(self.params, batch)
        return [float(x) for x in parallel.fetch(scores)[: len(cut), 0]]


# ----------------------------------------------------------------------------- rows on disk


def _unit(r: Mapping[str, Any]) -> tuple:
    return (r["set"], int(r["idx"]), r["mode"], r["kind"])


def read_rows(path: str) -> tuple[list[Row], int]:
    """Rows of a samples file and the number of unreadable lines (a torn last line after
    an interrupted write, or damage); a missing file has no rows."""
    rows, bad = [], 0
    if not fileio.exists(path):
        return rows, bad
    with fileio.open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                _unit(row)
                int(row["sample"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
                log.warning(
                    "%s:%d: unreadable row (an interrupted write?); it will be redone", path, lineno
                )
                continue
            rows.append(row)
    return rows, bad


def complete_units(rows: Iterable[Row], k: int) -> tuple[dict[tuple, list[Row]], int]:
    """Groups rows into units and keeps the complete ones.

    A greedy unit is complete with sample 0, a sampled unit with samples 0..k-1 (a
    duplicated sample keeps its first row).

    Returns:
      ({unit: rows ordered by sample}, number of rows dropped).
    """
    units: dict[tuple, dict[int, Row]] = {}
    total = 0
    for r in rows:
        total += 1
        units.setdefault(_unit(r), {}).setdefault(int(r["sample"]), r)
    done = {}
    for key, samples in units.items():
        want = 1 if key[3] == "greedy" else k
        if set(samples) == set(range(want)):
            done[key] = [samples[s] for s in range(want)]
    return done, total - sum(len(v) for v in done.values())


def _rewrite(path: str, units: Mapping[tuple, list[Row]]) -> None:
    fileio.write_text_atomic(path, "".join(_lines(unit_rows) for unit_rows in units.values()),
                             encoding="utf-8")


def _lines(rows: Iterable[Row]) -> str:
    """Rows as JSONL text, non-ASCII kept as is (answers hold LaTeX and CJK text)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _check_settings(workdir: str, settings: dict, has_rows: bool) -> None:
    path = os.path.join(workdir, SETTINGS_FILE)
    if fileio.exists(path):
        with fileio.open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), settings.get(k)) for k in _SAMPLE_SETTINGS
                if old.get(k) != settings.get(k)}  # fmt: skip
        if diff and has_rows:
            raise ValueError(
                f"{workdir} holds samples made with other settings {diff} (before, now); "
                f"use another workdir, or restore those settings to resume ({path})"
            )
    if jax.process_index() == 0:
        fileio.write_text(path, json.dumps(settings, indent=2))


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class _Response:
    text: str
    length: int
    stop_reason: str
    num_tool_calls: int = 0


def _response_text(tokenizer, tokens: Sequence[int], stop_reason: str) -> str:
    # The stop token ends the turn; it is not part of the response text.
    if stop_reason == "eos" and tokens:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


@dataclasses.dataclass
class _Sampling:
    """Everything a batch needs to sample (shared by all batches of a run)."""

    model_cfg: Any
    params: Any
    tokenizer: Any
    k: int
    temperature: float
    top_p: float
    max_new_tokens: int
    max_tool_calls: int
    tool_timeout_s: float
    max_batch: int | None
    mesh: Any
    seed: int
    pool_factory: Callable[[], Any]
    stop_ids: tuple[int, ...] = ()

    def key(self, name: str, mode: str, kind: str, first_idx: int) -> jax.Array:
        salt = zlib.crc32(f"{name}/{mode}/{kind}".encode()) & 0x7FFFFFFF
        key = jax.random.fold_in(jax.random.key(self.seed), salt)
        return jax.random.fold_in(key, first_idx)

    def run(self, prompts: list[list[int]], mode: str, kind: str, key) -> list[list[_Response]]:
        """Responses per prompt: one (greedy) or k (sampled)."""
        n = 1 if kind == "greedy" else self.k
        temperature = 0.0 if kind == "greedy" else self.temperature
        top_p = 1.0 if kind == "greedy" else self.top_p
        flat = self._tir(prompts, n, temperature, top_p, key) if mode == "tir" else \
            self._cot(prompts, n, temperature, top_p, key)  # fmt: skip
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _cot(self, prompts, n, temperature, top_p, key) -> list[_Response]:
        from qmath_jax.sampling import sampler

        completions = sampler.generate(
            self.model_cfg, self.params, prompts, self.max_new_tokens,
            temperature=temperature, top_p=top_p, n=n, stop_token_ids=self.stop_ids,
            tokenizer=self.tokenizer, key=key, mesh=self.mesh, max_batch=self.max_batch,
        )  # fmt: skip
        return [_Response(_response_text(self.tokenizer, c.tokens, c.stop_reason),
                          len(c.tokens), c.stop_reason) for c in completions]  # fmt: skip

    def _tir(self, prompts, n, temperature, top_p, key) -> list[_Response]:
        from qmath_jax.sampling import sampler
        from qmath_jax.sampling.tir import run_tir

        generate_fn = sampler.make_generate_fn(
            self.model_cfg, self.params, self.tokenizer, temperature=temperature, top_p=top_p,
            key=key, stop_token_ids=self.stop_ids, mesh=self.mesh, max_batch=self.max_batch,
        )  # fmt: skip
        repeated = [p for p in prompts for _ in range(n)]  # prompt-major, as generate's n
        trajectories = run_tir(
            generate_fn, self.tokenizer, repeated, max_new_tokens=self.max_new_tokens,
            max_tool_calls=self.max_tool_calls, timeout_s=self.tool_timeout_s,
            pool=self.pool_factory(),
        )  # fmt: skip
        return [_Response(_response_text(self.tokenizer, t.tokens, t.stop_reason),
                          len(t.tokens), t.stop_reason, t.num_tool_calls)
                for t in trajectories]  # fmt: skip


def _stop_ids(tokenizer) -> tuple[int, ...]:
    ids = (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "im_end_id", None))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


# ----------------------------------------------------------------------------- the loop


def _parse_list(value: str | Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"{what} is empty: name at least one")
    if len(set(items)) != len(items):
        raise ValueError(f"{what} names an entry twice: {items}")
    return items


def _check_args(modes, k, temperature, top_p, max_new_tokens, batch_size) -> None:
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"eval.modes: unknown mode(s) {bad}; use a comma list of {MODES}")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"eval.k must be an int >= 0 (0 = greedy only), got {k!r}")
    if k > 0 and not temperature > 0:
        raise ValueError(f"eval.temperature must be > 0 for sampled answers, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"eval.top_p must be in (0, 1], got {top_p}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"eval.batch_size must be a positive int, got {batch_size!r}")


def evaluate(
    policy_cfg,
    params,
    tokenizer,
    sets: Sequence[str] | str | Mapping[str, Sequence[Mapping[str, Any]]],
    modes: Sequence[str] | str = ("cot",),
    k: int = 8,
    *,
    workdir: str,
    rm: RewardScorer | None = None,
    greedy: bool = True,
    limit: int = 0,
    temperature: float = 0.7,
    top_p: float = 0.8,
    max_new_tokens: int = 2048,
    max_tool_calls: int = 4,
    tool_timeout_s: float = 5.0,
    batch_size: int = 32,
    max_batch: int | None = None,
    seed: int = 0,
    mesh=None,
    pool=None,
    sandbox_workers: int = 4,
    benchmarks_root: str | None = None,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Samples, grades and scores a policy on benchmark sets; resumes from `workdir`.

    Args:
      policy_cfg: the policy's ModelConfig (head "lm").
      params: its params.
      tokenizer: its tokenizer (encode, encode_batch, decode, eos_id, im_end_id).
      sets: set names (a comma string or a list; see `load_problems`), or a mapping
        name -> problems [{idx, question, answer}] supplied by the caller.
      modes: "cot" and/or "tir".
      k: samples per problem for maj@k / rm@k / pass@k (0: greedy only).
      workdir: where samples.jsonl, summary.json and eval_settings.json go.
      rm: a RewardScorer for rm@k, or None.
      greedy: also take one greedy (temperature 0) answer per problem.
      limit: problems per named set (0 = all).
      temperature: sampling temperature of the k samples.
      top_p: their nucleus truncation.
      max_new_tokens: response budget (TIR: the whole response, tool outputs included).
      max_tool_calls: TIR code executions per response.
      tool_timeout_s: TIR wall-clock limit per execution.
      batch_size: problems per sampler call.
      max_batch: most decode rows per compiled sampler call (None: no cap).
      seed: PRNG seed of the sampled answers (and the synthetic set).
      mesh: the mesh for the sampler and the RM, or None.
      pool: a SandboxPool for TIR; one of `sandbox_workers` workers is started (and closed)
        when None and TIR work is pending.
      sandbox_workers: size of that pool.
      benchmarks_root: the benchmarks directory (default ../shared/benchmarks).
      run_info: extra settings recorded with the run, e.g. {"policy": path, "rm": path};
        "policy" and "rm" must match on resume.
      progress: show tqdm bars.
      verbose: print the summary table.

    Returns:
      The summary: {"k", "metrics", "results" (see `summarize`), "mean" (per mode, over
      sets), "rows", "settings"}, also written to workdir/summary.json.
    """
    modes = _parse_list(modes, "eval.modes")
    _check_args(modes, k, temperature, top_p, max_new_tokens, batch_size)
    if policy_cfg.head != "lm":
        raise ValueError(f"the policy needs head='lm', got {policy_cfg.head!r}")
    problems = _problems(sets, limit, benchmarks_root, seed)
    kinds = (["greedy"] if greedy else []) + (["sampled"] if k > 0 else [])
    if not kinds:
        raise ValueError("nothing to evaluate: eval.greedy is False and eval.k is 0")
    settings = {"k": k, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "max_tool_calls": max_tool_calls,
                "seed": seed, "greedy": greedy, "modes": modes, "sets": list(problems),
                "limit": limit, "batch_size": batch_size, "policy": None,
                "rm": None if rm is None else "given", **(run_info or {})}  # fmt: skip
    fileio.makedirs(workdir)
    path = os.path.join(workdir, ROWS_FILE)
    done = _resume(path, workdir, settings, k, verbose)
    own_pool: list = []

    def pool_factory():
        if pool is not None:
            return pool
        if not own_pool:
            from qmath_jax.sandbox import SandboxPool, across_hosts

            own_pool.append(across_hosts(SandboxPool(sandbox_workers,
                                                     timeout_s=tool_timeout_s)))
        return own_pool[0]

    sampling = _Sampling(
        policy_cfg, params, tokenizer, k, temperature, top_p, max_new_tokens, max_tool_calls,
        tool_timeout_s, max_batch, mesh, seed, pool_factory, _stop_ids(tokenizer),
    )  # fmt: skip
    try:
        for name, probs in problems.items():
            for mode in modes:
                for kind in kinds:
                    todo = [p for p in probs if (name, p["idx"], mode, kind) not in done]
                    _run_units(name, mode, kind, todo, sampling, rm, batch_size, path,
                               progress)  # fmt: skip
    finally:
        for p in own_pool:
            p.close()
    return _write_summary(path, workdir, problems, modes, k, settings, verbose)


def _problems(sets, limit, root, seed) -> dict[str, list[dict]]:
    if isinstance(sets, Mapping):
        out = {}
        for name, probs in sets.items():
            probs = list(probs)
            for p in probs:
                if not {"idx", "question", "answer"} <= set(p) or not isinstance(p["idx"], int):
                    raise ValueError(
                        f"set {name!r}: problem {p!r:.80} needs an int idx, question, answer"
                    )
            out[name] = probs
        return out
    return {name: load_problems(name, root=root, limit=limit, seed=seed)
            for name in _parse_list(sets, "eval.sets")}  # fmt: skip


def _resume(path: str, workdir: str, settings: dict, k: int, verbose: bool) -> set:
    rows, bad = read_rows(path)
    _check_settings(workdir, settings, has_rows=bool(rows))
    done, dropped = complete_units(rows, k)
    if (bad or dropped) and jax.process_index() == 0:
        _rewrite(path, done)  # drop the torn line and incomplete units before appending
    parallel.barrier("eval resumed")  # every host has read the rows before any append
    if (rows or bad) and verbose:
        print(
            f"[eval] resuming {path}: {len(done)} complete units kept, "
            f"{dropped + bad} incomplete rows dropped"
        )
    return set(done)


def _run_units(name, mode, kind, todo, sampling: _Sampling, rm, batch_size, path,
               progress: bool) -> None:  # fmt: skip
    """Samples, grades and scores `todo`, appending each batch's rows to `path` (a whole
    batch per append, so an interrupted run loses at most the batch in flight)."""
    if not todo:
        return
    from tqdm.auto import tqdm

    prompts = sampling.tokenizer.encode_batch([chat.format_prompt(p["question"], mode)
                                               for p in todo])  # fmt: skip
    with tqdm(total=len(todo), desc=f"{name} {mode} {kind}", unit="problem",
              disable=not progress) as bar:  # fmt: skip
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            key = sampling.key(name, mode, kind, int(batch[0]["idx"]))
            responses = sampling.run(prompts[start : start + batch_size], mode, kind, key)
            rows = _grade(name, mode, kind, batch, responses)
            if rm is not None:
                _score(rm, batch, rows, mode)
            if jax.process_index() == 0:  # every host made the same rows: one writes them
                fileio.append_text(path, "".join(_lines(unit_rows) for unit_rows in rows),
                                   encoding="utf-8")
            bar.update(len(batch))


def _grade(name, mode, kind, batch, responses) -> list[list[Row]]:
    rows = []
    for problem, resps in zip(batch, responses):
        unit_rows = []
        for s, resp in enumerate(resps):
            answer = extract_answer(resp.text, dataset=name)
            unit_rows.append({
                "set": name, "idx": problem["idx"], "mode": mode, "kind": kind, "sample": s,
                "text": resp.text, "answer": answer, "gold": problem["answer"],
                "correct": bool(is_equiv(answer, problem["answer"])), "rm_score": None,
                "num_tool_calls": resp.num_tool_calls, "length": resp.length,
                "stop_reason": resp.stop_reason,
            })  # fmt: skip
        rows.append(unit_rows)
    return rows


def _score(rm: RewardScorer, batch, rows: list[list[Row]], mode: str) -> None:
    flat = [(p["question"], r) for p, unit_rows in zip(batch, rows) for r in unit_rows]
    scores = rm.score([q for q, _ in flat], [r["text"] for _, r in flat], [mode] * len(flat))
    for (_, r), s in zip(flat, scores):
        r["rm_score"] = s if math.isfinite(s) else None


def _write_summary(path, workdir, problems, modes, k, settings, verbose) -> dict:
    parallel.barrier("eval rows written")  # host 0 appended the last rows
    rows, _ = read_rows(path)
    wanted = {(name, p["idx"]) for name, probs in problems.items() for p in probs}
    rows = [r for r in rows if (r["set"], r["idx"]) in wanted and r["mode"] in modes]
    results = summarize(rows, k)
    mean = mean_over_sets(results, k)
    summary = {"k": k, "metrics": metric_names(k), "results": results, "mean": mean,
               "rows": len(rows), "settings": settings}  # fmt: skip
    if jax.process_index() == 0:
        fileio.write_text_atomic(os.path.join(workdir, SUMMARY_FILE),
                                 json.dumps(summary, indent=2))
    if verbose:
        print(format_table(results, k, mean if len(results) > 1 else None))
    return summary


# ----------------------------------------------------------------------------- the stage


def _weights_source(init) -> tuple[str, str]:
    if init.hf_dir and init.checkpoint:
        raise ValueError("set one of init.hf_dir and init.checkpoint for the policy, not both")
    if not (init.hf_dir or init.checkpoint):
        raise ValueError(
            "eval needs the policy's weights: set --config.init.hf_dir=DIR (an HF checkpoint) "
            "or --config.init.checkpoint=DIR (a params checkpoint or a run's workdir)"
        )
    return ("hf", init.hf_dir) if init.hf_dir else ("ours", init.checkpoint)


def load_model(kind: str, path: str, mesh, *, dtype: str = "", param_dtype: str = "",
               attention_impl: str = ""):  # fmt: skip
    """(ModelConfig, params) from an HF directory (kind "hf") or one of our checkpoints or
    run workdirs (kind "ours"), placed on `mesh` by their logical axes.

    The architecture comes from the weights; the arguments, when not empty, replace the
    compute dtype, the params' storage dtype and the attention implementation.

    Args:
      kind: "hf" or "ours".
      path: the directory.
      mesh: the mesh, or None (unsharded).
      dtype: compute dtype ("" keeps the checkpoint's).
      param_dtype: storage dtype of the params ("" keeps the checkpoint's).
      attention_impl: attention implementation ("" keeps the checkpoint's).
    """
    from qmath_jax.train import checkpoint as params_ckpt

    overrides = {"remat": "none"}  # inference: nothing to rematerialise
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype),
                        ("attention_impl", attention_impl)):  # fmt: skip
        if value:
            overrides[name] = value
    if kind == "hf":
        from qmath_jax import hf

        return hf.load_on(path, mesh, **overrides)
    saved_cfg, params = params_ckpt.load_params_on(path, mesh)
    if param_dtype:
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    return saved_cfg.replace(**overrides), params


def _tokenizer(cfg, workdir: str):
    from qmath_jax.stages import common

    found = [p for p in (os.path.join(workdir, common.TOKENIZER_FILE), cfg.tokenizer.path,
                         cfg.init.checkpoint, cfg.init.hf_dir)
             if p and fileio.exists(p) and (not fileio.isdir(p) or fileio.exists(
                 os.path.join(p, common.TOKENIZER_FILE)))]  # fmt: skip
    if not found:
        raise FileNotFoundError(
            "eval needs the policy's tokenizer: none in the workdir, tokenizer.path or beside "
            "the init weights; set --config.tokenizer.path=FILE_OR_DIR"
        )
    return common.tokenizer(cfg, workdir)


def run(cfg, workdir: str) -> dict:
    """The eval stage: loads the policy (and RM), evaluates, writes and prints the summary."""
    from qmath_jax.stages import common

    e = cfg.eval
    kind, path = _weights_source(cfg.init)
    if e.rm_checkpoint and e.rm_hf_dir:
        raise ValueError("set one of eval.rm_checkpoint and eval.rm_hf_dir, not both")
    mesh = common.mesh(cfg)
    tok = _tokenizer(cfg, workdir)
    m = cfg.model
    policy_cfg, params = load_model(kind, path, mesh, dtype=m.dtype, param_dtype=m.param_dtype,
                                    attention_impl=m.attention_impl)  # fmt: skip
    if tok.vocab_size > policy_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the policy ({path}) only "
            f"{policy_cfg.vocab_size}: they do not belong together; set tokenizer.path"
        )
    rm, rm_path = None, e.rm_checkpoint or e.rm_hf_dir
    if rm_path:
        rm_cfg, rm_params = load_model("ours" if e.rm_checkpoint else "hf", rm_path, mesh,
                                       dtype=m.dtype, param_dtype=m.param_dtype,
                                       attention_impl=m.attention_impl)  # fmt: skip
        rm = RewardScorer(rm_cfg, rm_params, tok, batch_size=e.rm_batch_size, mesh=mesh)
    sets: Any = e.sets
    if SYNTHETIC in _parse_list(e.sets, "eval.sets"):
        kinds = [x for x in cfg.data.synthetic_kinds.split(",") if x] or None
        sets = {name: load_problems(name, root=e.benchmarks or None, limit=e.limit,
                                    seed=cfg.seed, synthetic_kinds=kinds)
                for name in _parse_list(e.sets, "eval.sets")}  # fmt: skip
    return evaluate(
        policy_cfg, params, tok, sets, e.modes, e.k, workdir=workdir, rm=rm, greedy=e.greedy,
        limit=e.limit, temperature=e.temperature, top_p=e.top_p,
        max_new_tokens=e.max_new_tokens, max_tool_calls=e.max_tool_calls,
        tool_timeout_s=e.tool_timeout_s, batch_size=e.batch_size,
        max_batch=e.max_batch or None, seed=cfg.seed, mesh=mesh,
        sandbox_workers=e.sandbox_workers, benchmarks_root=e.benchmarks or None,
        run_info={"policy": fileio.abspath(path), "rm": fileio.abspath(rm_path) if rm_path
                  else None},
    )  # fmt: skip


__all__ = [
    "RewardScorer",
    "complete_units",
    "evaluate",
    "format_table",
    "load_model",
    "load_problems",
    "mean_over_sets",
    "metric_names",
    "read_rows",
    "run",
    "summarize",
]
