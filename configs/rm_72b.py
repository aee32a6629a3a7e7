"""The listwise reward model Qwen2.5-Math-RM-72B, from the SFT model, sized for a TPU v5p-128.

Report recipe (arXiv 2409.12122, sec. 3.2): the RM starts from the SFT model, its LM head
replaced by a two-layer scalar head; each question comes with 6 sampled responses labelled
correct / wrong, and the loss ranks every correct above every wrong one. The report gives no
optimizer settings for the RM; ours: 64 questions (384 responses) a step at 4096 tokens, lr
5e-6 cosine to 7e-7 as in SFT-72B, 2 epochs of 361k questions. bfloat16 compute, float32
master params and AdamW state; fully sharded (FSDP) over the 64 chips of a v5p-128, full
rematerialisation, one batch (6 responses per chip).

  python -m qmath_jax.launch --config rm_72b --workdir gs://BUCKET/runs/rm_72b \
      --config.init.checkpoint=gs://BUCKET/runs/sft_72b \
      --config.data.sources=/data/rm_groups.jsonl
  python -m qmath_jax.launch --config rm_72b --compile_only   # any host, libtpu

init.checkpoint (our SFT run; init.hf_dir takes an HF model instead) and data.sources
({question, responses: [6], labels: [6]} records, the synth stage's RM output) are
examples: name your own files (the /path/to/ defaults exist nowhere).

Expected (--compile_only on a 2-core CPU host): compiles in about 5 minutes and fits: about
73 GiB of the 95 GiB HBM per v5p chip (23% spare), exit code 0.
"""

from qmath_jax.run_config import base


def get_config():
    c = base("rm")
    c.topology = "v5p-128"
    c.model.preset = "qwen2.5-math-rm-72b"
    c.model.vocab_size = 152064  # the checkpoint's padded embedding, not the tokenizer's size
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.attention_impl = "auto"
    c.init.checkpoint = "/path/to/runs/sft_72b"
    c.data.sources = "/path/to/rm_groups.jsonl"
    c.rm.group_size = 6
    c.train.seq_len = 4096
    c.train.batch_size = 64  # questions; each brings rm.group_size responses
    c.train.grad_accum = 1  # 64 questions over 64 chips: one micro-batch
    c.train.steps = 2 * 361_000 // 64
    c.train.lr = 5e-6
    c.train.end_lr = 7e-7
    c.train.warmup_steps = 50
    c.train.decay = "cosine"
    c.train.weight_decay = 0.0
    c.train.checkpoint_every_steps = 500
    c.train.checkpoint_every_minutes = 30.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
