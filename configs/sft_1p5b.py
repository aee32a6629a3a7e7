"""SFT of Qwen2.5-Math-1.5B (the Qwen2.5-Math-1.5B-Instruct recipe), sized for a TPU v6e-16.

Report settings (arXiv 2409.12122, sec. 3.3): 3 epochs at sequence length 4096, batch 128,
learning rate 2e-5 decaying to 7e-7. bfloat16 compute, float32 master params and AdamW
state; fully sharded (FSDP) over the 16 chips of a v6e-16, full rematerialisation,
8 micro-batches.

  python -m qmath_jax.launch --config sft_1p5b --workdir gs://BUCKET/runs/sft_1p5b \
      --config.init.hf_dir=/path/to/Qwen2.5-Math-1.5B \
      --config.data.sources=/data/sft_cot.jsonl=3,/data/sft_tir.jsonl=1
  python -m qmath_jax.launch --config sft_1p5b --compile_only   # any host, libtpu

init.hf_dir (the base model, tokenizer beside it) and data.sources ({question, response,
mode} records, e.g. a synth round's output) name your own files (the /path/to/ defaults
exist nowhere). train.steps is
3 epochs of 1.2M packed rows (3 * 1.2M / 128); set it to 3 * rows / 128 for your data.

Expected (--compile_only on a 2-core CPU host): compiles in 2-5 minutes and fits in
the 32 GiB HBM per v6e chip with over 10% spare, exit code 0.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("sft")
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

    c.topology = "v6e-16"
    c.model.preset = "qwen2.5-math-1.5b"
    c.model.vocab_size = 151936  # the checkpoint's padded embedding, not the tokenizer's size
    c.init.hf_dir = "/path/to/Qwen2.5-Math-1.5B"
    c.data.sources = "/path/to/sft_cot.jsonl=3,/path/to/sft_tir.jsonl=1"
    c.train.batch_size = 128
    c.train.grad_accum = 8
    c.train.steps = 3 * 1_200_000 // 128
    c.train.lr = 2e-5
    c.train.end_lr = 7e-7
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.0
    c.train.checkpoint_every_steps = 500
    return c
