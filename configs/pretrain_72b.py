"""Continued math pretraining of Qwen2.5-72B into Qwen2.5-Math-72B, sized for a TPU v5p-128.

Report settings (arXiv 2409.12122, sec. 2): start from the Qwen2.5 base checkpoint, train on
the math corpus at 4K context. The report gives no optimizer settings for this stage; ours:
batch 512 x 4096 tokens (2M tokens a step), lr 3e-5 with 2000 warmup steps, cosine to 3e-6,
500k steps (1T tokens). bfloat16 compute, float32 master params and AdamW state; fully
sharded (FSDP) over the 64 chips of a v5p-128, full rematerialisation, four micro-batches.
The model takes Qwen2.5-Math-72B's hyperparameters (RoPE base 10000, 4K positions) and the
base checkpoint's weights.

  python -m qmath_jax.launch --config pretrain_72b --workdir gs://BUCKET/runs/pretrain_72b \
      --config.init.hf_dir=/path/to/Qwen2.5-72B \
      --config.data.sources=/data/math_web.jsonl=3,/data/math_synthetic.jsonl=1
  python -m qmath_jax.launch --config pretrain_72b --compile_only   # any host, libtpu

init.hf_dir (weights and tokenizer.json) and data.sources (records with a `text` field;
JSONL, Parquet or ArrayRecord) name your own files (the /path/to/ defaults exist nowhere).

Expected (--compile_only on a 2-core CPU host): compiles in 3-5 minutes and fits: about
57 GiB of the 95 GiB HBM per v5p chip (40% spare), exit code 0.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("pretrain")
    c.topology = "v5p-128"
    c.model.preset = "qwen2.5-math-72b"
    c.model.vocab_size = 152064  # the checkpoint's padded embedding, not the tokenizer's size
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention_impl = "auto"
    c.init.hf_dir = "/path/to/Qwen2.5-72B"
    c.data.sources = "/path/to/math_corpus.jsonl"
    c.train.seq_len = 4096
    c.train.batch_size = 512
    c.train.grad_accum = 4
    c.train.steps = 500_000
    c.train.lr = 3e-5
    c.train.end_lr = 3e-6
    c.train.warmup_steps = 2000
    c.train.decay = "cosine"
    c.train.weight_decay = 0.1
    c.train.checkpoint_every_steps = 1000
    c.train.checkpoint_every_minutes = 30.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
