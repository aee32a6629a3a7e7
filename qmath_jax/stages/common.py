"""What every training stage shares: the model config, tokenizer, mesh, initial weights,
the trainer and the resume-or-start loop."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from qmath_jax import fileio, parallel
from qmath_jax.data import synthetic
from qmath_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer, train_bpe_tokenizer
from qmath_jax.model import Transformer, get_preset
from qmath_jax.model.config import ModelConfig
from qmath_jax.train import checkpoint as params_ckpt
from qmath_jax.train import trainer as trainer_lib

TOKENIZER_FILE = "tokenizer.json"


def model_config(cfg, vocab_size: int | None = None, head: str | None = None) -> ModelConfig:
    """The preset named by cfg.model.preset with the config's overrides applied."""
    m = cfg.model
    overrides = {k: m[k] for k in ("dtype", "param_dtype", "remat", "attention_impl",
                                   "scan_unroll") if m[k]}
    if m.vocab_size or vocab_size:
        overrides["vocab_size"] = int(m.vocab_size or vocab_size)
    if head:
        overrides["head"] = head
    return get_preset(m.preset, **overrides)


def synthetic_corpus(cfg, split: str = "train") -> synthetic.SyntheticMath:
    kinds = [k for k in cfg.data.synthetic_kinds.split(",") if k] or None
    digits = {k: int(v) for k, v in (p.split("=") for p in cfg.data.synthetic_digits.split(",")
                                      if p)}
    return synthetic.SyntheticMath(
        seed=cfg.seed, kinds=kinds, split=split, digits=digits,
        tir_by_hand=cfg.data.synthetic_tir_by_hand,
    )


def tokenizer(cfg, workdir: str) -> Tokenizer:
    """The run's tokenizer, saved into the workdir so later stages and resumes share it.

    Order: the workdir's own copy; cfg.tokenizer.path; the tokenizer beside init weights;
    else a byte-level BPE trained on the synthetic corpus. Any of these may be in a bucket
    (read from a downloaded copy). Only process 0 saves it: the workdir is shared.
    """
    own = os.path.join(workdir, TOKENIZER_FILE)
    candidates = [own, cfg.tokenizer.path, cfg.init.checkpoint, cfg.init.hf_dir]
    for path in candidates:
        if not path:
            continue
        if fileio.isdir(path) and not fileio.exists(os.path.join(path, TOKENIZER_FILE)):
            continue
        if fileio.exists(path):
            tok = Tokenizer.from_file(fileio.fetch(path, names=TOKENIZER_FILES))
            break
    else:
        corpus = synthetic_corpus(cfg)
        texts = [corpus.pretrain_document(i) for i in range(2000)]
        texts += [corpus[i]["tir"] for i in range(1000)]
        tok = train_bpe_tokenizer(texts, cfg.tokenizer.train_vocab_size)
    fileio.makedirs(workdir)
    if jax.process_index() == 0 and not fileio.exists(own):
        with fileio.staged_dir(workdir) as local:  # HF tokenizers write local files only
            tok.save(local)
    return tok


def mesh(cfg):
    return parallel.mesh_from_config(cfg.mesh)


def initial_params(cfg, model_cfg: ModelConfig, shardings):
    """Params from cfg.init (HF dir or our checkpoint), placed in `shardings`; None = random."""
    if cfg.init.hf_dir:
        loaded_cfg, params = _load_hf(cfg.init.hf_dir, model_cfg, shardings)
    elif cfg.init.checkpoint:
        loaded_cfg, params = params_ckpt.load_params(cfg.init.checkpoint, shardings)
    else:
        return None
    check_same_shapes(loaded_cfg, model_cfg, cfg)
    return params


def _load_hf(hf_dir, model_cfg, shardings):
    from qmath_jax import hf

    return hf.load(hf_dir, shardings=shardings, dtype=model_cfg.dtype,
                   param_dtype=model_cfg.param_dtype)


def check_same_shapes(loaded: ModelConfig, want: ModelConfig, cfg) -> None:
    keys = ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "tie_embeddings")
    diff = {k: (getattr(loaded, k), getattr(want, k)) for k in keys
            if getattr(loaded, k) != getattr(want, k)}
    if diff:
        raise ValueError(
            f"init weights ({cfg.init.hf_dir or cfg.init.checkpoint}) do not match "
            f"model.preset={cfg.model.preset!r}: {diff} (weights, config); set model.preset "
            "to the weights' size")


def optim_config(cfg) -> trainer_lib.OptimConfig:
    t = cfg.train
    return trainer_lib.OptimConfig(lr=t.lr, end_lr=t.end_lr, warmup_steps=t.warmup_steps,
                                   total_steps=t.steps, decay=t.decay, b1=t.b1, b2=t.b2,
                                   weight_decay=t.weight_decay, clip_norm=t.clip_norm)


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), attention counted as full square."""
    d, f = model_cfg.embed_dim, model_cfg.mlp_dim
    qkvo = d * model_cfg.head_dim * (2 * model_cfg.num_heads + 2 * model_cfg.num_kv_heads)
    matmul = model_cfg.num_layers * (qkvo + 3 * d * f) + d * model_cfg.vocab_size
    attention = model_cfg.num_layers * 4 * seq_len * model_cfg.num_heads * model_cfg.head_dim
    return 3 * (2 * matmul + attention)


_PEAK_FLOPS = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
               "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12,
               "a100": 312e12}


def peak_flops_per_device() -> float:
    """bf16 dense peak of the local device kind; CPU: a measured large matmul."""
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in _PEAK_FLOPS.items():
        if name in kind:
            return peak
    if jax.devices()[0].platform != "cpu":
        return 0.0
    import time

    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        mm(a).block_until_ready()
    return 2 * 1024**3 * 5 / (time.perf_counter() - t0)


def make_trainer(cfg, workdir: str, model: Transformer, loss_fn, the_mesh, stage: str):
    model_cfg = model.cfg

    def init_fn():
        tokens = np.zeros((1, 8), np.int32)
        return model.init(jax.random.key(cfg.seed), tokens, tokens, tokens + 1)["params"]

    t = cfg.train
    return trainer_lib.Trainer(
        workdir, the_mesh, init_fn, loss_fn, optim_config(cfg), seed=cfg.seed,
        grad_accum=t.grad_accum, checkpoint_every_steps=t.checkpoint_every_steps,
        checkpoint_every_minutes=t.checkpoint_every_minutes,
        keep_checkpoints=t.keep_checkpoints, nonfinite=t.nonfinite,
        run_config=json.loads(cfg.to_json_best_effort()), model_config=model_cfg,
        flops_per_token=flops_per_token(model_cfg, t.seq_len),
        peak_flops=peak_flops_per_device() * jax.device_count(), stage=stage,
    )


def train(cfg, workdir: str, model_cfg: ModelConfig, make_loss, dataset, stage: str,
          initial=None):
    """Resumes from the workdir's newest checkpoint or starts from cfg.init; then fits.

    `make_loss(model) -> loss_fn` builds the stage's loss around the model on the mesh;
    `initial` (params) overrides cfg.init for a fresh start.
    """
    the_mesh = mesh(cfg)
    parallel.check_batch(cfg.train.batch_size, the_mesh, cfg.train.grad_accum)
    model = Transformer(model_cfg, mesh=the_mesh)
    trainer = make_trainer(cfg, workdir, model, make_loss(model), the_mesh, stage)
    batches = iter(dataset)
    state, data_state = trainer.restore_latest()
    if state is None:
        if initial is None:
            initial = initial_params(cfg, model_cfg, trainer.state_shardings.params)
        state = trainer.init_state(initial)
    else:
        batches.set_state(data_state)
        print(f"[{stage}] resumed from step {int(state.step)} in {workdir}")
    state = trainer.fit(state, batches, cfg.train.steps)
    _write_data_report(workdir, stage, batches)
    return state


def _write_data_report(workdir, stage, batches) -> None:
    """Process 0's data report (its own host's shard): one file in the shared workdir."""
    from qmath_jax.data.pipelines import pipeline_report

    report = pipeline_report(batches)
    if jax.process_index() == 0:
        fileio.write_text(os.path.join(workdir, f"data_report_{stage}.json"),
                          json.dumps(report, indent=2, default=str))


def lm_loss(model: Transformer):
    """Next-token cross-entropy over batch["loss_mask"] (pretraining and SFT)."""
    from qmath_jax.train.losses import masked_cross_entropy

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                             batch["segment_ids"])
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])

    return loss_fn
