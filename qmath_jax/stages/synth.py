"""The self-improvement data step: sample, verify, vote, pick the RM-best, decontaminate.

For each problem, sample `synth.n` paths (CoT or TIR) from the policy; keep those whose
answer the grader verifies against the gold, or, where a problem has no gold, those that
agree with the reward-weighted majority answer; write the RM-best kept path (or all
kept paths with synth.keep=all) as SFT records {question, response, mode, answer}.
synth.write=rm writes reward-model groups instead: `rm.group_size` sampled responses per
question with grader labels {question, responses, labels, mode}.

Everything written is decontaminated first (13-gram + LCS > 0.6) against the synthetic
test split and the benchmark sets named in synth.decontam_sets; the removed records and
the test items they matched go to <out>.removed.jsonl.

synth.rounds > 1 runs online rejection fine-tuning: synth -> SFT -> synth from the new
model -> ... (each round in workdir/round_<k>).
"""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np

from qmath_jax import fileio, grading, parallel
from qmath_jax.data import chat, decontam, sources
from qmath_jax.sampling import sampler, tir
from qmath_jax.stages import common
from qmath_jax.stages.grpo import problem_source
from qmath_jax.train import checkpoint as params_ckpt


def sample_paths(policy_cfg, params, tok, questions: list[str], *, n: int, mode: str,
                 max_new_tokens: int, temperature: float, top_p: float, key, pool=None,
                 mesh=None) -> list[list[str]]:
    """n response texts per question (CoT: one shared prefill per question; TIR: the loop)."""
    prompts = [tok.encode(chat.format_prompt(q, mode)) for q in questions]
    stop_ids = [i for i in (tok.eos_id, tok.im_end_id) if i is not None]
    if mode == "tir":
        gen = sampler.make_generate_fn(policy_cfg, params, tok, temperature=temperature,
                                       top_p=top_p, key=key, mesh=mesh)
        trajs = tir.run_tir(gen, tok, [p for p in prompts for _ in range(n)],
                            max_new_tokens=max_new_tokens, pool=pool)
        texts = [t.text for t in trajs]
    else:
        outs = sampler.generate(policy_cfg, params, prompts, max_new_tokens,
                                temperature=temperature, top_p=top_p, n=n,
                                stop_token_ids=stop_ids, tokenizer=tok, key=key, mesh=mesh)
        texts = [o.text for o in outs]
    texts = [clean_response(t) for t in texts]
    return [texts[i * n : (i + 1) * n] for i in range(len(questions))]


def clean_response(text: str) -> str:
    """The response without the stop tokens the sampler keeps at its end."""
    for stop in (chat.IM_END, "<|endoftext|>"):
        text = text.split(stop)[0]
    return text


def select(question: str, gold: str | None, paths: list[str], rm_scores=None,
           keep: str = "best") -> tuple[list[int], str | None]:
    """Indices of the paths to keep and the answer they agree on.

    With a gold answer: the verified paths. Without: the paths agreeing with the
    (reward-)weighted majority answer. keep="best" returns only the RM-best of them
    (the first when there is no RM).
    """
    answers = [grading.extract_answer(p) for p in paths]
    if gold is not None:
        ok = [i for i, a in enumerate(answers) if grading.is_equiv(a, gold)]
        agreed = gold
    else:
        weights = list(rm_scores) if rm_scores is not None else [1.0] * len(paths)
        agreed, _ = grading.weighted_vote(answers, [float(np.exp(w)) for w in weights]
                                          if rm_scores is not None else weights)
        ok = [i for i, a in enumerate(answers) if a is not None and agreed is not None
              and grading.is_equiv(a, agreed)]
    if keep == "best" and ok:
        if rm_scores is not None:
            ok = [max(ok, key=lambda i: (rm_scores[i], -i))]
        else:
            ok = ok[:1]
    return ok, agreed


def decontam_sets(cfg) -> dict[str, list[str]]:
    """The test questions training data must not overlap: synthetic test + named sets."""
    sets = {}
    if cfg.synth.decontam_synthetic:
        corpus = common.synthetic_corpus(cfg, "test")
        sets["synthetic_test"] = [corpus[i]["question"] for i in range(cfg.synth.decontam_synthetic)]
    for name in (s for s in cfg.synth.decontam_sets.split(",") if s):
        sets[name] = [r["question"] for r in sources.load_benchmark(name)]
    return sets


def load_problems(cfg) -> list[dict]:
    src = problem_source(cfg.synth.source, cfg)
    count = min(cfg.synth.num_problems, len(src))
    start = cfg.synth.offset
    return [dict(src[(start + i) % len(src)]) for i in range(count)]


def synthesize(cfg, policy_cfg, params, tok, problems: list[dict], out_path: str, rm=None,
               mesh=None) -> dict:
    """Writes SFT (or RM) records for `problems` to out_path; returns the report."""
    s = cfg.synth
    group = cfg.rm.group_size if s.write == "rm" else s.n
    from qmath_jax.sandbox import SandboxPool, across_hosts

    pool = across_hosts(SandboxPool(size=2)) if s.mode == "tir" else None
    records, stats = [], {"problems": len(problems), "kept_problems": 0, "paths": 0,
                          "verified_paths": 0}
    try:
        for start in range(0, len(problems), s.batch_size):
            chunk = problems[start : start + s.batch_size]
            key = jax.random.fold_in(jax.random.key(cfg.seed), start)
            paths = sample_paths(policy_cfg, params, tok, [p["question"] for p in chunk],
                                 n=group, mode=s.mode, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, top_p=s.top_p, key=key, pool=pool,
                                 mesh=mesh)
            for prob, texts in zip(chunk, paths):
                records.extend(_records_for(prob, texts, s, rm, stats))
    finally:
        if pool is not None:
            pool.close()
    kept, removed = decontam.decontaminate(records, decontam_sets(cfg), text_field="question")
    report = {**stats, "records": len(records), "written": len(kept),
              "decontaminated": len(removed), "out": out_path}
    if jax.process_index() == 0:  # every host made the same records: one writes them
        _write_jsonl(out_path, kept)
        _write_jsonl(out_path + ".removed.jsonl", removed)
        fileio.write_text(out_path + ".report.json", json.dumps(report, indent=2))
    parallel.barrier("synth written")  # later stages on other hosts read the file
    return report


def _records_for(prob, texts, s, rm, stats):
    gold = prob.get("answer")
    stats["paths"] += len(texts)
    if s.write == "rm":
        labels = [int(grading.is_equiv(grading.extract_answer(t), gold)) for t in texts]
        stats["verified_paths"] += sum(labels)
        if s.reference_positive and not any(labels) and prob.get("solution"):
            # A weak policy rarely answers right; the reference solution gives the group
            # its positive so the RM still learns to rank (counted in the report).
            texts, labels = texts[:-1] + [prob["solution"]], labels[:-1] + [1]
            stats["reference_positives"] = stats.get("reference_positives", 0) + 1
        stats["kept_problems"] += int(0 < sum(labels) < len(labels))
        # `mode` renders the group as it was sampled (the system prompt of its mode), as
        # the RM will score it in GRPO, synth and eval
        return [{"question": prob["question"], "responses": texts, "labels": labels,
                 "answer": gold, "mode": s.mode}]
    scores = (rm.score([prob["question"]] * len(texts), texts, [s.mode] * len(texts))
              if rm is not None else None)
    chosen, agreed = select(prob["question"], gold, texts, scores, keep=s.keep)
    stats["verified_paths"] += len(chosen)
    stats["kept_problems"] += int(bool(chosen))
    return [{"question": prob["question"], "response": texts[i], "mode": s.mode,
             "answer": agreed} for i in chosen]


def _write_jsonl(path: str, rows) -> None:
    fileio.makedirs(os.path.dirname(fileio.abspath(path)))
    fileio.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _load_rm(cfg, tok, mesh=None):
    if not cfg.synth.rm_checkpoint:
        return None
    from qmath_jax.stages.evaluate import RewardScorer

    rm_cfg, rm_params = params_ckpt.load_params_on(cfg.synth.rm_checkpoint, mesh)
    return RewardScorer(rm_cfg, rm_params, tok, mesh=mesh)


def run(cfg, workdir: str):
    if not cfg.init.checkpoint and not cfg.init.hf_dir:
        raise ValueError("synth needs a policy: set init.checkpoint (a run's workdir) or "
                         "init.hf_dir")
    if cfg.synth.rounds > 1:
        return rejection_finetune(cfg, workdir)
    tok = common.tokenizer(cfg, workdir)
    mesh = common.mesh(cfg)  # the policy and the RM sharded over all devices of all hosts
    policy_cfg, params = _policy(cfg, mesh)
    out = cfg.synth.out or os.path.join(workdir, f"synth_{cfg.synth.write}.jsonl")
    report = synthesize(cfg, policy_cfg, params, tok, load_problems(cfg), out,
                        rm=_load_rm(cfg, tok, mesh), mesh=mesh)
    print(f"[synth] {json.dumps(report)}")
    return report


def _policy(cfg, mesh=None):
    if cfg.init.checkpoint:
        return params_ckpt.load_params_on(cfg.init.checkpoint, mesh)
    from qmath_jax import hf

    return hf.load_on(cfg.init.hf_dir, mesh)


def rejection_finetune(cfg, workdir: str) -> list[dict]:
    """Online RFT: each round synthesises with the latest model, then fine-tunes on it."""
    from qmath_jax.stages import sft

    reports, policy = [], cfg.init.checkpoint
    for k in range(cfg.synth.rounds):
        round_dir = os.path.join(workdir, f"round_{k}")
        rcfg = copy.deepcopy(cfg)
        with rcfg.unlocked():
            rcfg.synth.rounds = 1
            rcfg.init.checkpoint = policy
            rcfg.synth.offset = cfg.synth.offset + k * cfg.synth.num_problems
            rcfg.synth.out = os.path.join(round_dir, "synth_sft.jsonl")
        reports.append(run(rcfg, round_dir))
        scfg = copy.deepcopy(rcfg)
        with scfg.unlocked():
            scfg.stage = "sft"
            scfg.data.sources = rcfg.synth.out
        sft.run(scfg, os.path.join(round_dir, "sft"))
        policy = os.path.join(round_dir, "sft")
    return reports
