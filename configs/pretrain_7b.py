"""Continued math pretraining of Qwen2.5-7B into Qwen2.5-Math-7B, sized for a TPU v5p-32.

Report settings (arXiv 2409.12122, sec. 2): start from the Qwen2.5 base checkpoint, train on
the math corpus at 4K context. The report gives no optimizer settings for this stage; ours:
batch 512 x 4096 tokens (2M tokens a step), lr 5e-5 with 2000 warmup steps, cosine to 5e-6,
500k steps (1T tokens). bfloat16 compute, float32 master params and AdamW state; fully
sharded (FSDP) over the 16 chips of a v5p-32, full rematerialisation, 16 micro-batches.

  python -m qmath_jax.launch --config pretrain_7b --workdir gs://BUCKET/runs/pretrain_7b \
      --config.init.hf_dir=/path/to/Qwen2.5-7B \
      --config.data.sources=/data/math_web.jsonl=3,/data/math_synthetic.jsonl=1
  python -m qmath_jax.launch --config pretrain_7b --compile_only   # any host, libtpu

init.hf_dir (weights and tokenizer.json) and data.sources (records with a `text` field) are
examples: name your own files (the /path/to/ defaults exist nowhere).

Expected (--compile_only on a 2-core CPU host): compiles in 2-5 minutes and fits in
the 95 GiB HBM per v5p chip with over 10% spare, exit code 0.
Measured on this project's 2-core CPU host: train_step compiles in 45 s and plans 21.1 GiB
per chip (22% of the 95 GiB HBM of a v5p chip), exit code 0.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("pretrain")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention_impl = "auto"
    c.train.seq_len = 4096
    c.train.decay = "cosine"
    c.train.checkpoint_every_minutes = 30.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.topology = "v5p-32"
    c.model.preset = "qwen2.5-math-7b"
    c.model.vocab_size = 152064  # the checkpoint's padded embedding, not the tokenizer's size
    c.init.hf_dir = "/path/to/Qwen2.5-7B"
    c.data.sources = "/path/to/math_corpus.jsonl"
    c.train.batch_size = 512
    c.train.grad_accum = 16
    c.train.steps = 500_000
    c.train.lr = 5e-5
    c.train.end_lr = 5e-6
    c.train.warmup_steps = 2000
    c.train.weight_decay = 0.1
    c.train.checkpoint_every_steps = 1000
    return c
