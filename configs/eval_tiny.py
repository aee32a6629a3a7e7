"""Evaluation of the tiny SFT model (sft_tiny) on the synthetic test split and GSM8K (CPU).

  python -m qmath_jax.launch --config pretrain_tiny --workdir runs/pretrain_tiny
  python -m qmath_jax.launch --config sft_tiny --workdir runs/sft_tiny \
      --config.init.checkpoint=runs/pretrain_tiny
  python -m qmath_jax.launch --config eval_tiny --workdir runs/eval_tiny \
      --config.init.checkpoint=runs/sft_tiny

Greedy and maj@4 / pass@4 (temperature 0.7, top_p 0.8), CoT and TIR, on the first 16
problems of the synthetic test split and of GSM8K; rows in runs/eval_tiny/samples.jsonl,
the table in summary.json and on stdout. Rerunning resumes (a finished run only reprints
the table); add --config.eval.rm_checkpoint=DIR (an rm stage run) for rm@4.

Expected: about 3 minutes on a 2-core CPU; 320 rows (2 sets x 16 problems x 2 modes x
(1 greedy + 4 samples)); most TIR answers run code (num_tool_calls > 0). The 150-step
sft_tiny model solves almost nothing (every accuracy 0 to 10%): this config checks the
pipeline, not the model (the demo config trains one that scores).
"""

from qmath_jax.run_config import base


def get_config():
    c = base("eval")
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.eval.sets = "synthetic,gsm8k"
    c.eval.limit = 16
    c.eval.modes = "cot,tir"
    c.eval.k = 4
    c.eval.max_new_tokens = 256
    c.eval.batch_size = 16
    c.eval.sandbox_workers = 2
    c.mesh.num_devices = 1
    return c
