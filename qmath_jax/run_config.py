"""The schema every run config starts from: `base(stage)` -> a locked ConfigDict.

Config files in configs/ call `base(...)`, change what they need and return it; the
launcher applies `--config.a.b=value` overrides, which ml_collections type-checks and
refuses for unknown keys.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from qmath_jax.model.config import ModelConfig

STAGES = ("forward", "pretrain", "sft", "rm", "grpo", "synth", "eval", "demo")


def _model_defaults() -> dict:
    # Every ModelConfig field is overridable; preset fills them unless set here.
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.default is not dataclasses.MISSING}
    fields = {k: v for k, v in fields.items() if k in (
        "dtype", "param_dtype", "remat", "attention_impl", "scan_unroll")}
    return {"preset": "tiny", "vocab_size": 0, **fields}


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
    # The TPU topology a config is sized for (documentation and --compile_only default).
    c.topology = ""
    return c
