"""Continued pretraining of a tiny Qwen2 on the embedded synthetic math corpus (CPU).

  python -m qmath_jax.launch --config pretrain_tiny --workdir runs/pretrain_tiny

Expected: about 2 minutes on a 2-core CPU; the loss falls from ~6.2 (ln 512) to below
1.5 within 150 steps; checkpoints in runs/pretrain_tiny/checkpoints, curves in plots/.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("pretrain")
    c.model.preset = "tiny"
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.lr = 3e-3
    c.train.end_lr = 3e-4
    c.train.warmup_steps = 10
    return c
