"""GRPO of Qwen2.5-Math-7B-Instruct, sized for a TPU v5p-128.

Report settings (arXiv 2409.12122, sec. 3.4): group size 32, global batch 512 sequences per
policy update, 4096 samples per episode (128 queries x 32), learning rate 1e-5, KL
coefficient 1e-3, reward sigmoid(0.5 * r_m) + (r_v - 1). The report scores the 7B policy
with its 72B RM; here grpo.rm_checkpoint names any RM run with the policy's tokenizer
(rm_7b's, or rm_72b's on a slice with room for it). The policy (train state), the frozen
reference and the RM share the 64 chips, fully sharded; rollouts run on the policy's own
params.

  python -m qmath_jax.launch --config grpo_7b --workdir gs://BUCKET/runs/grpo_7b \
      --config.init.checkpoint=gs://BUCKET/runs/sft_7b \
      --config.grpo.rm_checkpoint=gs://BUCKET/runs/rm_7b \
      --config.data.sources=/data/rl_queries.jsonl
  python -m qmath_jax.launch --config grpo_7b --compile_only        # any host, libtpu

The files to name and the report's query filter (2 to 5 of 8 correct) are as in grpo_72b.

Expected (--compile_only on a 2-core CPU host): four programs (policy update, reference
log-probs, RM scoring, one rollout decode step over the episode's KV cache) compile in
about 1.5 minutes; measured per chip: update 28.0, reference 19.4, RM 3.7, decode step
15.0 of 95 GiB. (On a v5p-64 the reference pass over a 512-row mini-batch plans 88 of
95 GiB: too tight.)
"""

from qmath_jax.configs import grpo_72b


def get_config():
    """grpo_72b's recipe with the 7B model, the 7B learning rate and episode size."""
    c = grpo_72b.get_config()
    c.topology = "v5p-128"
    c.model.preset = "qwen2.5-math-7b"
    c.init.checkpoint = "/path/to/sft_7b"
    c.grpo.rm_checkpoint = "/path/to/rm_7b"
    c.grpo.prompts_per_step = 128  # 4096 samples per episode
    c.train.lr = 1e-5
    c.train.end_lr = 1e-5
    return c
