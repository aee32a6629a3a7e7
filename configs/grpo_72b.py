"""GRPO of Qwen2.5-Math-72B-Instruct with the 72B reward model, sized for a TPU v5p-256.

Report settings (arXiv 2409.12122, sec. 3.4): group size 32, global batch 512 sequences per
policy update, 2048 samples per episode (64 queries x 32), learning rate 5e-6, KL
coefficient 1e-3, reward sigmoid(0.5 * r_m) + (r_v - 1). The policy (train state), the
frozen reference and the RM share the 128 chips, fully sharded; rollouts run on the
policy's own params.

  python -m qmath_jax.launch --config grpo_72b --workdir gs://BUCKET/runs/grpo_72b \
      --config.init.checkpoint=gs://BUCKET/runs/sft_72b \
      --config.grpo.rm_checkpoint=gs://BUCKET/runs/rm_72b \
      --config.data.sources=/data/rl_queries.jsonl
  python -m qmath_jax.launch --config grpo_72b --compile_only       # any host, libtpu

init.checkpoint (the SFT model), grpo.rm_checkpoint (the RM run) and data.sources
({question, answer} queries) name your own files (the /path/to/ defaults exist nowhere).
Before the first episode the report's query filter samples 8 answers to each query with
the SFT policy and keeps those with 2 to 5 correct (workdir/queries.jsonl, with counts in
workdir/query_filter.json); pass --config.grpo.filter_n=0 for queries filtered already.

Expected (--compile_only on a 2-core CPU host): four programs (policy update, reference
log-probs, RM scoring, one rollout decode step over the episode's KV cache) compile in
about 15 minutes and each fits in the 95 GiB of a v5p chip with more than 10% spare.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("grpo")
    c.topology = "v5p-256"
    c.model.preset = "qwen2.5-math-72b"
    c.model.vocab_size = 152064
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention_impl = "auto"
    c.init.checkpoint = "/path/to/sft_72b"
    c.data.sources = "/path/to/rl_queries.jsonl"
    c.grpo.rm_checkpoint = "/path/to/rm_72b"
    c.grpo.mode = "cot"
    c.grpo.group_size = 32
    c.grpo.prompts_per_step = 64  # 2048 samples per episode
    c.grpo.mini_batch = 512  # the report's global batch
    c.grpo.passes = 1
    c.grpo.kl_coef = 1e-3
    c.grpo.max_prompt_len = 1024
    c.grpo.max_new_tokens = 2048
    c.grpo.temperature = 1.0
    c.grpo.filter_n = 8  # the report's query filter: keep 2..5 of 8 correct
    c.grpo.filter_keep = "2,5"
    c.train.steps = 200  # episodes
    c.train.lr = 5e-6
    c.train.end_lr = 5e-6
    c.train.decay = "constant"
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0
    c.train.checkpoint_every_steps = 5
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
