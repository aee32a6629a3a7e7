"""SFT of Qwen2.5-Math-72B into Qwen2.5-Math-72B-Instruct's recipe, sized for a TPU v5p-128.

Report settings (arXiv 2409.12122, sec. 3.3): 3 epochs at sequence length 4096, batch 256,
learning rate 5e-6 decaying to 7e-7. bfloat16 compute, float32 master params and AdamW
state; fully sharded (FSDP) over the 64 chips of a v5p-128, full rematerialisation,
two micro-batches per step.

  python -m qmath_jax.launch --config sft_72b --workdir gs://BUCKET/runs/sft_72b \
      --config.init.hf_dir=/path/to/Qwen2.5-Math-72B \
      --config.data.sources=/data/sft_cot.jsonl=3,/data/sft_tir.jsonl=1
  python -m qmath_jax.launch --config sft_72b --compile_only        # any host, libtpu

init.hf_dir (the base model, tokenizer beside it) and data.sources ({question, response,
mode} records, e.g. a synth round's output) name your own files (the /path/to/ defaults
exist nowhere). train.steps is
3 epochs of 1.2M packed rows (3 * 1.2M / 256); set it to 3 * rows / 256 for your data.

Expected (--compile_only on a 2-core CPU host): compiles in 3-5 minutes and fits: about
57 GiB of the 95 GiB HBM per v5p chip (40% spare), exit code 0.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("sft")
    c.topology = "v5p-128"
    c.model.preset = "qwen2.5-math-72b"
    c.model.vocab_size = 152064  # the checkpoint's padded embedding, not the tokenizer's size
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention_impl = "auto"
    c.init.hf_dir = "/path/to/Qwen2.5-Math-72B"
    c.data.sources = "/path/to/sft_cot.jsonl=3,/path/to/sft_tir.jsonl=1"
    c.train.seq_len = 4096
    c.train.batch_size = 256
    c.train.grad_accum = 2
    c.train.steps = 3 * 1_200_000 // 256
    c.train.lr = 5e-6
    c.train.end_lr = 7e-7
    c.train.warmup_steps = 100
    c.train.decay = "cosine"
    c.train.weight_decay = 0.0
    c.train.checkpoint_every_steps = 500
    c.train.checkpoint_every_minutes = 30.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
