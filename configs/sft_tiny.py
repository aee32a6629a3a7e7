"""SFT of a tiny Qwen2 on synthetic CoT + TIR solutions (CPU), from pretrain_tiny.

  python -m qmath_jax.launch --config pretrain_tiny --workdir runs/pretrain_tiny
  python -m qmath_jax.launch --config sft_tiny --workdir runs/sft_tiny \
      --config.init.checkpoint=runs/pretrain_tiny

Expected: about 2 minutes; the response-token loss falls below 0.5 within 150 steps.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("sft")
    c.model.preset = "tiny"
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.lr = 2e-3
    c.train.end_lr = 2e-4
    c.train.warmup_steps = 10
    c.data.tir_fraction = 0.5
    return c
