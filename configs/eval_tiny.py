"""Evaluation of the tiny SFT model (sft_tiny) on the synthetic test split and GSM8K (CPU).

  python -m qmath_jax.launch --config pretrain_tiny --workdir runs/pretrain_tiny
  python -m qmath_jax.launch --config sft_tiny --workdir runs/sft_tiny \
      --config.init.checkpoint=runs/pretrain_tiny
  python -m qmath_jax.launch --config eval_tiny --workdir runs/eval_tiny \
      --config.init.checkpoint=runs/sft_tiny

Greedy and maj@4 / pass@4 (temperature 0.7, top_p 0.8), CoT and TIR, 32 synthetic test
problems and the first 8 of GSM8K; rows in runs/eval_tiny/samples.jsonl, the table in
summary.json. Rerunning resumes; add --config.eval.rm_checkpoint=DIR for rm@4.

Expected: EXPECTED
"""

from qmath_jax.run_config import base


def get_config():
    c = base("eval")
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.eval.sets = "synthetic,gsm8k"
    c.eval.limit = 32
    c.eval.modes = "cot,tir"
    c.eval.k = 4
    c.eval.max_new_tokens = 320
    c.eval.batch_size = 32
    c.eval.sandbox_workers = 2
    c.mesh.num_devices = 1
    return c
