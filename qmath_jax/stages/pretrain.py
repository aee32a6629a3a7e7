"""Continued pretraining: next-token loss over packed documents from weighted sources.

data.sources is a comma list of `name[=weight]`: `synthetic` (the embedded corpus's
pretraining documents) or JSONL / Parquet / ArrayRecord paths whose records carry
`data.text_field`.
"""

from __future__ import annotations

from qmath_jax.data import pipelines, sources
from qmath_jax.stages import common


class _SyntheticDocuments:
    """Random-access pretraining documents of the synthetic corpus."""

    def __init__(self, corpus, size: int = 1_000_000):
        self.corpus, self.size = corpus, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"text": self.corpus.pretrain_document(int(index))}


def parse_sources(spec: str) -> dict[str, float]:
    """"synthetic=2,/data/a.jsonl" -> {"synthetic": 2.0, "/data/a.jsonl": 1.0}."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, weight = part.partition("=")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"data.sources: weight {weight!r} of {name!r} is not a number "
                             "(write name=weight, e.g. synthetic=2)") from None
    if not out:
        raise ValueError("data.sources is empty: name at least one source, e.g. synthetic")
    return out


def open_text_source(name: str, cfg, split: str = "train"):
    if name == "synthetic":
        return _SyntheticDocuments(common.synthetic_corpus(cfg, split))
    return sources.open_source(name, required=(cfg.data.text_field,))


def dataset(cfg, tok):
    spec = parse_sources(cfg.data.sources)
    srcs = {name: open_text_source(name, cfg) for name in spec}
    field = cfg.data.text_field
    return pipelines.pretrain_dataset(
        srcs, tok, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
        weights=spec, text_fn=lambda r: r["text"] if "text" in r else r[field],
        seed=cfg.seed, too_long=cfg.data.too_long or "split",
        num_threads=cfg.data.num_threads,
    )


def run(cfg, workdir: str):
    tok = common.tokenizer(cfg, workdir)
    model_cfg = common.model_config(cfg, vocab_size=tok.vocab_size)
    return common.train(cfg, workdir, model_cfg, common.lm_loss, dataset(cfg, tok), "pretrain")
