"""GRPO: sample G responses per query from the current policy (CoT or TIR), score them
with the rule verifier r_v and the reward model r_m, shape r = sigmoid(0.5 r_m) + (r_v - 1),
normalise advantages within each group, and optimise the clipped-ratio objective with a
KL penalty to the frozen reference (the initial policy).

The policy, the reference and the RM live on one mesh; only the policy has optimizer
state. `train.steps` counts rollout iterations; each runs `grpo.passes` passes of
mini-batches of `grpo.mini_batch` sequences. Iteration i samples with
fold_in(key(seed), i), so a resumed run repeats the same rollouts.

Without an RM (grpo.rm_checkpoint empty) the reward is the verifier alone.

Legend: N sequences (queries x G), T sequence length, G group size.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qmath_jax import fileio, grading, parallel
from qmath_jax.data import chat, pipelines, sources
from qmath_jax.model import Transformer
from qmath_jax.sampling import sampler, tir
from qmath_jax.stages import common
from qmath_jax.train import checkpoint as params_ckpt
from qmath_jax.train import rl_losses
from qmath_jax.train.losses import token_entropy, token_logprobs

# -------------------------------------------------------------------------- data


class SyntheticProblems:
    """The synthetic corpus as RL prompts with gold answers."""

    def __init__(self, corpus, size: int = 1_000_000):
        self.corpus, self.size = corpus, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        p = self.corpus[int(index) % len(self.corpus)]
        return {"question": p["question"], "answer": p["answer"], "solution": p["cot"],
                "idx": int(index)}


def problem_source(spec: str, cfg, split: str = "train"):
    """`synthetic`, `bench:NAME` (a set in ../shared/benchmarks) or a file of
    {question, answer} records."""
    if spec == "synthetic":
        return SyntheticProblems(common.synthetic_corpus(cfg, split))
    if spec.startswith("bench:"):
        return sources.load_benchmark(spec[len("bench:"):])
    return sources.open_source(spec, required=("question", "answer"))


def prompt_dataset(cfg, tok, source=None):
    mode = cfg.grpo.mode
    return pipelines.rl_dataset(
        source if source is not None else problem_source(cfg.data.sources, cfg), tok, batch_size=cfg.grpo.prompts_per_step,
        max_prompt_len=cfg.grpo.max_prompt_len,
        prompt_fn=lambda r: chat.format_prompt(r["question"], mode), seed=cfg.seed,
        num_threads=cfg.data.num_threads,
        shard_index=0, shard_count=1,  # every host rolls out the same (global) queries
    )


# -------------------------------------------------------------------------- rollout


def rollout(cfg, policy_cfg, params, tok, prompt_ids, key, mesh, pool=None, n=None):
    """n (default G) responses per prompt: (tokens, model-token mask, tool calls, texts),
    prompt-major."""
    g = cfg.grpo
    n = n or g.group_size
    stop_ids = [i for i in (tok.eos_id, tok.im_end_id) if i is not None]
    if g.mode == "tir":
        generate_fn = sampler.make_generate_fn(policy_cfg, params, tok, temperature=g.temperature,
                                               top_p=g.top_p, key=key, mesh=mesh)
        repeated = [p for p in prompt_ids for _ in range(n)]
        trajs = tir.run_tir(generate_fn, tok, repeated, max_new_tokens=g.max_new_tokens,
                            max_tool_calls=g.max_tool_calls, pool=pool)
        return ([t.tokens for t in trajs], [t.loss_mask for t in trajs],
                [t.num_tool_calls for t in trajs], [t.text for t in trajs])
    outs = sampler.generate(policy_cfg, params, prompt_ids, g.max_new_tokens,
                            temperature=g.temperature, top_p=g.top_p, n=n,
                            stop_token_ids=stop_ids, tokenizer=tok, key=key, mesh=mesh)
    return ([o.tokens for o in outs], [[1] * len(o.tokens) for o in outs], [0] * len(outs),
            [o.text for o in outs])


def verifier_rewards(texts: list[str], golds: list[str]) -> np.ndarray:
    """r_v in {0, 1}: the boxed (or last) answer equals the gold answer."""
    return np.array([float(grading.is_equiv(grading.extract_answer(t), g))
                     for t, g in zip(texts, golds)], np.float32)


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], masks: list[list[int]],
                   seq_len: int, pad_id: int) -> dict:
    """Right-padded [N, T] arrays of prompt + response with next-token targets; the loss
    mask covers the model-written response tokens (executor tokens masked)."""
    n = len(responses)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((n, seq_len), np.int32)
    segment_ids = np.zeros((n, seq_len), np.int32)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        row = (list(p) + list(r))[:seq_len]
        tokens[i, : len(row)] = row
        segment_ids[i, : len(row)] = 1
        # position t predicts token t + 1: response token j sits at len(p) + j
        for j, keep in enumerate(m):
            t = len(p) + j - 1
            if keep and 0 <= t < seq_len - 1 and len(p) + j < seq_len:
                loss_mask[i, t] = 1
    targets = np.concatenate([tokens[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions * segment_ids}


# -------------------------------------------------------------------------- loss


def grpo_loss_fn(model: Transformer, g):
    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                             batch["segment_ids"])
        logp = token_logprobs(logits, batch["targets"])
        total, aux = rl_losses.grpo_loss(
            logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
            clip_eps=g.clip_eps, kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
            aggregation=g.aggregation)
        aux["entropy"] = rl_losses.aggregate(token_entropy(logits), batch["loss_mask"],
                                             g.aggregation)[0]
        return total, aux

    return loss_fn


def logprob_fn(model: Transformer):
    @jax.jit
    def fn(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                             batch["segment_ids"])
        return token_logprobs(logits, batch["targets"])

    return fn


# -------------------------------------------------------------------------- RM


def load_rm(cfg, tok, mesh):
    if not cfg.grpo.rm_checkpoint:
        return None
    from qmath_jax.stages.evaluate import RewardScorer

    rm_cfg, rm_params = params_ckpt.load_params_on(cfg.grpo.rm_checkpoint, mesh)
    return RewardScorer(rm_cfg, rm_params, tok, mesh=mesh)


def rm_scores(rm, tok, prompt_ids: list[list[int]], texts: list[str]) -> np.ndarray:
    """RM scores of prompt + response rows, rendered as the RM stage trains on them."""
    from qmath_jax.stages.synth import clean_response

    targets = tok.encode_batch([clean_response(t) + chat.IM_END + "\n" for t in texts])
    return np.asarray(rm.score_ids([list(p) + t for p, t in zip(prompt_ids, targets)]),
                      np.float32)


# -------------------------------------------------------------------------- loop


def updates_per_rollout(g) -> int:
    n = g.prompts_per_step * g.group_size
    if n % g.mini_batch:
        raise ValueError(f"grpo.mini_batch={g.mini_batch} must divide prompts_per_step x "
                         f"group_size = {n}")
    return (n // g.mini_batch) * g.passes


def run(cfg, workdir: str):
    g = cfg.grpo
    tok = common.tokenizer(cfg, workdir)
    policy_cfg = common.model_config(cfg, vocab_size=tok.vocab_size)
    mesh = common.mesh(cfg)
    parallel.check_batch(g.mini_batch, mesh)
    per_rollout = updates_per_rollout(g)
    opt_cfg = cfg.copy_and_resolve_references()
    with opt_cfg.unlocked():
        opt_cfg.train.steps = cfg.train.steps * per_rollout
    model = Transformer(policy_cfg, mesh=mesh)
    trainer = common.make_trainer(opt_cfg, workdir, model, grpo_loss_fn(model, g), mesh, "grpo")
    state, data_state = trainer.restore_latest()
    reference = common.initial_params(cfg, policy_cfg, trainer.state_shardings.params)
    from qmath_jax.sandbox import SandboxPool, across_hosts

    pool = across_hosts(SandboxPool(size=2)) if g.mode == "tir" else None
    queries = None
    if g.filter_n:
        init = reference if reference is not None else trainer.init_state().params
        queries = filtered_queries(cfg, policy_cfg, init, tok, workdir, mesh, pool)
    prompts_it = iter(prompt_dataset(cfg, tok, queries))
    if state is None:
        state = trainer.init_state(reference)
        start = 0
    else:
        prompts_it.set_state(data_state["prompts"])
        start = data_state["iteration"]
        print(f"[grpo] resumed at iteration {start} in {workdir}")
    if reference is None:  # random init: the reference is the deterministic initial policy
        reference = trainer.init_state().params
    rm = load_rm(cfg, tok, mesh)
    logp = logprob_fn(model)
    seq_len = g.max_prompt_len + g.max_new_tokens
    try:
        for it in range(start, cfg.train.steps):
            batch = next(prompts_it)
            state, record = iteration(cfg, it, state, batch, trainer, policy_cfg, tok, reference,
                                      rm, logp, seq_len, mesh, pool)
            trainer.logger.write(it + 1, record)
            print(f"[grpo] iteration {it + 1}: " + json.dumps(
                {k: round(v, 4) for k, v in record.items()}))
            data = {"prompts": prompts_it.get_state(), "iteration": it + 1}
            every = cfg.train.checkpoint_every_steps
            if it + 1 == cfg.train.steps or (every and (it + 1) % every == 0):
                trainer.save(state, data, force=True)
    finally:
        if pool is not None:
            pool.close()
        trainer.manager.wait_until_finished()
        trainer.logger.flush()  # rows a bucket workdir still holds back
    trainer.logger.plot()
    return state


def iteration(cfg, it, state, batch, trainer, policy_cfg, tok, reference, rm, logp, seq_len,
              mesh, pool):
    """One rollout and its policy updates; returns the new state and the metrics."""
    g = cfg.grpo
    key = jax.random.fold_in(jax.random.key(cfg.seed), it)
    prompt_ids = [list(p) for p in batch["prompt_ids"]]
    t0 = time.perf_counter()
    responses, masks, tool_calls, texts = rollout(cfg, policy_cfg, state.params, tok,
                                                  prompt_ids, key, mesh, pool)
    rollout_s = time.perf_counter() - t0
    golds = [a for a in batch["answers"] for _ in range(g.group_size)]
    r_v = verifier_rewards(texts, golds)
    prompts_rep = [p for p in prompt_ids for _ in range(g.group_size)]
    if rm is not None:
        r_m = rm_scores(rm, tok, prompts_rep, texts)
        rewards = np.asarray(rl_losses.shaped_reward(r_m, r_v))
    else:
        r_m, rewards = np.zeros_like(r_v), r_v
    adv = np.asarray(rl_losses.group_advantages(jnp.asarray(rewards).reshape(-1, g.group_size)))
    seqs = pack_sequences(prompts_rep, responses, masks, seq_len, tok.pad_id)
    seqs["advantages"] = adv.reshape(-1).astype(np.float32)
    t1 = time.perf_counter()
    with jax.set_mesh(mesh), parallel.axis_rules():
        seqs["old_logp"] = parallel.fetch(logp(state.params, seqs))
        seqs["ref_logp"] = parallel.fetch(logp(reference, seqs))
    metrics = []
    order_key = jax.random.fold_in(key, 1)
    n = len(responses)
    for p in range(g.passes):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, p), n))
        for start in range(0, n, g.mini_batch):
            idx = order[start : start + g.mini_batch]
            idx = idx[parallel.host_rows(len(idx))]  # every host holds the whole rollout
            state, m = trainer.step(state, {k: v[idx] for k, v in seqs.items()})
            metrics.append(m)
    metrics = jax.device_get(metrics)
    update_s = time.perf_counter() - t1
    lengths = [len(r) for r in responses]
    return state, {
        "reward": float(np.mean(rewards)), "accuracy": float(np.mean(r_v)),
        "rm_score": float(np.mean(r_m)),
        "loss": float(np.mean([m["loss"] for m in metrics])),
        "kl": float(np.mean([m["kl"] for m in metrics])),
        "clip_fraction": float(np.mean([m["clip_fraction"] for m in metrics])),
        "entropy": float(np.mean([m["entropy"] for m in metrics])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
        "response_length": float(np.mean(lengths)), "tool_calls": float(np.mean(tool_calls)),
        "rollout_s": rollout_s, "update_s": update_s,
        "zero_std_groups": float(np.mean(np.all(adv == 0, axis=1))),
    }


# -------------------------------------------------------------------------- query filter


QUERIES_FILE = "queries.jsonl"  # the filter's kept queries, in the GRPO workdir
FILTER_REPORT = "query_filter.json"
_FILTER_STREAM = 2**31 - 1  # fold_in index of the filter's samples (iterations use 0, 1, ...)


def keep_range(spec: str) -> tuple[int, int]:
    """'2,5' -> (2, 5): the inclusive range of correct samples a kept query has."""
    try:
        lo, hi = (int(x) for x in str(spec).split(","))
    except ValueError:
        raise ValueError(f"grpo.filter_keep={spec!r}: write it as 'LOW,HIGH', e.g. '2,5'")
    return lo, hi


def filter_queries(cfg, policy_cfg, params, tok, problems: list[dict], key, mesh=None,
                   pool=None) -> tuple[list[dict], list[int]]:
    """The report's RL query filter: sample grpo.filter_n answers per problem from the
    starting policy (CoT or TIR, as the rollouts), keep problems whose number of verified
    answers lies in grpo.filter_keep (inclusive; the report keeps 2..5 of 8).

    Returns (kept problems, correct count per problem).
    """
    g = cfg.grpo
    lo, hi = keep_range(g.filter_keep)
    n = g.filter_n
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"grpo.filter_keep={g.filter_keep!r} must lie in 0..filter_n={n}")
    counts: list[int] = []
    chunk = max(1, g.prompts_per_step)
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        prompt_ids = [tok.encode(chat.format_prompt(p["question"], g.mode)) for p in part]
        texts = rollout(cfg, policy_cfg, params, tok, prompt_ids,
                        jax.random.fold_in(key, start), mesh, pool, n=n)[3]
        golds = [p["answer"] for p in part for _ in range(n)]
        counts += [int(c) for c in verifier_rewards(texts, golds).reshape(len(part), n).sum(1)]
    kept = [p for p, c in zip(problems, counts) if lo <= c <= hi]
    return kept, counts


def filtered_queries(cfg, policy_cfg, params, tok, workdir: str, mesh, pool) -> list[dict]:
    """Screens grpo.filter_problems queries of data.sources once (a restarted run reads the
    kept ones back from workdir/queries.jsonl) and returns the kept ones."""
    g = cfg.grpo
    path = os.path.join(workdir, QUERIES_FILE)
    if fileio.exists(path):
        with fileio.open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    source = problem_source(cfg.data.sources, cfg)
    count = min(len(source), g.filter_problems) if g.filter_problems else len(source)
    problems = [{"question": source[i]["question"], "answer": str(source[i]["answer"])}
                for i in range(count)]
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(cfg.seed), _FILTER_STREAM)
    kept, counts = filter_queries(cfg, policy_cfg, params, tok, problems, key, mesh, pool)
    report = {"screened": len(problems), "kept": len(kept), "keep": g.filter_keep,
              "samples_per_query": g.filter_n,
              "correct_histogram": {str(c): counts.count(c) for c in range(g.filter_n + 1)},
              "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[grpo] query filter: {json.dumps(report)}")
    if not kept:
        raise ValueError(
            f"the query filter kept none of {len(problems)} queries (correct answers per "
            f"query: {report['correct_histogram']}); widen grpo.filter_keep, screen more "
            "(grpo.filter_problems) or set grpo.filter_n=0 to train on every query")
    if jax.process_index() == 0:
        fileio.makedirs(workdir)
        fileio.write_text(os.path.join(workdir, FILTER_REPORT), json.dumps(report, indent=2))
        fileio.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def write_jsonl(path: str, rows) -> None:
    fileio.makedirs(os.path.dirname(fileio.abspath(path)))
    fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# -------------------------------------------------------------------------- AOT


def _abstract_params(model_cfg, mesh, dtype=None):
    from qmath_jax.model.transformer import param_axes

    shardings = parallel.logical_to_sharding(param_axes(model_cfg), mesh)
    from qmath_jax.model import init_params

    shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s),
                        shapes, shardings)


def compile_targets(cfg, mesh):
    """The GRPO run's programs with abstract, sharded arguments, for `--compile_only`.

    Each program takes everything that stays resident on the mesh while it runs (the
    policy's train state, the frozen reference, the RM), so its memory report is the
    stage's real footprint: the policy update, the reference log-probs, the RM scoring and
    one rollout decode step over the full KV cache of the rollout batch.
    """
    from qmath_jax.model import init_cache
    from qmath_jax.model.transformer import CACHE_AXES
    from qmath_jax.train import trainer as trainer_lib

    g = cfg.grpo
    policy_cfg = common.model_config(cfg)
    rm_cfg = policy_cfg.replace(head="rm")
    model = Transformer(policy_cfg, mesh=mesh)
    opt_cfg = cfg.copy_and_resolve_references()
    with opt_cfg.unlocked():
        opt_cfg.train.steps = cfg.train.steps * updates_per_rollout(g)

    def init_fn():
        tokens = np.zeros((1, 8), np.int32)
        return model.init(jax.random.key(cfg.seed), tokens, tokens, tokens + 1)["params"]

    built = trainer_lib.build_step(mesh, init_fn, grpo_loss_fn(model, g),
                                   common.optim_config(opt_cfg), seed=cfg.seed)
    reference = _abstract_params(policy_cfg, mesh, jnp.dtype(policy_cfg.dtype))
    rm_params = _abstract_params(rm_cfg, mesh, jnp.dtype(rm_cfg.dtype))
    seq_len = g.max_prompt_len + g.max_new_tokens
    rows = parallel.batch_sharding(mesh, 2)

    def batch_of(n):
        ints = {k: jax.ShapeDtypeStruct((n, seq_len), jnp.int32, sharding=rows)
                for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        floats = {k: jax.ShapeDtypeStruct((n, seq_len), jnp.float32, sharding=rows)
                  for k in ("old_logp", "ref_logp")}
        adv = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=parallel.batch_sharding(mesh, 1))
        return {**ints, **floats, "advantages": adv}

    def update(state, ref, rm_p, batch):
        return built.step(state, batch)

    logp = logprob_fn(model)

    def reference_logprobs(state, ref, rm_p, batch):
        return logp(ref, batch)

    from qmath_jax.stages.reward_model import scores_at_last_token

    rm_model = Transformer(rm_cfg, mesh=mesh)

    def rm_score(state, ref, rm_p, batch):
        group = {k: batch[k][:, None] for k in ("tokens", "positions", "segment_ids")}
        group["last_index"] = jnp.sum(batch["segment_ids"], axis=1)[:, None] - 1
        return scores_at_last_token(rm_model, rm_p, group)

    rollout_rows = g.prompts_per_step * g.group_size
    cache_shapes = jax.eval_shape(lambda: init_cache(policy_cfg, rollout_rows, seq_len))
    from jax.sharding import PartitionSpec

    cache_shardings = parallel.logical_to_sharding(
        {k: PartitionSpec(*axes) for k, axes in CACHE_AXES.items()}, mesh)
    split = {"k": [jax.ShapeDtypeStruct(cache_shapes["k"].shape[1:], cache_shapes["k"].dtype,
                                        sharding=_drop_layer(cache_shardings["k"], mesh))]
             * policy_cfg.num_layers,
             "end": jax.ShapeDtypeStruct((rollout_rows,), jnp.int32,
                                         sharding=cache_shardings["end"])}
    split["v"] = list(split["k"])
    tokens_B = jax.ShapeDtypeStruct((rollout_rows,), jnp.int32, sharding=cache_shardings["end"])

    def rollout_step(state, ref, rm_p, tokens, cache):
        return sampler.decode_step(policy_cfg, state.params, tokens, cache, mesh)

    common_args = (built.abstract_state, reference, rm_params)
    jit = jax.jit
    return [
        ("grpo_update", jit(update, donate_argnums=0, keep_unused=True),
         common_args + (batch_of(g.mini_batch),)),
        ("reference_logprobs", jit(reference_logprobs, keep_unused=True),
         common_args + (batch_of(g.mini_batch),)),
        ("rm_score", jit(rm_score, keep_unused=True), common_args + (batch_of(g.mini_batch),)),
        ("rollout_decode_step", jit(rollout_step, keep_unused=True, donate_argnums=4),
         common_args + (tokens_B, split)),
    ]


def _drop_layer(sharding, mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*sharding.spec[1:]))
