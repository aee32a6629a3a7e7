"""Qwen2.5-Math-7B-Instruct, evaluated as the report does: greedy, maj@8 and RM@8, CoT and TIR.

Weights straight from the Hugging Face checkpoint (tokenizer beside it), scored by
Qwen2.5-Math-RM-72B for RM@8. Sampling follows the report (arXiv 2409.12122, sec. 5):
greedy answers, and 8 samples at temperature 0.7 / top_p 0.8 for maj@8 and RM@8; TIR runs
the model's Python in the sandbox, at most 4 executions per answer. Sized for a TPU v5p-8
(4 chips of 95 GiB): tensor parallel over the 4 chips (the 7B's 4 kv heads, the RM's 8),
bfloat16 weights and compute. The policy takes 15 GiB, the RM 144 GiB, the KV cache of one
sampler call (32 problems x 8 samples, 2048 new tokens) about 40 GiB, all split 4 ways.

  python -m qmath_jax.launch --config eval_math_7b --workdir runs/eval_math_7b \
      --config.init.hf_dir=/path/to/Qwen2.5-Math-7B-Instruct \
      --config.eval.rm_hf_dir=/path/to/Qwen2.5-Math-RM-72B
  # a quick look: 20 problems a set, CoT only, no RM
  python -m qmath_jax.launch --config eval_math_7b --workdir runs/eval_math_7b_quick \
      --config.init.hf_dir=/path/to/Qwen2.5-Math-7B-Instruct \
      --config.eval.limit=20 --config.eval.modes=cot --config.eval.rm_hf_dir=

init.hf_dir and eval.rm_hf_dir name your own files (the /path/to/ defaults exist nowhere); a
checkpoint of ours
(init.checkpoint, eval.rm_checkpoint) works the same. Rows go to samples.jsonl, the table
to summary.json; an interrupted run resumes where it stopped. On one 80 GiB GPU, drop the
RM (eval.rm_hf_dir=) and set --config.mesh.tensor=1.

Expected (not run in this repository's CI, which has neither the weights nor an
accelerator): greedy CoT close to the report's figures for this model, MATH 83.6 and GSM8K
95.2 (MATH500 is a 500-problem subset of MATH and lands near it), greedy TIR on MATH near
85.3; maj@8 and RM@8 above greedy on MATH, RM@8 highest.
"""

from qmath_jax.run_config import base

ENGLISH_SETS = "gsm8k,math500,minerva_math,gaokao2023en,olympiadbench,college_math,aime24,amc23"


def get_config():
    c = base("eval")
    c.topology = "v5p-8"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.attention_impl = "auto"
    c.init.hf_dir = "/path/to/Qwen2.5-Math-7B-Instruct"
    c.eval.sets = ENGLISH_SETS
    c.eval.modes = "cot,tir"
    c.eval.greedy = True
    c.eval.k = 8
    c.eval.temperature = 0.7
    c.eval.top_p = 0.8
    c.eval.max_new_tokens = 2048
    c.eval.max_tool_calls = 4
    c.eval.tool_timeout_s = 5.0
    c.eval.sandbox_workers = 16
    c.eval.batch_size = 32
    c.eval.max_batch = 256
    c.eval.rm_hf_dir = "/path/to/Qwen2.5-Math-RM-72B"
    c.eval.rm_batch_size = 16
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 4
    return c
