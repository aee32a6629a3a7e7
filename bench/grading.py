"""Grading throughput: answers extracted and checked per second on 800 real samples.

Runs extract_answer + is_equiv over the 100 x 8 Qwen2.5-Math responses of
``../shared/benchmarks/eval_rm_maj_example/math_cot_100.jsonl`` in one process (the
peer) and split over N worker processes (ours), after a warm-up in each process.
Prints one JSON line per measurement; the last line is
{"ours": answers/s with workers, "peer": answers/s single process, "ratio": ours/peer}.

    python bench/grading.py [--workers N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

DATA = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "benchmarks"
    / "eval_rm_maj_example"
    / "math_cot_100.jsonl"
)


def load_pairs(path: Path) -> list[tuple[str, str]]:
    """(response text, gold answer) for every sampled response."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: the benchmarks must sit beside the checkout")
    with path.open() as f:
        rows = [json.loads(line) for line in f]
    return [(text, r["gt"]) for r in rows for text in r["code"]]


def grade(pair: tuple[str, str]) -> bool:
    """Extracts the answer of one response and checks it against the gold."""
    from qmath_jax.grading import extract_answer, is_equiv

    text, gold = pair
    return is_equiv(extract_answer(text, "math"), gold)


def _init_worker() -> None:
    from qmath_jax.grading import warm_up

    warm_up()


def _reset(_: int) -> None:
    """Empties this process's verdict cache; sleeps so that every pool process takes one."""
    from qmath_jax.grading.equiv import clear_cache

    clear_cache()
    time.sleep(0.2)


def single_process(pairs: list[tuple[str, str]], repeats: int) -> tuple[float, int]:
    """Answers per second in this process, and the number judged correct per pass."""
    _init_worker()
    sum(grade(p) for p in pairs)  # untimed pass: regex and parser caches warm
    elapsed = 0.0
    for _ in range(repeats):
        _reset(0)  # every timed pass starts with no cached verdicts
        start = time.perf_counter()
        correct = sum(grade(p) for p in pairs)
        elapsed += time.perf_counter() - start
    return repeats * len(pairs) / elapsed, correct


def multi_process(pairs: list[tuple[str, str]], repeats: int, workers: int) -> tuple[float, int]:
    """Answers per second over ``workers`` spawned processes, warmed the same way."""
    ctx = multiprocessing.get_context("spawn")
    # One symbolic helper per grading process: the machine has few cores.
    os.environ["QMATH_GRADING_WORKERS"] = "1"
    elapsed = 0.0
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        pool.map(grade, pairs, chunksize=50)  # untimed pass
        for _ in range(repeats):
            pool.map(_reset, range(workers), chunksize=1)
            start = time.perf_counter()
            correct = sum(pool.map(grade, pairs, chunksize=50))
            elapsed += time.perf_counter() - start
    return repeats * len(pairs) / elapsed, correct


def main() -> None:
    """Measures both configurations and prints JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pairs = load_pairs(DATA)

    peer, peer_correct = single_process(pairs, args.repeats)
    print(
        json.dumps(
            {
                "config": "single_process",
                "answers_per_s": round(peer, 1),
                "answers": len(pairs),
                "correct": peer_correct,
            }
        ),
        flush=True,
    )
    ours, ours_correct = multi_process(pairs, args.repeats, args.workers)
    print(
        json.dumps(
            {
                "config": f"{args.workers}_processes",
                "answers_per_s": round(ours, 1),
                "answers": len(pairs),
                "correct": ours_correct,
            }
        ),
        flush=True,
    )
    if ours_correct != peer_correct:
        raise SystemExit(f"verdicts differ: {ours_correct} vs {peer_correct} correct")
    print(
        json.dumps(
            {
                "ours": round(ours, 1),
                "peer": round(peer, 1),
                "ratio": round(ours / peer, 3),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
