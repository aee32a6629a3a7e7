"""Reward model: the SFT model with the Qwen2.5-Math-RM head, listwise ranking loss.

Data: JSONL (or any source) records {"question", "responses": [6 str], "labels": [6 0/1]}
and optionally "mode" (cot / tir: the system prompt the group is rendered under, as the RM
scores it later; default cot), as the synth stage's RM variant writes them; groups all correct or all wrong are dropped
and counted. The score of a response is the RM head at its last token.

init.checkpoint / init.hf_dir name the SFT model: its trunk is copied, the head starts
random. Held-out metrics (pair accuracy, how often the top-scored answer is correct) are
computed on data.eval_source when given.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from qmath_jax import fileio, parallel
from qmath_jax.data import pipelines, sources
from qmath_jax.model import Transformer, init_params
from qmath_jax.stages import common
from qmath_jax.train import checkpoint as params_ckpt
from qmath_jax.train.rl_losses import listwise_rm_loss

TRUNK = ("embedding", "layers", "final_norm")


def scores_at_last_token(model: Transformer, params, batch) -> jax.Array:
    """RM scores [B, G] read at each response's last token."""
    b, g, t = batch["tokens"].shape
    flat = {k: batch[k].reshape(b * g, t) for k in ("tokens", "positions", "segment_ids")}
    scores_NT = model.apply({"params": params}, flat["tokens"], flat["positions"],
                            flat["segment_ids"])
    last_N = batch["last_index"].reshape(b * g)
    return jnp.take_along_axis(scores_NT, last_N[:, None], axis=1)[:, 0].reshape(b, g)


def rm_loss(model: Transformer):
    def loss_fn(params, batch, rng):
        return listwise_rm_loss(scores_at_last_token(model, params, batch), batch["labels"])

    return loss_fn


def dataset(cfg, tok, source_spec: str, *, shuffle=True, num_epochs=None, drop_remainder=True,
            every_host_all=False):
    """RM batches; each host reads its own shard, or with `every_host_all` all of them."""
    src = sources.open_source(source_spec, required=("question", "responses", "labels"))
    shards = {"shard_index": 0, "shard_count": 1} if every_host_all else {}
    return pipelines.rm_dataset(
        src, tok, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
        group_size=cfg.rm.group_size, seed=cfg.seed, shuffle=shuffle, num_epochs=num_epochs,
        too_long=cfg.data.too_long or "drop", num_threads=cfg.data.num_threads,
        drop_remainder=drop_remainder, **shards,
    )


def _require_usable_groups(spec: str, group_size: int) -> None:
    """Refuses RM data without a single group holding both a correct and a wrong answer
    (the loss has no pair to learn from, and the pipeline would search forever)."""
    src = sources.open_source(spec, required=("question", "responses", "labels"))
    for i in range(len(src)):
        labels = [int(bool(x)) for x in list(src[i]["labels"])[:group_size]]
        if len(labels) == group_size and 0 < sum(labels) < group_size:
            return
    raise ValueError(
        f"{spec}: no group of {group_size} responses has both correct and incorrect answers, "
        "so the listwise loss has nothing to learn; sample more responses, use a stronger "
        "policy, or set synth.reference_positive=True to add reference solutions")


def rm_params_from_lm(lm_params, rm_cfg, seed: int = 0, mesh=None):
    """RM params: the LM's trunk, a freshly initialised score head (built on `mesh`, sharded
    like the RM, when given: no host holds the model)."""

    def build(lm):
        fresh = init_params(rm_cfg, jax.random.key(seed))
        return {**fresh, **{k: lm[k] for k in TRUNK}}

    if mesh is None:
        return build(lm_params)
    shardings = parallel.param_shardings_on(mesh)(rm_cfg)
    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=shardings)(lm_params)


def evaluate(model, params, batches) -> dict:
    """Pair accuracy and top-1 correctness over held-out groups, with their chance levels.

    Chance is 0.5 for a pair; for the top answer it is the share of correct answers in
    the group (a random pick), averaged like `top_correct` over the groups with pairs.
    With no such group every figure is None and `groups` is 0.
    """
    score = jax.jit(lambda p, b: scores_at_last_token(model, p, b))
    totals = {"weight": 0.0, "pair_accuracy": 0.0, "top_correct": 0.0, "loss": 0.0,
              "top_correct_chance": 0.0}
    for batch in batches:
        s = jnp.asarray(parallel.fetch(score(params, batch)))
        loss, aux = listwise_rm_loss(s, jnp.asarray(batch["labels"]))
        for k in ("weight", "pair_accuracy", "top_correct"):
            totals[k] += float(aux[k])
        totals["loss"] += float(loss)
        totals["top_correct_chance"] += _random_pick_correct(batch)
    n = totals.pop("weight")
    if n == 0:  # no group has both a correct and a wrong answer: nothing to rank
        return {k: None for k in totals} | {"groups": 0}
    return {k: v / n for k, v in totals.items()} | {"groups": n}


def _random_pick_correct(batch) -> float:
    """Sum over the groups with pairs of the share of correct responses (a random pick)."""
    labels_BG = np.asarray(batch["labels"], dtype=np.float64)
    k_B, g = labels_BG.sum(axis=1), labels_BG.shape[1]
    return float(np.sum(np.where((k_B > 0) & (k_B < g), k_B / g, 0.0)))


def run(cfg, workdir: str):
    tok = common.tokenizer(cfg, workdir)
    model_cfg = common.model_config(cfg, vocab_size=tok.vocab_size, head="rm")
    lm_cfg = model_cfg.replace(head="lm")
    if not cfg.data.sources or cfg.data.sources == "synthetic":
        raise ValueError("rm: set data.sources to a JSONL of {question, responses, labels} "
                         "(the synth stage's RM output: --config.synth.write=rm)")
    _require_usable_groups(cfg.data.sources, cfg.rm.group_size)
    ds = dataset(cfg, tok, cfg.data.sources)
    cfg_no_init = cfg.copy_and_resolve_references()
    with cfg_no_init.unlocked():
        cfg_no_init.init.hf_dir = cfg_no_init.init.checkpoint = ""
    start = _trunk_from_lm(cfg, lm_cfg, model_cfg, common.mesh(cfg))
    state = common.train(cfg_no_init, workdir, model_cfg, rm_loss, ds, "rm",
                         initial=start)
    if cfg.rm.eval_source:
        model = Transformer(model_cfg)
        held_out = dataset(cfg, tok, cfg.rm.eval_source, shuffle=False, num_epochs=1,
                           drop_remainder=False,  # every held-out group counts
                           every_host_all=True)  # and every host scores the same batches
        report = evaluate(model, state.params, iter(held_out))
        if jax.process_index() == 0:  # one copy in the shared workdir
            fileio.write_text(os.path.join(workdir, "rm_eval.json"),
                              json.dumps(report, indent=2))
        print(f"[rm] held-out: {json.dumps(report)}")
    return state


def _trunk_from_lm(cfg, lm_cfg, rm_cfg, mesh):
    init = cfg.init
    if init.checkpoint:
        loaded_cfg, lm_params = params_ckpt.load_params_on(init.checkpoint, mesh)
    elif init.hf_dir:
        from qmath_jax import hf

        loaded_cfg, lm_params = hf.load_on(init.hf_dir, mesh, dtype=lm_cfg.dtype)
    else:
        return None
    common.check_same_shapes(loaded_cfg, lm_cfg, cfg)  # before any array is combined
    if loaded_cfg.head == "rm":
        return lm_params
    return rm_params_from_lm(lm_params, rm_cfg, cfg.seed, mesh)
