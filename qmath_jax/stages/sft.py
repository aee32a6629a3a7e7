"""SFT: chat-formatted (question, response) pairs, loss on response tokens only.

data.sources: `synthetic` expands to the corpus's CoT and TIR solutions mixed by
data.tir_fraction; files (JSONL / Parquet / ArrayRecord, e.g. a synth round's output)
give records {"question", "response", "mode": "cot"|"tir"}.
"""

from __future__ import annotations

from qmath_jax.data import pipelines, sources
from qmath_jax.stages import common
from qmath_jax.stages.pretrain import parse_sources


class SyntheticSolutions:
    """The synthetic corpus as SFT records in one mode (cot or tir)."""

    def __init__(self, corpus, mode: str, size: int = 1_000_000):
        self.corpus, self.mode, self.size = corpus, mode, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        p = self.corpus[int(index) % len(self.corpus)]
        return {"question": p["question"], "response": p[self.mode], "mode": self.mode}


def sft_sources(cfg) -> tuple[dict, dict]:
    srcs, weights = {}, {}
    for name, weight in parse_sources(cfg.data.sources).items():
        if name == "synthetic":
            corpus = common.synthetic_corpus(cfg)
            tir = cfg.data.tir_fraction
            for mode, share in (("cot", 1.0 - tir), ("tir", tir)):
                if share > 0:
                    srcs[f"synthetic_{mode}"] = SyntheticSolutions(corpus, mode)
                    weights[f"synthetic_{mode}"] = weight * share
        else:
            srcs[name] = sources.open_source(name, required=("question", "response"))
            weights[name] = weight
    return srcs, weights


def dataset(cfg, tok, num_epochs=None):
    srcs, weights = sft_sources(cfg)
    return pipelines.sft_dataset(
        srcs, tok, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
        weights=weights, seed=cfg.seed, too_long=cfg.data.too_long or "drop",
        num_epochs=num_epochs, num_threads=cfg.data.num_threads,
    )


def run(cfg, workdir: str):
    tok = common.tokenizer(cfg, workdir)
    model_cfg = common.model_config(cfg, vocab_size=tok.vocab_size)
    return common.train(cfg, workdir, model_cfg, common.lm_loss, dataset(cfg, tok), "sft")
