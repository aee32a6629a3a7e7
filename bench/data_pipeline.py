"""Packed tokens/s of the pretraining pipeline against a naive packer, on benchmark text.

Corpus: MATH train (problem + solution) and GSM8K train (question + answer) from
../shared/benchmarks, about 15k documents. Tokenizer: a byte-level BPE (vocab 8192) trained
here on the same text (the project's `train_bpe_tokenizer`).

ours: `pretrain_dataset` (batched `encode_batch` in reader threads, first-fit packing,
      [B, T] numpy batches with segment ids, positions, targets, loss mask).
peer: a plain Python loop: `encode` one document at a time, greedy next-fit packing into one
      open row, documents longer than a row split, the same five arrays built per row.

Both read every document once (one epoch, T = 1024, B = 8). Figures are real tokens (loss
mask = 1) per second; padding is reported too. Prints JSON lines; the last one is
{"ours", "peer", "ratio"}.

    python bench/data_pipeline.py [--seq_len 1024] [--batch_size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit

from qmath_jax.data.pipelines import pipeline_report, pretrain_dataset
from qmath_jax.data.tokenizer import train_bpe_tokenizer

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def corpus() -> list[dict[str, str]]:
    docs = []
    with open(BENCH / "math" / "train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            docs.append({"text": r["problem"] + "\n\n" + r["solution"]})
    with open(BENCH / "gsm8k" / "train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            docs.append({"text": r["question"] + "\n\n" + r["answer"]})
    return docs


def run_ours(docs, tok, seq_len: int, batch_size: int, num_threads: int) -> dict:
    ds = pretrain_dataset(
        docs,
        tok,
        seq_len=seq_len,
        batch_size=batch_size,
        num_epochs=1,
        shuffle=False,
        shard_index=0,
        shard_count=1,
        num_threads=num_threads,
    )
    start = time.perf_counter()
    it = iter(ds)
    real = slots = 0
    for batch in it:
        real += int(batch["loss_mask"].sum())
        slots += batch["loss_mask"].size
    seconds = time.perf_counter() - start
    counts = pipeline_report(it)["counts"]
    return {
        "seconds": seconds,
        "real_tokens": real,
        "slots": slots,
        "documents": counts["documents"],
    }


def _row(seq_len: int, pad: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full(seq_len, pad, np.int32),
        "targets": np.full(seq_len, pad, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }


def run_peer(docs, tok, seq_len: int, batch_size: int) -> dict:
    """Naive reference: one encode per document, one open row, greedy next-fit."""
    start = time.perf_counter()
    real = slots = 0
    rows: list[dict[str, np.ndarray]] = []
    row, fill, seg = _row(seq_len, tok.pad_id), 0, 0

    def emit_row():
        nonlocal row, fill, seg, real, slots
        row["loss_mask"] = (row["segment_ids"] > 0).astype(np.int32)
        rows.append(row)
        if len(rows) == batch_size:
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            real += int(batch["loss_mask"].sum())
            slots += batch["loss_mask"].size
            rows.clear()
        row, fill, seg = _row(seq_len, tok.pad_id), 0, 0

    for d in docs:
        ids = tok.encode(d["text"]) + [tok.eos_id]
        inputs, targets = ids[:-1], ids[1:]
        for s in range(0, len(inputs), seq_len):
            chunk_in, chunk_tg = inputs[s : s + seq_len], targets[s : s + seq_len]
            n = len(chunk_in)
            if fill + n > seq_len:
                emit_row()
            seg += 1
            row["tokens"][fill : fill + n] = chunk_in
            row["targets"][fill : fill + n] = chunk_tg
            row["segment_ids"][fill : fill + n] = seg
            row["positions"][fill : fill + n] = np.arange(n)
            fill += n
    if fill:
        emit_row()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "real_tokens": real, "slots": slots, "documents": len(docs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    docs = corpus()
    start = time.perf_counter()
    tok = train_bpe_tokenizer([d["text"] for d in docs], args.vocab_size)
    emit(
        stage="tokenizer",
        documents=len(docs),
        vocab_size=tok.vocab_size,
        train_seconds=round(time.perf_counter() - start, 2),
    )

    configs = {
        "peer": lambda: run_peer(docs, tok, args.seq_len, args.batch_size),
        "ours_threads0": lambda: run_ours(docs, tok, args.seq_len, args.batch_size, 0),
        "ours": lambda: run_ours(docs, tok, args.seq_len, args.batch_size, 2),
    }
    # Rounds alternate the contenders so that load from other processes on this shared
    # machine hits them alike; each keeps its best round.
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            r = fn()
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
    for name, r in results.items():
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["padding"] = 1 - r["real_tokens"] / max(r["slots"], 1)
        emit(
            stage=name,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seconds=round(r["seconds"], 3),
            real_tokens=r["real_tokens"],
            tokens_per_s=round(r["tokens_per_s"]),
            padding=round(r["padding"], 4),
            documents=r["documents"],
        )
    ours, peer = results["ours"]["tokens_per_s"], results["peer"]["tokens_per_s"]
    emit(ours=round(ours), peer=round(peer), ratio=round(ours / peer, 3), unit="real tokens/s")


if __name__ == "__main__":
    main()
