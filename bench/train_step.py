"""Train-step tokens/s and MFU of the bench model: our jitted step (forward, backward,
AdamW, clipping) against HF transformers + torch.optim.AdamW on the same CPU, same run.

  python bench/train_step.py

Prints JSON lines; the last is {"ours", "peer", "ratio"} in tokens/s. MFU is the model
FLOP/s over one large matmul's FLOP/s measured in the same run.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
import jax
import numpy as np

from qmath_jax import hf, parallel
from qmath_jax.model import Transformer, get_preset
from qmath_jax.stages.common import lm_loss
from qmath_jax.train import trainer as T

BATCH, SEQ = 8, 256


def batch_of(tokens):
    tokens = np.asarray(tokens, np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
            "loss_mask": np.ones_like(tokens), "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape).copy()}


def ours(cfg, tokens):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    model = Transformer(cfg, mesh=mesh)

    def init_fn():
        t = np.zeros((1, 8), np.int32)
        return model.init(jax.random.key(0), t, t, t + 1)["params"]

    built = T.build_step(mesh, init_fn, lm_loss(model), T.OptimConfig(lr=1e-4, total_steps=100))
    state, _ = parallel.sharded_init(lambda: T.boxed_state(init_fn, built.optimizer, 0), mesh)
    batch = parallel.shard_batch(batch_of(tokens), mesh)
    holder = {"state": state}

    def run():
        with jax.set_mesh(mesh), parallel.axis_rules():
            holder["state"], metrics = built.step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return run, holder


def peer(hf_dir, tokens):
    import torch
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def main() -> None:
    common.emit(**common.machine())
    cfg = get_preset("bench")
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size)
    peak = common.matmul_peak_flops()
    flops = common.train_flops_per_token(cfg, SEQ) * BATCH * SEQ
    common.emit(metric="matmul_peak", gflops=peak / 1e9)
    run_ours, holder = ours(cfg, tokens)
    results = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        params = jax.device_get(holder["state"].params)
        hf.save(cfg, params, hf_dir)
        for name, fn in (("ours", run_ours), ("peer", peer(hf_dir, tokens))):
            seconds = common.best_time(fn, repeats=5, warmup=2)
            results[name] = BATCH * SEQ / seconds
            common.emit(side=name, tokens_per_s=results[name], step_s=seconds,
                        mfu=flops / seconds / peak)
    common.emit(ours=results["ours"], peer=results["peer"],
                ratio=results["ours"] / results["peer"], unit="tokens/s")


if __name__ == "__main__":
    common.host_memory_settings()
    main()
