"""Generated tokens/s of our sampler against HF transformers `generate`, same weights.

  python bench/generate.py [--batches 16,64] [--new_tokens 256] [--repeats 3]
  JAX_PLATFORMS=cuda python bench/generate.py --preset qwen2.5-math-1.5b --dtype bfloat16

The bench preset in float32 by default, random 32-token prompts, greedy, exactly
`new_tokens` new tokens per row on both sides (no stop tokens for us; min_new_tokens for
HF). Both run on the same device in the same process: the CPU, or with JAX on a GPU the
peer on that GPU too (weights in the model's dtype on both sides, HF's sdpa attention;
the CPU-only lines, `decode_floor` and `ragged_stops`, are left out there).
Prints JSON lines: the KV cache memory per token (theoretical 2 * L * K * E * bytes
against what the compiled program holds, for one call over the whole batch); one line per
side and batch (ours with the number of concurrent decode calls `generate` chose; the
peer at 1 and 2 torch threads on the CPU, its best counted); at the largest batch, our
decode step against what the machine's memory rate and matmul peak allow
(`decode_floor`); one line on rows that stop at different steps (`ragged`: ours as it is
against ours held at the full batch, useful tokens/s); and last {"ours", "peer", "ratio"}
at the largest batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
import jax
import jax.numpy as jnp
import numpy as np

from qmath_jax import hf
from qmath_jax.model import get_preset, init_params
from qmath_jax.sampling import generate, kv_cache_bytes_per_token, sampler

PROMPT_LEN = 32


def timed(fn, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs after one warm-up (compilation)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ours(cfg, params, prompts, new_tokens: int):
    def run():
        out = generate(cfg, params, prompts, new_tokens)
        assert all(len(c.tokens) == new_tokens for c in out)

    return run


def peer(model, prompts, new_tokens: int, threads: int | None):
    """HF greedy generation on the model's device; `threads`: torch CPU threads."""
    import torch

    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=model.device)
    mask = torch.ones_like(ids)

    def run():
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        assert out.shape == (len(prompts), PROMPT_LEN + new_tokens)
        if out.is_cuda:
            torch.cuda.synchronize()

    return run


def cache_memory(cfg, params, batch: int, new_tokens: int) -> dict:
    """Theoretical KV bytes per token against the compiled program's cache buffers."""
    buf_len = sampler._bucket(new_tokens)
    cache_len, block = sampler._cache_geometry(
        sampler._bucket(PROMPT_LEN), buf_len, sampler._uses_blocks(cfg, None)
    )
    theory = kv_cache_bytes_per_token(cfg)
    from qmath_jax.model.transformer import init_cache

    cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len))
    allocated = cache["k"].size * cache["k"].dtype.itemsize * 2
    used_tokens = batch * (PROMPT_LEN + new_tokens)
    st = sampler._Static(
        cfg=cfg,
        mesh=None,
        n=1,
        buf_len=buf_len,
        cache_len=cache_len,
        block=block,
        cache_dtype=cfg.dtype,
        greedy=True,
        top_k=0,
        use_top_p=False,
    )
    rows = {
        "prompt": np.arange(batch, dtype=np.int32),
        "sample": np.zeros(batch, np.int32),
        "valid": np.ones(batch, bool),
    }
    stops = tuple(jnp.asarray(x) for x in sampler._stop_arrays(None, (), ()))
    compiled = sampler._generate_chunk.lower(
        params,
        np.zeros((batch, PROMPT_LEN), np.int32),
        np.full(batch, PROMPT_LEN, np.int32),
        rows,
        np.int32(new_tokens),
        jax.random.key(0),
        np.float32(1),
        np.float32(1),
        stops,
        st=st,
    ).compile()
    memory = compiled.memory_analysis()
    held = memory.temp_size_in_bytes + memory.output_size_in_bytes  # the cache is an output
    return {
        "metric": "kv_cache_memory",
        "batch": batch,
        "theoretical_bytes_per_token": theory,
        "cache_slots": batch * cache_len,
        "allocated_bytes_per_slot": allocated / (batch * cache_len),
        "allocated_bytes_per_used_token": allocated / used_tokens,
        "program_bytes": held,
        "program_bytes_per_slot": held / (batch * cache_len),
    }


def decode_traffic(cfg, params, rows: int, prompt_len: int, new_tokens: int) -> dict:
    """What one decode call of `rows` rows moves and computes per step, averaged over a run
    of `new_tokens` (equal prompts of `prompt_len`): the KV blocks its attention reads
    (`sampler._block_attention` reads block j once some row has more than j * block
    slots), every weight it multiplies by (read once per step: LM head, layer kernels,
    biases and norms) and the FLOPs of its products (weights and attention)."""
    cache_len, block = sampler._cache_geometry(
        sampler._bucket(prompt_len), sampler._bucket(new_tokens)
    )
    # decode step s (1 .. new_tokens - 1) writes slot prompt_len + s - 1: rows then hold
    # prompt_len + s slots, in ceil((prompt_len + s) / block) blocks
    slots = [block * -(-(prompt_len + s) // block) for s in range(1, new_tokens)]
    slots_read = sum(slots) / len(slots)
    layers = jax.tree.leaves(params["layers"])[0].shape[0]
    head = params["embedding"] if cfg.tie_embeddings else params["lm_head"]
    weights = [head, params["final_norm"]["scale"], *jax.tree.leaves(params["layers"])]
    weight_bytes = sum(w.size * w.dtype.itemsize for w in weights)
    kernels = [
        w
        for path, w in jax.tree_util.tree_leaves_with_path(params["layers"])
        if "kernel" in jax.tree_util.keystr(path)
    ]
    matmul_weights = head.size + sum(w.size for w in kernels)
    entry = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize  # k and v
    attention_flops = layers * 2 * 2 * rows * cfg.num_heads * cfg.head_dim * slots_read
    return {
        "cache_slots": cache_len,
        "block": block,
        "slots_read": slots_read,
        "kv_bytes": rows * layers * entry * slots_read,
        "weight_bytes": weight_bytes,
        "flops": 2 * rows * matmul_weights + attention_flops,
    }


def decode_floor(cfg, params, batch: int, new_tokens: int, ours_s: float, peer_s: float):
    """Our decode step against what memory and the matrix products allow, and the goal.

    Each of the `calls` concurrent calls runs on its own core and reads its KV blocks and
    all weights every step (`decode_traffic`); together they share the DRAM rate of as
    many concurrent readers (`common.memory_bandwidth`). `memory_ms` is that traffic at
    that rate, `products_ms` one call's products at one core's share of the matmul peak;
    `overlapped_ms` (the larger) is the step if memory and compute overlapped perfectly,
    `serial_ms` (their sum) if they did not overlap at all. `ours_ms` and `goal_ms` are
    the run's seconds per generated token position, ours and a third of the peer's.
    """
    calls = sampler._concurrent_calls(None, None, batch)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    traffic = decode_traffic(cfg, params, batch // calls, PROMPT_LEN, new_tokens)
    bandwidth = common.memory_bandwidth(streams=calls)
    core_peak = common.matmul_peak_flops() / (cores or 1)
    memory_ms = 1e3 * calls * (traffic["kv_bytes"] + traffic["weight_bytes"]) / bandwidth
    products_ms = 1e3 * traffic["flops"] / core_peak
    return {
        "metric": "decode_floor",
        "batch": batch,
        "calls": calls,
        "kv_mb_per_call_step": traffic["kv_bytes"] / 2**20,
        "weight_mb_per_call_step": traffic["weight_bytes"] / 2**20,
        "dram_gb_per_s": bandwidth / 1e9,
        "memory_ms": memory_ms,
        "products_ms": products_ms,
        "overlapped_ms": max(memory_ms, products_ms),
        "serial_ms": memory_ms + products_ms,
        "ours_ms": 1e3 * ours_s / new_tokens,
        "goal_ms": 1e3 * peer_s / 3 / new_tokens,
    }


def ragged(cfg, params, prompts, new_tokens: int, repeats: int) -> dict:
    """Useful tokens/s when rows stop at different steps (temperature 1, 16 stop ids):
    `generate` as it is, where rows that stopped leave the batch once half have, against
    the same loop held at the full batch until the last row stops (what HF `generate`
    does). Both draw the same completions."""
    kw = {"temperature": 1.0, "stop_token_ids": list(range(0, cfg.vocab_size, 128))}
    lengths = [len(c.tokens) for c in generate(cfg, params, prompts, new_tokens, **kw)]
    seconds = {}

    def full_batch(*_):
        return 0

    for name, compact_at in (("compacting", sampler._compact_at), ("full_batch", full_batch)):
        sampler._compact_at, kept = compact_at, sampler._compact_at
        try:
            seconds[name] = timed(lambda: generate(cfg, params, prompts, new_tokens, **kw), repeats)
        finally:
            sampler._compact_at = kept
    return {
        "metric": "ragged_stops",
        "batch": len(prompts),
        "useful_tokens": sum(lengths),
        "median_length": float(np.median(lengths)),
        "tokens_per_s": {k: sum(lengths) / v for k, v in seconds.items()},
        "speedup": seconds["full_batch"] / seconds["compacting"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="bench", help="model preset (random weights)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    on_gpu = jax.default_backend() == "gpu"
    common.emit(
        **common.machine(), platform=jax.default_backend(), device=jax.devices()[0].device_kind
    )

    import torch
    import transformers

    cfg = get_preset(args.preset, dtype=args.dtype)
    # Weights held in the compute dtype on both sides, as a serving copy is.
    params = jax.tree.map(lambda x: x.astype(cfg.dtype), init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    common.emit(**cache_memory(cfg, params, batches[-1], args.new_tokens))
    with tempfile.TemporaryDirectory() as hf_dir:
        hf.save(cfg, params, hf_dir, dtype=args.dtype)
        model = transformers.Qwen2ForCausalLM.from_pretrained(
            hf_dir, attn_implementation="sdpa", dtype=getattr(torch, args.dtype)
        )
        model.to("cuda" if on_gpu else "cpu")
        model.eval()
        model.generation_config.eos_token_id = None
        results = {}
        for batch in batches:
            prompts = rng.integers(0, cfg.vocab_size, (batch, PROMPT_LEN)).tolist()
            tokens = batch * args.new_tokens
            seconds = timed(ours(cfg, params, prompts, args.new_tokens), args.repeats)
            results[("ours", batch)] = tokens / seconds
            common.emit(
                side="ours",
                batch=batch,
                new_tokens=args.new_tokens,
                seconds=seconds,
                tokens_per_s=tokens / seconds,
                concurrent_calls=sampler._concurrent_calls(None, None, batch),
            )
            # torch's OpenMP threads collapse when the cores are shared: the peer gets
            # its best thread count.
            for threads in (None,) if on_gpu else (1, 2):
                seconds = timed(peer(model, prompts, args.new_tokens, threads), args.repeats)
                best = max(results.get(("peer", batch), 0.0), tokens / seconds)
                results[("peer", batch)] = best
                common.emit(
                    side="peer",
                    batch=batch,
                    new_tokens=args.new_tokens,
                    seconds=seconds,
                    tokens_per_s=tokens / seconds,
                    torch_threads=threads,
                )
    last = batches[-1]
    tokens = last * args.new_tokens
    if not on_gpu:
        common.emit(
            **decode_floor(
                cfg,
                params,
                last,
                args.new_tokens,
                tokens / results[("ours", last)],
                tokens / results[("peer", last)],
            )
        )
        prompts = rng.integers(0, cfg.vocab_size, (last, PROMPT_LEN)).tolist()
        common.emit(**ragged(cfg, params, prompts, args.new_tokens, args.repeats))
    common.emit(
        ours=results[("ours", last)],
        peer=results[("peer", last)],
        ratio=results[("ours", last)] / results[("peer", last)],
        batch=last,
        preset=args.preset,
        dtype=args.dtype,
        unit="generated tokens/s",
    )


if __name__ == "__main__":
    common.host_memory_settings()
    main()
