"""The end-to-end demo: every stage of the report, in small, on the synthetic corpus.

pretrain -> SFT (CoT + TIR) -> RM data (the SFT model's own samples, graded) and RM ->
GRPO (shaped reward with that RM) -> a synth round (verified, RM-best, decontaminated
paths of the GRPO model) and SFT on it -> evaluation of each stage's model (greedy,
maj@k, RM@k; CoT and TIR) -> HF export, checked by reloading it in `transformers` and
decoding the same greedy tokens.

Each sub-run lives in workdir/<stage>/ and resumes, so an interrupted demo picks up
where it stopped. The final table is workdir/demo_summary.json and demo_summary.png.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np

from qmath_jax.stages import common

STAGES = ("pretrain", "sft", "rm_data", "rm", "grpo", "synth", "rft", "eval", "export")


def _sub(cfg, stage: str, **sections):
    """A copy of the demo config for one stage with some sections changed."""
    sub = copy.deepcopy(cfg)
    with sub.unlocked():
        sub.stage = stage
        for section, values in sections.items():
            for key, value in values.items():
                sub[section][key] = value
    return sub


def _stage(name: str, path: str, fn, seconds: dict):
    """Runs one stage unless workdir/<stage>/DONE says it finished; returns its info."""
    done = os.path.join(path, "DONE")
    if os.path.exists(done):
        print(f"[demo] {name}: done earlier ({path})")
        with open(done) as f:
            record = json.load(f)
    else:
        t0 = time.time()
        print(f"[demo] {name} ...", flush=True)
        record = {"info": fn() or {}, "seconds": round(time.time() - t0, 1)}
        os.makedirs(path, exist_ok=True)
        with open(done, "w") as f:
            json.dump(record, f)
        print(f"[demo] {name}: {record['seconds']} s", flush=True)
    seconds[name] = record["seconds"]
    return record["info"]


def run(cfg, workdir: str):
    from qmath_jax.stages import grpo, pretrain, reward_model, sft, synth

    d = cfg.demo
    os.makedirs(workdir, exist_ok=True)
    tok = common.tokenizer(cfg, workdir)  # one tokenizer for every stage
    tok_path = os.path.join(workdir, common.TOKENIZER_FILE)
    shared = {"tokenizer": {"path": tok_path}}
    dirs = {s: os.path.join(workdir, s) for s in STAGES}
    times: dict = {}

    def stage(name, path, fn):
        return _stage(name, path, fn, times)

    stage("pretrain", dirs["pretrain"], lambda: pretrain.run(
        _sub(cfg, "pretrain", train=d.pretrain, **shared), dirs["pretrain"]) and None)
    stage("sft", dirs["sft"], lambda: sft.run(
        _sub(cfg, "sft", train=d.sft, init={"checkpoint": dirs["pretrain"]}, **shared),
        dirs["sft"]) and None)

    rm_data = os.path.join(dirs["rm_data"], "groups.jsonl")
    rm_eval = os.path.join(dirs["rm_data"], "held_out.jsonl")

    def make_rm_data():
        os.makedirs(dirs["rm_data"], exist_ok=True)
        reports = {}
        for path, split, count in ((rm_data, "train", d.rm_problems),
                                   (rm_eval, "test", d.rm_held_out_problems)):
            held_out = split == "test"  # scored as sampled: no reference positives
            scfg = _sub(cfg, "synth", init={"checkpoint": dirs["sft"]}, **shared,
                        synth={**d.synth, "write": "rm", "num_problems": count, "out": path,
                               "temperature": d.rm_temperature, "top_p": 1.0,
                               "mode": d.rm_mode, "decontam_synthetic": 0 if held_out else 2000,
                               "reference_positive": d.synth.reference_positive
                               and not held_out})
            reports[split] = synth.synthesize(
                scfg, *synth._policy(scfg), tok, _problems(scfg, split, count, mode=d.rm_mode), path)
        return {"train": reports["train"], "held_out": reports["test"]}

    stage("rm data", dirs["rm_data"], make_rm_data)
    rm_held_out = stage("rm", dirs["rm"], lambda: _rm_report(reward_model.run(
        _sub(cfg, "rm", train=d.rm, init={"checkpoint": dirs["sft"]}, data={"sources": rm_data},
             rm={"eval_source": rm_eval}, **shared), dirs["rm"]), dirs["rm"]))
    stage("grpo", dirs["grpo"], lambda: grpo.run(
        _sub(cfg, "grpo", train=d.grpo_train, grpo={**d.grpo, "rm_checkpoint": dirs["rm"]},
             init={"checkpoint": dirs["sft"]}, **shared), dirs["grpo"]) and None)

    synth_out = os.path.join(dirs["synth"], "paths.jsonl")

    def synth_round():
        os.makedirs(dirs["synth"], exist_ok=True)
        reports = {}
        for mode in d.synth_modes.split(","):
            scfg = _sub(cfg, "synth", init={"checkpoint": dirs["grpo"]}, **shared,
                        synth={**d.synth, "write": "sft", "mode": mode,
                               "num_problems": d.synth_problems, "offset": 10_000,
                               "rm_checkpoint": dirs["rm"], "out": f"{synth_out}.{mode}"})
            reports[mode] = synth.synthesize(scfg, *synth._policy(scfg), tok,
                                             _problems(scfg, "train", d.synth_problems, 10_000, mode),
                                             f"{synth_out}.{mode}", rm=synth._load_rm(scfg, tok))
        with open(synth_out, "w") as out:
            for mode in d.synth_modes.split(","):
                with open(f"{synth_out}.{mode}") as part:
                    out.write(part.read())
        return reports

    stage("synth", dirs["synth"], synth_round)

    def rft():
        # The next round's SFT data is the original mix plus the new verified paths (as
        # in the report); a round that verified nothing trains on the original mix alone.
        with open(synth_out) as f:
            new_paths = sum(1 for _ in f)
        # About one pass over the new paths in this round (one example per packed row);
        # a few dozen paths repeated for a whole round get memorised, answers included.
        share = min(d.rft_new_paths_share, new_paths / (d.rft.steps * d.rft.batch_size))
        sources = (f"synthetic={1 - share},{synth_out}={share}" if new_paths else "synthetic")
        sft.run(_sub(cfg, "sft", train=d.rft, init={"checkpoint": dirs["grpo"]},
                     data={"sources": sources}, **shared), dirs["rft"])
        return {"synth_paths": new_paths, "new_paths_share": share}

    stage("rft", dirs["rft"], rft)

    table = stage("eval", dirs["eval"], lambda: evaluate_stages(cfg, tok, dirs))
    check = stage("export", dirs["export"], lambda: export_and_check(dirs["rft"], tok,
                                                                        dirs["export"]))
    summary = {"table": table, "rm_held_out": rm_held_out, "export_check": check,
               "stage_seconds": times}
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_demo_table(table))
    _plot_summary(table, os.path.join(workdir, "demo_summary.png"))
    print(f"[demo] RM on held-out groups of the SFT model's samples: {rm_held_out}")
    print(f"[demo] export check: {check}")
    return summary


def _problems(cfg, split: str, count: int, offset: int = 0, mode: str = "cot") -> list[dict]:
    """Corpus problems; `solution` is the reference written in `mode` (cot or tir)."""
    corpus = common.synthetic_corpus(cfg, split)
    rows = [corpus[offset + i] for i in range(count)]
    return [{"idx": offset + i, "question": r["question"], "answer": r["answer"],
             "kind": r["kind"], "solution": r[mode]} for i, r in enumerate(rows)]


def _rm_report(state, rm_dir):
    path = os.path.join(rm_dir, "rm_eval.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def evaluate_stages(cfg, tok, dirs) -> dict:
    """Greedy / maj@k / RM@k, CoT and TIR, of each stage's model on held-out problems."""
    from qmath_jax.stages import evaluate
    from qmath_jax.train import checkpoint

    d = cfg.demo
    test = _problems(cfg, "test", d.eval_problems)
    by_kind = {}
    for p in test:
        by_kind.setdefault(p["kind"], []).append(p)
    rm_cfg, rm_params = checkpoint.load_params(dirs["rm"])
    rm = evaluate.RewardScorer(rm_cfg, rm_params, tok)
    table = {}
    for stage in ("sft", "grpo", "rft"):
        policy_cfg, params = checkpoint.load_params(dirs[stage])
        summary = evaluate.evaluate(
            policy_cfg, params, tok, by_kind, modes=("cot", "tir"), k=d.eval_k,
            workdir=os.path.join(dirs["eval"], stage), rm=rm, temperature=d.eval_temperature,
            top_p=d.eval_top_p,
            max_new_tokens=d.eval_max_new_tokens, batch_size=64, seed=cfg.seed,
            progress=False, verbose=False)
        table[stage] = summary["results"]
    return table


def format_demo_table(table: dict) -> str:
    lines = []
    for stage, results in table.items():
        lines.append(f"== {stage}")
        for kind, modes in results.items():
            for mode, m in modes.items():
                cells = "  ".join(f"{k}={_pct(v)}" for k, v in m.items()
                                  if k.startswith(("greedy", "maj@", "rm@", "pass@")))
                lines.append(f"  {kind:10s} {mode:4s} {cells}")
    return "\n".join(lines)


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def _plot_summary(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(stage, kind, mode, m) for stage, r in table.items() for kind, ms in r.items()
            for mode, m in ms.items()]
    keys = [k for k in ("greedy", "maj@8", "rm@8") if any(k in r[3] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 3.5))
    width = 0.8 / max(len(keys), 1)
    for j, key in enumerate(keys):
        ax.bar(np.arange(len(rows)) + j * width, [r[3].get(key) or 0 for r in rows], width,
               label=key)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}\n{k}\n{m}" for s, k, m, _ in rows], fontsize=7)
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def export_and_check(checkpoint_dir: str, tok, out_dir: str) -> dict:
    """Exports to HF, reloads with transformers and compares greedy tokens with ours."""
    import torch
    import transformers

    from qmath_jax import hf
    from qmath_jax.data import chat
    from qmath_jax.sampling import sampler
    from qmath_jax.train import checkpoint

    cfg, params = checkpoint.load_params(checkpoint_dir)
    hf.save(cfg, params, out_dir, tokenizer=tok)
    model = transformers.Qwen2ForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    model.eval()
    questions = ["What is $12 + 30$?", "Compute $123 \\times 45$."]
    prompts = [tok.encode(chat.format_prompt(q, "cot")) for q in questions]
    ours = sampler.generate(cfg.replace(dtype="float32"), params, prompts, 32)
    same = []
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32, pad_token_id=tok.pad_id)
        theirs = ref[0, len(p):].tolist()
        same.append(theirs == o.tokens[: len(theirs)])
    if not all(same):
        raise AssertionError(f"transformers' greedy tokens differ from ours: {same}")
    return {"hf_dir": out_dir, "prompts": len(prompts), "same_greedy_tokens": all(same)}
