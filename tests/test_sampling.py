"""Sampler: HF greedy parity, cache-step logits, log-probs, sampling statistics, stops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_peer import tiny_qwen2

from qmath_jax import hf
from qmath_jax.data.synthetic import SyntheticMath
from qmath_jax.data.tokenizer import IM_END, train_bpe_tokenizer
from qmath_jax.model import Transformer, get_preset, init_params
from qmath_jax.model.transformer import init_cache
from qmath_jax.parallel import make_mesh
from qmath_jax.sampling import (
    STOP_REASONS,
    decode_step,
    generate,
    make_generate_fn,
    prefill,
    sample_tokens,
    sampler,
    split_cache,
    stop_string_patterns,
)
from qmath_jax.sampling.sampler import block_cache, rope_table

scipy_stats = pytest.importorskip("scipy.stats")

PROMPT_LENGTHS = (3, 9, 16, 6)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """(torch model, our cfg, our params) with the same random weights."""
    d = str(tmp_path_factory.mktemp("qwen2"))
    model = tiny_qwen2(d, vocab=256, hidden=64, layers=2, mlp=96, seed=3)
    cfg, params = hf.load(d, dtype="float32")
    return model, cfg, params


@pytest.fixture(scope="module")
def prompts(peer):
    rng = np.random.default_rng(0)
    return [rng.integers(0, peer[1].vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tok_model():
    """A small BPE tokenizer and a random model over its vocabulary."""
    ds = SyntheticMath(seed=1)
    tok = train_bpe_tokenizer([ds[i]["cot"] for i in range(60)], vocab_size=400)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    return tok, cfg, init_params(cfg, jax.random.key(7))


def _full_logits(cfg, params, seqs, width=64):
    """Logits of one full (uncached) forward pass per sequence, right-padded to `width`."""
    tokens = np.zeros((len(seqs), width), np.int32)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    lengths = np.array([len(s) for s in seqs])
    segments = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    return np.asarray(_apply(cfg, params, tokens, segments))


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, segments):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return Transformer(cfg).apply({"params": params}, tokens, positions, segments)


def _full_logprobs(cfg, params, prompt, tokens):
    """log_softmax of one full forward pass over prompt + tokens, at each generated token."""
    width = -(-(len(prompt) + len(tokens)) // 64) * 64
    logits = _full_logits(cfg, params, [prompt + tokens], width)[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    pos = np.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return np.asarray(logp[pos, np.array(tokens)])


@pytest.mark.parametrize("new", [16, 150])
def test_greedy_matches_hf_generate(peer, prompts, new):
    """16 new tokens fit one 64-slot attention block; 150 fill three (per-block conds)."""
    model, cfg, params = peer
    ours = generate(cfg, params, prompts, new)
    for i, p in enumerate(prompts):
        with torch.no_grad():  # HF per prompt, unpadded
            out = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=int),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        assert ours[i].tokens == out[0, len(p) :].tolist(), f"prompt {i}"
        assert ours[i].stop_reason == "length" and ours[i].prompt_index == i
        np.testing.assert_allclose(
            ours[i].logprobs, _full_logprobs(cfg, params, p, ours[i].tokens), atol=1e-5
        )


@pytest.mark.parametrize("form", ["split", "block"])
def test_prefill_and_decode_step_logits_equal_a_full_forward(peer, prompts, form):
    """Both cache forms: split_cache's buffers (attention kernels' layout) and
    block_cache's blocks (the XLA path) with a precomputed rope table. The blocks are
    6 slots over a 16-slot prefill cache extended to 24 slots, so the rows (3 and 9
    prompt tokens) write and read several blocks, at different ones, one of them
    partly prefilled and one past the prefill."""
    _, cfg, params = peer
    rows = prompts[:2]
    lengths = np.array([len(p) for p in rows], np.int32)
    tokens = np.zeros((2, 16), np.int32)
    for b, p in enumerate(rows):
        tokens[b, : len(p)] = p
    rng = np.random.default_rng(1)
    cont = rng.integers(0, cfg.vocab_size, (2, 5))
    logits, cache = jax.jit(lambda t, n, c: prefill(cfg, params, t, n, c))(
        tokens, lengths, init_cache(cfg, 2, 64 if form == "split" else 16)
    )
    np.testing.assert_array_equal(cache["end"], lengths)
    if form == "split":
        cache, rope = split_cache(cache), None
    else:
        cache, rope = block_cache(cache, 6, slots=24), rope_table(cfg, 24)
    step = jax.jit(lambda t, c: decode_step(cfg, params, t, c, rope=rope))
    # A causal forward over the whole sequence gives every prefix's next-token logits.
    full = _full_logits(cfg, params, [p + cont[b].tolist() for b, p in enumerate(rows)])
    for s in range(cont.shape[1] + 1):
        for b, p in enumerate(rows):
            np.testing.assert_allclose(
                logits[b], full[b, len(p) - 1 + s], atol=1e-5, err_msg=f"step {s}"
            )
        if s < cont.shape[1]:
            logits, cache = step(cont[:, s].astype(np.int32), cache)
    np.testing.assert_array_equal(cache["end"], lengths + cont.shape[1])


def test_cache_geometry_has_few_whole_blocks():
    for prompt_len, buf_len in [(16, 16), (32, 256), (512, 2048), (4096, 4096)]:
        slots, block = sampler._cache_geometry(prompt_len, buf_len)
        assert slots >= prompt_len + buf_len and slots % block == 0 and block % 64 == 0
        assert slots // block <= sampler.MAX_ATTENTION_BLOCKS
        assert slots - block < prompt_len + buf_len  # no wholly unused block
    assert sampler._cache_geometry(32, 256, blocks=False) == (320, 0)


def _truncated(logits, temperature, top_k, top_p):
    """The distribution sampling should follow, computed in numpy (HF's order)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    keep[order[mass_before >= top_p]] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.5, 6, 0.7)],
)
def test_sampling_frequencies_match_the_truncated_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, 0.8, -2.0, 1.0], np.float32)
    draws = 20_000
    tokens = sample_tokens(
        jnp.broadcast_to(logits, (draws, len(logits))),
        jax.random.key(0),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    counts = np.bincount(np.asarray(tokens), minlength=len(logits))
    expected = _truncated(logits, temperature, top_k, top_p)
    support = expected > 0
    assert counts[~support].sum() == 0, "a truncated token was drawn"
    p_value = scipy_stats.chisquare(counts[support], draws * expected[support]).pvalue
    assert p_value > 1e-3, (counts, expected)
    # The test has power: the untempered, untruncated softmax is rejected.
    plain = np.exp(logits.astype(np.float64))
    plain /= plain.sum()
    assert scipy_stats.chisquare(counts, draws * plain).pvalue < 1e-6


def test_greedy_sample_tokens_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (7, 50))
    np.testing.assert_array_equal(
        sample_tokens(logits, jax.random.key(0), temperature=0.0), np.argmax(logits, axis=-1)
    )


def test_n_samples_share_a_key_schedule_and_report_policy_logprobs(peer, prompts):
    _, cfg, params = peer
    kw = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "n": 3, "key": jax.random.key(11)}
    out = generate(cfg, params, prompts[:2], 8, **kw)
    assert [(c.prompt_index, c.sample_index) for c in out] == [
        (i, j) for i in range(2) for j in range(3)
    ]
    for i in range(2):
        assert len({tuple(c.tokens) for c in out[3 * i : 3 * i + 3]}) > 1
    for c in out:  # log-probs are the policy's (temperature 1, untruncated)
        ref = _full_logprobs(cfg, params, prompts[c.prompt_index], c.tokens)
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-5)
    again = generate(cfg, params, prompts[:2], 8, **kw)
    assert [c.tokens for c in again] == [c.tokens for c in out]
    # Draws depend on the key and (prompt, sample) only, not on how rows are batched.
    chunked = generate(cfg, params, prompts[:2], 8, max_batch=2, **kw)
    assert [c.tokens for c in chunked] == [c.tokens for c in out]
    for a, b in zip(chunked, out):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    other = generate(cfg, params, prompts[:2], 8, **{**kw, "key": jax.random.key(12)})
    assert [c.tokens for c in other] != [c.tokens for c in out]


def test_concurrent_calls_equal_one_call(peer, prompts, monkeypatch):
    """generate's concurrent half-batch calls (multi-core CPU) change no completion."""
    _, cfg, params = peer
    kw = {"temperature": 0.8, "n": 5, "key": jax.random.key(3)}
    one = generate(cfg, params, prompts, 10, max_batch=20, **kw)
    monkeypatch.setattr(sampler, "_concurrent_calls", lambda *_: 2)
    two = generate(cfg, params, prompts, 10, **kw)
    assert [(c.prompt_index, c.sample_index, c.tokens) for c in two] == [
        (c.prompt_index, c.sample_index, c.tokens) for c in one
    ]
    for a, b in zip(two, one):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_finished_rows_leave_the_batch_without_changing_completions(
        tok_model, monkeypatch, temperature):
    """Once half the rows have stopped, decoding goes on with the rest only, and every
    completion (tokens, log-probs, stop reason) equals the full-batch loop's."""
    _, cfg, params = tok_model
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg.vocab_size, rng.integers(3, 20)).tolist() for _ in range(32)]
    kw = {"temperature": temperature, "key": jax.random.key(5),
          "stop_token_ids": list(range(0, cfg.vocab_size, 8))}  # ragged ends
    moves = []
    real_continue = sampler._continue_chunk

    def counting(*args, st):
        moves.append(int(np.sum(~np.asarray(args[6]))))  # kept (non-filler) rows
        return real_continue(*args, st=st)

    monkeypatch.setattr(sampler, "_continue_chunk", counting)
    compacted = generate(cfg, params, prompts, 48, **kw)
    moved = len(moves)
    assert moved, "no row left the batch: the test needs rows that stop at different steps"
    monkeypatch.setattr(sampler, "_compact_at", lambda *_: 0)
    full = generate(cfg, params, prompts, 48, **kw)
    assert len(moves) == moved  # the full-batch run moved nothing
    assert len({len(c.tokens) for c in full}) > 8
    for a, b in zip(compacted, full):
        assert (a.prompt_index, a.stop_reason, a.tokens) == (b.prompt_index, b.stop_reason,
                                                             b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_mesh_generation_equals_single_device(peer, prompts):
    _, cfg, params = peer
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    single = generate(cfg, params, prompts, 6)
    sharded = generate(cfg, params, prompts, 6, mesh=mesh)
    assert [c.tokens for c in sharded] == [c.tokens for c in single]
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def _first_prefix_with(tok, ids, s):
    return next(k for k in range(1, len(ids) + 1) if s in tok.decode(ids[:k]))


def test_stop_token_ids_and_stop_strings(tok_model):
    tok, cfg, params = tok_model
    prompt = tok.encode("What is 12 + 30? The answer is")
    free = generate(cfg, params, [prompt], 40, tokenizer=tok)[0]
    g = free.tokens
    assert free.stop_reason == "length" and len(g) == 40 and free.text == tok.decode(g)

    stop_id = g[7]
    c = generate(cfg, params, [prompt], 40, stop_token_ids=[stop_id])[0]
    assert c.tokens == g[: g.index(stop_id) + 1] and c.stop_reason == "eos"
    assert len(c.logprobs) == len(c.tokens) and c.text is None

    # A stop string spelled by generated tokens, and one that lies inside a single token
    # (its own encoding never appears, so only the host check can find it).
    inner = next(t for t in g if len(tok.decode([t]).strip()) >= 2)
    for s in (tok.decode(g[10:13]), tok.decode([inner]).strip()[1:]):
        c = generate(cfg, params, [prompt], 40, stop_strings=[s], tokenizer=tok)[0]
        cut = _first_prefix_with(tok, g, s)
        assert c.tokens == g[:cut] and c.stop_reason == "stop_string", repr(s)
        assert s in c.text and s not in tok.decode(c.tokens[:-1])
        np.testing.assert_allclose(c.logprobs, free.logprobs[:cut], atol=1e-6)


def test_stop_string_patterns(tok_model):
    tok = tok_model[0]
    assert stop_string_patterns(tok, IM_END) == [(tok.im_end_id,)]
    pats = stop_string_patterns(tok, "```output")
    assert pats[0] == tuple(tok.encode("```output"))
    for pat in pats:
        assert "```output" in tok.decode(pat)
        assert "```output" not in tok.decode(pat[1:])


def test_make_generate_fn_follows_the_tir_protocol(tok_model):
    tok, cfg, params = tok_model
    prompts = [tok.encode("Compute 3 * 4."), tok.encode("Solve x + 1 = 5 for x")]
    fn = make_generate_fn(cfg, params, tok, temperature=1.0, key=jax.random.key(5))
    first = fn(prompts, 12, ["```output"])
    second = fn(prompts, 12, ["```output"])
    assert len(first) == 2
    for c in first + second:
        assert c.stop_reason in STOP_REASONS and len(c.tokens) == len(c.logprobs) <= 12
    assert [c.tokens for c in first] != [c.tokens for c in second]  # a fresh key per call
    replay = make_generate_fn(cfg, params, tok, temperature=1.0, key=jax.random.key(5))
    assert [c.tokens for c in replay(prompts, 12, ["```output"])] == [c.tokens for c in first]


def test_bad_input_is_refused_with_the_fix(peer, tok_model):
    _, cfg, params = peer
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(cfg, params, [[1], []], 4)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\)"):
        generate(cfg, params, [[1, 999]], 4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(cfg, params, [[1]], 4, stop_strings=["x"])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(cfg, params, [[1]], 4, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(cfg, params, [[1]], 4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(cfg, params, [[1]], 0)
    with pytest.raises(ValueError, match="language-model head"):
        generate(cfg.replace(head="rm"), params, [[1]], 4)
