"""The schema every run config starts from: `base(stage)` -> a locked ConfigDict.

Config files in configs/ call `base(...)`, change what they need and return it; the
launcher applies `--config.a.b=value` overrides, which ml_collections type-checks and
refuses for unknown keys.
"""

from __future__ import annotations

import ml_collections

STAGES = ("forward", "pretrain", "sft", "rm", "grpo", "synth", "eval", "demo")


def _model_defaults() -> dict:
    # Empty / 0 keeps the preset's value; anything else overrides that ModelConfig field.
    return {"preset": "tiny", "vocab_size": 0, "dtype": "", "param_dtype": "", "remat": "",
            "attention_impl": "", "scan_unroll": 0}


def base(stage: str) -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: choose one of {STAGES}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.model = _model_defaults()
    # Where the weights start: an HF checkpoint directory, or a previous run / params
    # checkpoint of ours. Empty: random init.
    c.init = {"hf_dir": "", "checkpoint": ""}
    # Tokenizer: a tokenizer.json / sentencepiece .model / HF directory; empty trains a small
    # byte-level BPE of `train_vocab_size` on the synthetic corpus (kept in the workdir).
    c.tokenizer = {"path": "", "train_vocab_size": 512}
    c.data = {
        "sources": "synthetic",  # comma list of name[=weight]: synthetic, or file paths
        "text_field": "text",
        "synthetic_kinds": "",  # comma list; empty = all kinds
        "synthetic_digits": "",  # e.g. "big_mul=4,add=3"
        "synthetic_tir_by_hand": 0.0,  # share of TIR solutions written without Python
        "tir_fraction": 0.5,  # SFT: share of TIR examples in the synthetic mix
        "too_long": "",  # stage default when empty
        "num_threads": 2,
    }
    c.train = {
        "steps": 100,
        "batch_size": 8,
        "seq_len": 256,
        "lr": 3e-4,
        "end_lr": 3e-5,
        "warmup_steps": 10,
        "decay": "cosine",
        "b1": 0.9,
        "b2": 0.95,
        "weight_decay": 0.1,
        "clip_norm": 1.0,
        "grad_accum": 1,
        "nonfinite": "skip",
        "checkpoint_every_steps": 50,
        "checkpoint_every_minutes": 0.0,
        "keep_checkpoints": 2,
    }
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1,
              "dcn_tensor": 1, "num_devices": 0}
    c.rm = {"group_size": 6, "eval_source": ""}
    c.grpo = {
        "mode": "cot",  # cot | tir
        "group_size": 8,
        "prompts_per_step": 4,
        "mini_batch": 16,  # sequences per optimizer step
        "passes": 1,  # optimisation passes over each rollout batch
        "clip_eps": 0.2,
        "kl_coef": 1e-3,
        "kl_estimator": "k3",  # k1 | k2 | k3
        "aggregation": "seq_mean_token_mean",  # or token_mean (DAPO)
        "max_prompt_len": 128,
        "max_new_tokens": 256,
        "max_tool_calls": 4,
        "temperature": 1.0,
        "top_p": 1.0,
        "rm_checkpoint": "",  # an RM stage's workdir; empty: verifier reward only
        # The report's query filter: before training, sample filter_n answers to each of
        # the first filter_problems queries of data.sources (0: all of a file) with the
        # starting policy and train only on queries with filter_keep correct (inclusive).
        "filter_n": 0,  # 0: no filter (the report: 8)
        "filter_keep": "2,5",
        "filter_problems": 0,
    }
    # Evaluation (stage eval): benchmark sets by name from eval.benchmarks (default
    # ../shared/benchmarks), or "synthetic" (the corpus's test split); limit = problems per
    # set (0 = all). Greedy and k samples per problem (temperature / top_p), CoT and/or TIR;
    # an RM (rm_checkpoint or rm_hf_dir) scores every sample for rm@k.
    c.eval = {"sets": "gsm8k,math500", "benchmarks": "", "limit": 0, "modes": "cot",
              "greedy": True, "k": 8, "temperature": 0.7, "top_p": 0.8,
              "max_new_tokens": 2048, "max_tool_calls": 4, "tool_timeout_s": 5.0,
              "sandbox_workers": 4, "batch_size": 32, "max_batch": 0,
              "rm_checkpoint": "", "rm_hf_dir": "", "rm_batch_size": 16}
    c.synth = {
        "source": "synthetic",  # synthetic | bench:NAME | a file of {question[, answer]}
        "num_problems": 64,
        "offset": 0,  # first problem index (rounds of RFT move on)
        "n": 8,  # paths sampled per problem
        "mode": "cot",  # cot | tir
        "write": "sft",  # sft | rm
        "keep": "best",  # best (RM-best verified path) | all (every verified path)
        "batch_size": 16,  # problems per sampler call
        "max_new_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.8,
        "rm_checkpoint": "",
        "decontam_sets": "",  # benchmark names, e.g. math500,gsm8k
        "decontam_synthetic": 2000,  # synthetic test questions to decontaminate against
        "rounds": 1,  # > 1: online rejection fine-tuning (synth -> SFT -> ...)
        "reference_positive": False,  # RM groups with no correct sample get the reference
        "out": "",
    }
    # The TPU topology a config is sized for (documentation and --compile_only default).
    c.topology = ""
    return c
