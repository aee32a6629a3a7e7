"""A listwise reward model on Qwen2.5-Math-7B, from the SFT model, sized for a TPU v5p-32.

The report trains its released RM at 72B (rm_72b); this is the same recipe at 7B, for the
self-improvement loop of the 7B models (arXiv 2409.12122, sec. 3.2): the SFT model's trunk
with a two-layer scalar head; each question comes with 6 sampled responses labelled
correct / wrong, and the loss ranks every correct above every wrong one. Optimizer settings
are ours: 32 questions (192 responses) a step at 4096 tokens, lr 1e-5 cosine to 7e-7,
2 epochs of 361k questions. bfloat16 compute, float32 master params and AdamW state;
fully sharded (FSDP) over the 16 chips of a v5p-32, full rematerialisation, 2 micro-batches.

  python -m qmath_jax.launch --config rm_7b --workdir gs://BUCKET/runs/rm_7b \
      --config.init.checkpoint=gs://BUCKET/runs/sft_7b \
      --config.data.sources=/data/rm_groups.jsonl
  python -m qmath_jax.launch --config rm_7b --compile_only   # any host, libtpu

init.checkpoint (our SFT run; init.hf_dir takes an HF model instead) and data.sources
({question, responses: [6], labels: [6]} records, the synth stage's RM output) are
examples: name your own files (the /path/to/ defaults exist nowhere).

Expected (--compile_only on a 2-core CPU host): compiles in 2-5 minutes and fits in
the 95 GiB HBM per v5p chip with over 10% spare, exit code 0.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("rm")
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
    c.model.preset = "qwen2.5-math-7b"  # the stage puts the RM head on it
    c.model.vocab_size = 152064  # the checkpoint's padded embedding, not the tokenizer's size
    c.init.checkpoint = "/path/to/runs/sft_7b"
    c.data.sources = "/path/to/rm_groups.jsonl"
    c.rm.group_size = 6
    c.train.batch_size = 32  # questions; each brings rm.group_size responses
    c.train.grad_accum = 2
    c.train.steps = 2 * 361_000 // 32
    c.train.lr = 1e-5
    c.train.end_lr = 7e-7
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.0
    c.train.checkpoint_every_steps = 500
    return c
