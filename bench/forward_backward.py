"""Forward+backward tokens/s of the bench model: ours (JAX) against HF transformers (torch).

  python bench/forward_backward.py

Prints JSON lines; the last is {"ours", "peer", "ratio"} in tokens/s, and each side's
achieved FLOP/s as a fraction of one large matmul's FLOP/s measured in the same run.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
import jax
import jax.numpy as jnp
import numpy as np

from qmath_jax import hf
from qmath_jax.model import Transformer, get_preset, init_params

BATCH, SEQ = 8, 256


def ours_inputs(tokens) -> tuple[jax.Array, ...]:
    """(tokens, positions, segment_ids) of the bench batch: one unpacked row each."""
    positions = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)
    return tokens, positions, jnp.ones_like(tokens)


def ours_loss(cfg):
    """(params, tokens, positions, segment_ids) -> the next-token loss both sides
    differentiate. The batch comes in as arguments, as in the trainer's step."""

    def loss_fn(p, tokens, positions, segments):
        logits = Transformer(cfg).apply({"params": p}, tokens, positions, segments)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    return loss_fn


def ours_step(cfg, params, tokens):
    step = jax.jit(jax.value_and_grad(ours_loss(cfg)))
    inputs = ours_inputs(tokens)
    return lambda: jax.block_until_ready(step(params, *inputs))


def peer_step(hf_dir, tokens):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    model.train()
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    return run


def main() -> None:
    common.emit(**common.machine())
    cfg = get_preset("bench")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size)
    peak = common.matmul_peak_flops()
    flops = common.train_flops_per_token(cfg, SEQ) * BATCH * SEQ
    common.emit(metric="matmul_peak", gflops=peak / 1e9)
    results = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        hf.save(cfg, params, hf_dir)
        for name, fn in (("ours", ours_step(cfg, params, tokens)),
                         ("peer", peer_step(hf_dir, tokens))):
            seconds = common.best_time(fn, repeats=5, warmup=2)
            results[name] = BATCH * SEQ / seconds
            common.emit(side=name, tokens_per_s=results[name], step_s=seconds,
                        fraction_of_matmul_peak=flops / seconds / peak)
    common.emit(ours=results["ours"], peer=results["peer"],
                ratio=results["ours"] / results["peer"], unit="tokens/s")


if __name__ == "__main__":
    common.host_memory_settings()
    main()
