"""GRPO of a tiny SFT'd model on the synthetic corpus (CPU), verifier reward (or an RM).

  python -m qmath_jax.launch --config grpo_tiny --workdir runs/grpo_tiny \
      --config.init.checkpoint=runs/sft_tiny [--config.grpo.rm_checkpoint=runs/rm_tiny]

Expected: about 3 minutes for 10 episodes of 8 queries x 8 samples; the printed reward and
accuracy rise over the episodes when the SFT model already solves some problems.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("grpo")
    c.model.preset = "tiny"
    c.mesh.num_devices = 1
    c.grpo.group_size = 8
    c.grpo.prompts_per_step = 8
    c.grpo.mini_batch = 32
    c.grpo.max_prompt_len = 128
    c.grpo.max_new_tokens = 192
    c.train.steps = 10
    c.train.lr = 1e-4
    c.train.end_lr = 1e-4
    c.train.decay = "constant"
    c.train.warmup_steps = 0
    c.train.checkpoint_every_steps = 5
    return c
