"""Batched generation with a KV cache: one prefill, then an on-device decode loop.

`generate` pads prompts into a few bucketed shapes, prefills each distinct prompt once,
repeats its cache rows for the `n` samples, and runs the decode loop as a jitted
`jax.lax.while_loop` that stops when every row has finished. Rows finish on a stop token
id, on a stop string (matched on device as token-id patterns, checked again on the host),
or on the token budget. Finished rows leave the batch: once only half the rows (at least
8) are unfinished, with 16 or more steps left, the loop returns and those rows go on in a
program for a batch half the size (`_run`); on a ragged bench workload this made useful
tokens/s 1.4x those of a loop held at the full batch. Draws depend on a row's key and
step only, so this changes no completion. Nothing else returns to the host.

Decode cost (CPU). On the XLA path the cache is `block_cache`'s: per layer, separate
64-slot key and value blocks, each read by plain batched products under a `lax.cond`
only once some row has reached it, and written in place. On a multi-core CPU `generate`
runs two halves of the rows as two concurrent calls (see `_concurrent_calls`). At batch
64 on two shared Zen 4 cores this took a bench-preset step from ~18 ms to ~5 ms (2.8 ms
on two Zen 5 cores); what is left is mostly the matrix products and reading the cache.

Log-probabilities. `Completion.logprobs[i]` is `log_softmax(logits)[tokens[i]]` of the
model's raw float32 logits at that step: the policy's log-probability at temperature 1,
whatever temperature / top-k / top-p the token was drawn with (the quantity GRPO's
importance ratio needs, and what a training forward pass over the same tokens computes).

Stop strings. Each stop string becomes a set of token-id patterns: the tokens covering it
in the encodings of `pre + s + post` for a few one-character contexts (BPE may merge a
stop string's first or last characters with its neighbours). A row stops on device as
soon as its last generated tokens equal a pattern. The model may still spell a stop
string with other tokens, so after decoding, the host cuts every completion at the
shortest token prefix whose text contains any stop string (if that is earlier than where
the row stopped, or the row did not stop on a string); such a completion reports
"stop_string" too. Only generated text is searched, never the prompt.

Legend: B decode rows (prompts x samples), P prefill rows, T prompt length, S cache
length, s slots of one cache block, N new-token buffer, V vocab, D model, H query heads,
K kv heads (also: kept candidates, top-k), G = H / K, C = G + 2, E head dim,
Q stop patterns, M longest pattern.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STOP_REASONS = ("eos", "stop_string", "length")
_EOS, _STRING, _LENGTH = 1, 2, 3  # device codes of STOP_REASONS; 0 = not stopped
_PAD_TOKEN = -1  # fills finished rows' buffer slots; never a real id
_NO_TOKEN = -2  # initial "recent tokens" entry; matches no pattern slot
# One-character neighbours tried around each stop string when building its patterns.
_CONTEXTS = ("", " ", "\n", "x", "1", ".", "`", "(")


@dataclasses.dataclass
class Completion:
    """One generated continuation.

    Attributes:
      tokens: Generated token ids (prompt excluded). Ends with the stop token when the row
        stopped on a stop token id, or with the token that completes the stop string.
      logprobs: Per token, log_softmax of the model's raw logits (temperature 1) at it.
      stop_reason: "eos" (a stop token id), "stop_string" or "length".
      prompt_index: Index of the prompt in the `prompts` argument.
      sample_index: Which of the `n` samples of that prompt (0..n-1).
      text: `tokenizer.decode(tokens)` when a tokenizer was given, else None.
    """

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    prompt_index: int
    sample_index: int = 0
    text: str | None = None


# ----------------------------------------------------------------------------- sampling


def sample_logits(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    temperature: float | jax.Array,
    top_p: float | jax.Array = 1.0,
    *,
    greedy: bool = False,
    top_k: int = 0,
    use_top_p: bool = True,
) -> jax.Array:
    """Draws one token per row from temperature-scaled, top-k then top-p truncated logits.

    The order is HF's: divide by the temperature, keep the `top_k` largest, then keep the
    smallest prefix (by descending probability, renormalised after top-k) whose mass
    reaches `top_p` (a token is kept when the mass before it is < top_p). Draws use the
    Gumbel-max trick with each row's own key.

    Args:
      logits_BV: [B, V] float logits.
      keys_B: [B] PRNG keys, one per row.
      temperature: > 0 (ignored when greedy).
      top_p: in (0, 1]; applied when `use_top_p`.
      greedy: argmax instead of sampling (static).
      top_k: keep the k largest logits; 0 = all (static).
      use_top_p: whether to apply top_p at all (static; False skips the sort).

    Returns:
      [B] int32 token ids.
    """
    if greedy:
        return _argmax(logits_BV)
    scaled_BV = logits_BV.astype(jnp.float32) / temperature
    vocab = scaled_BV.shape[-1]
    index_BK = None
    if 0 < top_k < vocab:
        vals_BK, index_BK = jax.lax.top_k(scaled_BV, top_k)
    elif use_top_p:
        index_BK = jnp.argsort(-scaled_BV, axis=-1)
        vals_BK = jnp.take_along_axis(scaled_BV, index_BK, axis=-1)
    else:
        vals_BK = scaled_BV
    if use_top_p:
        probs_BK = jax.nn.softmax(vals_BK, axis=-1)
        mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
        vals_BK = jnp.where(mass_before_BK < top_p, vals_BK, -jnp.inf)
    width = vals_BK.shape[-1]
    gumbel_BK = jax.vmap(lambda k: jax.random.gumbel(k, (width,), jnp.float32))(keys_B)
    choice_B = _argmax(vals_BK + gumbel_BK)
    if index_BK is not None:
        choice_B = jnp.take_along_axis(index_BK, choice_B[:, None], axis=-1)[:, 0]
    return choice_B.astype(jnp.int32)


def _argmax(x_BV: jax.Array) -> jax.Array:
    """First index of the row maximum, as jnp.argmax, in int32.

    Two plain reductions: XLA:CPU runs jnp.argmax's (value, index) reduction unvectorised,
    which cost more per decode step than the LM head matmul itself.
    """
    v = x_BV.shape[-1]
    top_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    first_B = jnp.min(jnp.where(x_BV == top_B1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(first_B, v - 1)  # a NaN row has no maximum: keep the id in range


def sample_tokens(
    logits_BV: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> jax.Array:
    """`sample_logits` with plain settings: temperature 0 means greedy; one key for all rows.

    Args:
      logits_BV: [B, V] logits.
      key: a PRNG key; row b uses fold_in(key, b).
      temperature: >= 0.
      top_p: in (0, 1].
      top_k: >= 0 (0 = no top-k).

    Returns:
      [B] int32 token ids.
    """
    _check_sampling(temperature, top_p, top_k)
    keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits_BV.shape[0]))
    return sample_logits(
        logits_BV,
        keys_B,
        max(temperature, 1e-30),
        top_p,
        greedy=temperature == 0.0,
        top_k=top_k,
        use_top_p=top_p < 1.0,
    )


def token_logprobs(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """[B] log_softmax(logits)[token]: the policy log-probability at temperature 1."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- model steps


def _model(cfg, mesh):
    from qmath_jax.model.transformer import Transformer

    return Transformer(cfg, mesh)


def lm_head_logits(cfg, params: dict, hidden_BD: jax.Array) -> jax.Array:
    """Float32 logits of final-norm hidden states, as the model's LM head computes them."""
    dtype = jnp.dtype(cfg.dtype)
    head_DV = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum(
        "BD,DV->BV",
        hidden_BD.astype(dtype),
        head_DV.astype(dtype),
        preferred_element_type=jnp.float32,
    )


def prefill(
    cfg,
    params: dict,
    tokens_PT: jax.Array,
    lengths_P: jax.Array,
    cache: dict,
    mesh=None,
) -> tuple[jax.Array, dict]:
    """Fills an empty cache with right-padded prompts; returns the next-token logits.

    Only each row's last real position goes through the LM head (the model's full
    [P, T, V] logits are unused, so XLA drops them under jit).

    Args:
      cfg: the ModelConfig.
      params: model params.
      tokens_PT: [P, T] prompt ids, right-padded.
      lengths_P: [P] real tokens per row (>= 1).
      cache: an empty cache from `init_cache` with S >= T.
      mesh: the mesh the model is compiled for, or None.

    Returns:
      ([P, V] float32 logits after each prompt, the filled cache with end = lengths).
    """
    t = tokens_PT.shape[1]
    segments_PT = (jnp.arange(t)[None, :] < lengths_P[:, None]).astype(jnp.int32)
    positions_PT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_PT.shape)
    (_, hidden_PTD), cache = _model(cfg, mesh).apply(
        {"params": params},
        tokens_PT * segments_PT,
        positions_PT,
        segments_PT,
        cache=cache,
        return_hidden=True,
    )
    last_PD = jnp.take_along_axis(hidden_PTD, (lengths_P - 1)[:, None, None], axis=1)[:, 0]
    return lm_head_logits(cfg, params, last_PD), cache


def split_cache(cache: dict) -> dict:
    """The model's stacked cache -> one [B, S, K, E] buffer per layer (see `decode_step`)."""
    layers = cache["k"].shape[0]
    return {
        "k": [cache["k"][i] for i in range(layers)],
        "v": [cache["v"][i] for i in range(layers)],
        "end": cache["end"],
    }


def block_cache(cache: dict, block: int, slots: int | None = None) -> dict:
    """The model's stacked cache -> per layer, `slots` cache slots cut into blocks of `block`.

    Layer i's keys become a tuple of [B, K, E, block] buffers (slots minor, so q . k is a
    plain matrix product per row and head that reads the block in place) and its values
    a tuple of [B, K, block, E] buffers. Each block is its own buffer so that attention
    reads exactly the blocks some row has filled, with no slicing copy (see
    `_block_attention`), and a decode step writes its token into one block in place.

    Args:
      cache: the model's cache, k and v [L, B, T, K, E] (e.g. a prompt-sized prefill).
      block: slots per block.
      slots: total slots S >= T, a multiple of `block` (default T); slots past T are
        empty (zero).

    Returns:
      {"k": L tuples of S / block key blocks, "v": the same for values, "end": [B]}.
    """
    layers, b, t, kh, e = cache["k"].shape
    slots = t if slots is None else slots
    if slots % block or slots < t:
        raise ValueError(f"{slots} cache slots must be >= {t} and a multiple of the block {block}")
    k_LBKET = jnp.transpose(cache["k"], (0, 1, 3, 4, 2))
    v_LBKTE = jnp.transpose(cache["v"], (0, 1, 3, 2, 4))

    def key_block(i, j):
        if j >= t:  # past the filled slots: zeros, no slicing or padding of the prefix
            return jnp.zeros((b, kh, e, block), k_LBKET.dtype)
        part = k_LBKET[i, ..., j : j + block]
        return jnp.pad(part, [(0, 0)] * 3 + [(0, block - part.shape[-1])])

    def value_block(i, j):
        if j >= t:
            return jnp.zeros((b, kh, block, e), v_LBKTE.dtype)
        part = v_LBKTE[i, :, :, j : j + block]
        return jnp.pad(part, [(0, 0)] * 2 + [(0, block - part.shape[2]), (0, 0)])

    starts = range(0, slots, block)
    return {
        "k": [tuple(key_block(i, j) for j in starts) for i in range(layers)],
        "v": [tuple(value_block(i, j) for j in starts) for i in range(layers)],
        "end": cache["end"],
    }


def layer_params(params: dict) -> list[dict]:
    """The stacked [L, ...] layer params as L per-layer trees."""
    layers = jax.tree.leaves(params["layers"])[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(layers)]


def decode_weights(params: dict) -> list[dict]:
    """Per layer, `decode_step`'s params, with q, k and v as one matrix grouped by kv head.

    Layer i's attention holds "qkv_DKCE" [D, K, G + 2, E]: for each kv head, its G query
    heads' projections, then its key's, then its value's (bias "qkv_KCE" likewise), so one
    [B, D] x [D, (H + 2K) E] product makes q, k and v. At decode batch sizes a wider
    product costs less than three narrow ones (~4% of a step at batch 64 on two CPU
    cores); grouped by kv head, the matrix shards on kv heads as the model's do. Built
    once before a decode loop.
    """
    out = []
    for lp in layer_params(params):
        a = lp["attn"]
        d, h, e = a["q_kernel"].shape
        kh = a["k_kernel"].shape[1]
        kernel_DKCE = jnp.concatenate(
            [
                a["q_kernel"].reshape(d, kh, h // kh, e),
                a["k_kernel"][:, :, None],
                a["v_kernel"][:, :, None],
            ],
            axis=2,
        )
        bias_KCE = jnp.concatenate(
            [a["q_bias"].reshape(kh, h // kh, e), a["k_bias"][:, None], a["v_bias"][:, None]],
            axis=1,
        )
        attn = {"qkv_DKCE": kernel_DKCE, "qkv_KCE": bias_KCE, "o_kernel": a["o_kernel"]}
        out.append({**lp, "attn": attn})
    return out


def decode_step(
    cfg,
    params: dict,
    tokens_B: jax.Array,
    cache: dict,
    mesh=None,
    weights: list[dict] | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
    """Appends one token per row at cache["end"] and returns ([B, V] logits, cache).

    The cache holds one entry per layer, either `block_cache`'s key and value blocks (the
    XLA path `generate` runs) or `split_cache`'s [B, S, K, E] buffer (attention then goes
    to `attention.decode_attend`, the kernels' layout). The model's scanned decode slices
    each layer out of the stacked [L, B, S, K, E] cache and stacks the update back,
    copying the whole cache several times per token; here each layer's buffers, carried
    through the decode loop, take the new entry in place and attention reads them
    directly. The layer math is `_decode_layer` (the model's decoder layer).

    Args:
      cfg: the ModelConfig.
      params: model params (embedding, final norm and LM head are read from it).
      tokens_B: [B] the previous token of each row.
      cache: `block_cache` or `split_cache` form; row b's token goes to slot end[b], at
        position end[b].
      mesh: the mesh the step is compiled for, or None.
      weights: `decode_weights(params)`, to build them once outside a loop.
      rope: `rope_table(cfg, S)`, to compute the rotary tables once outside a loop.

    Returns:
      ([B, V] float32 logits, the cache with end + 1).
    """
    from qmath_jax.model.transformer import RMSNorm

    weights = decode_weights(params) if weights is None else weights
    end_B = cache["end"]
    x_B1D = jnp.take(params["embedding"], tokens_B[:, None], axis=0).astype(cfg.dtype)
    x_B1D = _constrain(x_B1D, ("batch", "length", "embed"))
    rope_B11e = _step_rope(cfg, end_B, rope)
    new_k, new_v = [], []
    for i, lw in enumerate(weights):
        x_B1D, k_i, v_i = _decode_layer(
            cfg, lw, x_B1D, cache["k"][i], cache["v"][i], end_B, rope_B11e, mesh
        )
        new_k.append(k_i)
        new_v.append(v_i)
    hidden_B1D = RMSNorm(cfg).apply({"params": params["final_norm"]}, x_B1D)
    logits_BV = lm_head_logits(cfg, params, hidden_B1D[:, 0])
    return logits_BV, {"k": new_k, "v": new_v, "end": end_B + 1}


def _constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    import flax.linen as nn

    return nn.with_logical_constraint(x, axes)


def rope_table(cfg, slots: int) -> tuple[jax.Array, jax.Array]:
    """RoPE's (cos, sin) [S, E/2] at cache slots 0..S-1, for `decode_step`.

    Built once before a decode loop, so that a step only gathers each row's entry.
    Computed inside the step instead, cos and sin get fused into every rotation and
    recomputed per output element (~0.07 ms per q or k rotation at batch 64, more than
    the k projection itself).
    """
    from qmath_jax.model.transformer import rope_tables

    cos_1S1e, sin_1S1e = rope_tables(jnp.arange(slots)[None], cfg.head_dim, cfg.rope_theta)
    return cos_1S1e[0, :, 0], sin_1S1e[0, :, 0]


def _step_rope(cfg, end_B, table):
    """RoPE's (cos, sin) [B, 1, 1, E/2] at each row's position, shared by every layer."""
    from qmath_jax.model.transformer import rope_tables

    if table is None:
        return rope_tables(end_B[:, None], cfg.head_dim, cfg.rope_theta)
    return tuple(jnp.take(t_Se, end_B, axis=0)[:, None, None] for t_Se in table)


def _decode_layer(cfg, lw: dict, x_B1D, k_cache, v_cache, end_B, rope_B11e, mesh):
    """One decoder layer for one new token per row: the model's `DecoderLayer` decode path.

    The ops and order of `transformer.Attention` / `DecoderLayer` (norms, RoPE and the MLP
    are the model's own; the RoPE tables come from `_step_rope`) over `decode_weights`'
    layer `lw`; it differs in one q/k/v product, in writing the new k/v straight into this
    layer's cache buffers and, for a `block_cache`, in `_block_attention`, which reads
    only the blocks some row has filled.
    """
    from qmath_jax.model import attention
    from qmath_jax.model.transformer import MLP, RMSNorm, apply_rope

    dtype = jnp.dtype(cfg.dtype)
    a = lw["attn"]
    b, h, e = x_B1D.shape[0], cfg.num_heads, cfg.head_dim
    g = h // cfg.num_kv_heads
    h_B1D = RMSNorm(cfg).apply({"params": lw["input_norm"]}, x_B1D).astype(dtype)
    qkv_B1KCE = jnp.einsum("BTD,DKCE->BTKCE", h_B1D, a["qkv_DKCE"].astype(dtype))
    qkv_B1KCE = qkv_B1KCE + a["qkv_KCE"].astype(dtype)
    q_B1HE = qkv_B1KCE[:, :, :, :g].reshape(b, 1, h, e)
    k_B1KE, v_B1KE = qkv_B1KCE[:, :, :, g], qkv_B1KCE[:, :, :, g + 1]
    q_B1HE = _constrain(apply_rope(q_B1HE, *rope_B11e), ("batch", "length", "heads", "head_dim"))
    k_B1KE = _constrain(apply_rope(k_B1KE, *rope_B11e), ("batch", "length", "kv_heads", "head_dim"))
    if isinstance(k_cache, tuple):
        out_BHE, k_cache, v_cache = _block_attention(
            q_B1HE[:, 0], k_B1KE[:, 0], v_B1KE[:, 0], k_cache, v_cache, end_B
        )
    else:
        rows_B = jnp.arange(end_B.shape[0])
        k_cache = k_cache.at[rows_B, end_B].set(
            k_B1KE[:, 0].astype(k_cache.dtype), unique_indices=True
        )
        v_cache = v_cache.at[rows_B, end_B].set(
            v_B1KE[:, 0].astype(v_cache.dtype), unique_indices=True
        )
        out_BHE = attention.decode_attend(
            q_B1HE[:, 0], k_cache, v_cache, end_B + 1, impl=cfg.attention_impl, mesh=mesh
        )
    attn_B1D = jnp.einsum(  # heads flattened: else XLA relayouts o_kernel every step
        "BTF,FD->BTD",
        out_BHE.reshape(b, 1, h * e).astype(dtype),
        a["o_kernel"].reshape(h * e, -1).astype(dtype),
    )
    x_B1D = x_B1D + attn_B1D
    normed_B1D = RMSNorm(cfg).apply({"params": lw["post_attn_norm"]}, x_B1D)
    x_B1D = x_B1D + MLP(cfg).apply({"params": lw["mlp"]}, normed_B1D)
    return _constrain(x_B1D, ("batch", "length", "embed")), k_cache, v_cache


def _block_attention(q_BHE, k_new_BKE, v_new_BKE, k_blocks, v_blocks, end_B):
    """Writes row b's new key and value at slot end[b], then attends over its slots <= end[b].

    Equals `attention.decode_attention_xla` over the written cache (float32 softmax,
    E**-0.5 scale after the dot), by an online softmax over the blocks of a
    `block_cache` layer. Block j is written and read only when some row has more than
    j * block slots, under a `lax.cond` on max(end) + 1, so a step reads about max(end)
    slots instead of all S, and writes B entries in place, never a whole block. Both
    products are plain batched matrix products over the block buffers as they lie
    (keys [B, K, E, s], values [B, K, s, E]).

    Returns:
      ([B, H, E] in q's dtype, the key blocks, the value blocks).
    """
    b, h, e = q_BHE.shape
    kh, block = k_blocks[0].shape[1], k_blocks[0].shape[3]
    q_BKGE = q_BHE.reshape(b, kh, h // kh, e).astype(jnp.float32)
    longest = jnp.max(end_B) + 1
    carry = (
        jnp.full((b, kh, h // kh), -1e30, jnp.float32),
        jnp.zeros((b, kh, h // kh), jnp.float32),
        jnp.zeros((b, kh, h // kh, e), jnp.float32),
    )
    new_k, new_v = [], []
    for j, (k_BKEs, v_BKsE) in enumerate(zip(k_blocks, v_blocks)):
        step = functools.partial(_block_step, q_BKGE, k_new_BKE, v_new_BKE, end_B, j * block)
        operands = (k_BKEs, v_BKsE, carry)
        if j == 0:  # every row has a slot in block 0
            k_BKEs, v_BKsE, carry = step(*operands)
        else:
            k_BKEs, v_BKsE, carry = jax.lax.cond(j * block < longest, step, _same, *operands)
        new_k.append(k_BKEs)
        new_v.append(v_BKsE)
    _, l_BKG, acc_BKGE = carry
    out_BKGE = acc_BKGE / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
    return out_BKGE.reshape(b, h, e).astype(q_BHE.dtype), tuple(new_k), tuple(new_v)


def _same(*operands):
    return operands


def _block_step(q_BKGE, k_new_BKE, v_new_BKE, end_B, start: int, k_BKEs, v_BKsE, carry):
    """Writes the rows whose slot end[b] lies in this block, then folds the block into the
    running (max, sum, weighted values) of each query."""
    m_BKG, l_BKG, acc_BKGE = carry
    e, block = q_BKGE.shape[-1], k_BKEs.shape[-1]
    rows_B = jnp.arange(end_B.shape[0])
    slot_B = end_B - start
    slot_B = jnp.where((slot_B >= 0) & (slot_B < block), slot_B, block)  # block: dropped
    k_BKEs = k_BKEs.at[rows_B, :, :, slot_B].set(
        k_new_BKE.astype(k_BKEs.dtype), mode="drop", unique_indices=True
    )
    v_BKsE = v_BKsE.at[rows_B, :, slot_B].set(
        v_new_BKE.astype(v_BKsE.dtype), mode="drop", unique_indices=True
    )
    logits_BKGs = jnp.einsum(
        "BKGE,BKEs->BKGs", q_BKGE, k_BKEs.astype(jnp.float32), preferred_element_type=jnp.float32
    ) * (e**-0.5)
    valid_BKGs = ((start + jnp.arange(block))[None, :] <= end_B[:, None])[:, None, None]
    logits_BKGs = jnp.where(valid_BKGs, logits_BKGs, -1e30)
    m_new = jnp.maximum(m_BKG, jnp.max(logits_BKGs, axis=-1))
    p_BKGs = jnp.where(valid_BKGs, jnp.exp(logits_BKGs - m_new[..., None]), 0.0)
    rescale = jnp.exp(m_BKG - m_new)
    pv_BKGE = jnp.einsum(
        "BKGs,BKsE->BKGE", p_BKGs, v_BKsE.astype(jnp.float32), preferred_element_type=jnp.float32
    )
    l_new = l_BKG * rescale + jnp.sum(p_BKGs, axis=-1)
    return k_BKEs, v_BKsE, (m_new, l_new, acc_BKGE * rescale[..., None] + pv_BKGE)


# ----------------------------------------------------------------------------- the jitted loop


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program (one compile per distinct value)."""

    cfg: Any
    mesh: Any
    n: int  # decode rows per prefill row
    buf_len: int  # N, the new-token buffer
    cache_len: int  # S
    block: int  # cache slots per attention block; 0 = one [B, S, K, E] buffer per layer
    cache_dtype: str
    greedy: bool
    top_k: int
    use_top_p: bool
    compact_at: int = 0  # the decode loop stops for compaction at this many unfinished rows


def _constrain_cache(cache: dict, mesh) -> dict:
    """Shards any cache form like the model: rows on data/fsdp, kv heads on tensor.

    Stacked [L, B, S, K, E], `split_cache`'s per-layer [B, S, K, E] or `block_cache`'s
    per-layer key [B, K, E, s] and value [B, K, s, E] blocks.
    """
    if mesh is None:
        return cache
    from qmath_jax import parallel
    from qmath_jax.model.transformer import CACHE_AXES

    layer_axes = CACHE_AXES["k"][1:]  # one layer's [B, S, K, E]
    block_axes = {  # the same names, permuted like `block_cache`
        "k": tuple(layer_axes[i] for i in (0, 2, 3, 1)),
        "v": tuple(layer_axes[i] for i in (0, 2, 1, 3)),
    }

    def constrain(x, axes):
        spec = jax.sharding.PartitionSpec(*axes)
        return jax.lax.with_sharding_constraint(x, parallel.logical_to_sharding(spec, mesh))

    out = {"end": constrain(cache["end"], CACHE_AXES["end"])}
    for name in ("k", "v"):
        if not isinstance(cache[name], list):
            out[name] = constrain(cache[name], CACHE_AXES[name])
        elif isinstance(cache[name][0], tuple):
            out[name] = [tuple(constrain(x, block_axes[name]) for x in t) for t in cache[name]]
        else:
            out[name] = [constrain(x, layer_axes) for x in cache[name]]
    return out


def _decode_cache(prefilled: dict, st: _Static) -> dict:
    """The prompt-sized prefill cache -> the decode loop's, with S = st.cache_len slots.

    The n samples of a prompt share its prefill: its rows are repeated n times. Then one
    entry per layer (see `decode_step`): `block_cache`'s blocks, or [B, S, K, E] buffers
    for an attention kernel (st.block == 0).
    """
    stacked = {name: jnp.repeat(prefilled[name], st.n, axis=1) for name in ("k", "v")}
    stacked["end"] = jnp.repeat(prefilled["end"], st.n)
    if st.block:
        return block_cache(stacked, st.block, st.cache_len)
    pad = [(0, 0)] * 5
    pad[2] = (0, st.cache_len - prefilled["k"].shape[2])
    return split_cache(
        {**stacked, "k": jnp.pad(stacked["k"], pad), "v": jnp.pad(stacked["v"], pad)}
    )


def _stop_checks(tok_B, recent_BM, ngen_B, stop_ids, patterns_QM, pattern_len_Q):
    """(is a stop token id, ends a stop pattern), each [B] bool."""
    is_eos_B = jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)
    slot_hit_BQM = (recent_BM[:, None, :] == patterns_QM[None]) | (patterns_QM[None] < 0)
    hit_BQ = jnp.all(slot_hit_BQM, axis=-1) & (ngen_B[:, None] >= pattern_len_Q[None, :])
    return is_eos_B, jnp.any(hit_BQ, axis=-1)


def _record(state: dict, tok_B, logp_B, step, max_new, stops) -> dict:
    """Writes step's token for the unfinished rows and marks the rows that finish."""
    active_B = ~state["done"]
    out_tok = jax.lax.dynamic_update_slice(
        state["tokens"], jnp.where(active_B, tok_B, _PAD_TOKEN)[:, None], (0, step)
    )
    out_lp = jax.lax.dynamic_update_slice(
        state["logprobs"], jnp.where(active_B, logp_B, 0.0)[:, None], (0, step)
    )
    ngen_B = state["ngen"] + active_B.astype(jnp.int32)
    shifted_BM = jnp.concatenate([state["recent"][:, 1:], tok_B[:, None]], axis=1)
    recent_BM = jnp.where(active_B[:, None], shifted_BM, state["recent"])
    is_eos_B, is_str_B = _stop_checks(tok_B, recent_BM, ngen_B, *stops)
    is_eos_B &= active_B
    is_str_B &= active_B & ~is_eos_B
    is_len_B = active_B & ~is_eos_B & ~is_str_B & (step + 1 >= max_new)
    reason_B = jnp.select(
        [is_eos_B, is_str_B, is_len_B], [_EOS, _STRING, _LENGTH], state["reason"]
    ).astype(jnp.int32)
    return {
        **state,
        "tokens": out_tok,
        "logprobs": out_lp,
        "ngen": ngen_B,
        "recent": recent_BM,
        "reason": reason_B,
        "done": state["done"] | is_eos_B | is_str_B | is_len_B,
        "last": tok_B,
    }


def _draw(st: _Static, keys_B, logits_BV, step, temperature, top_p):
    """(token, its policy log-prob) per row; row b's draw at `step` uses fold_in(keys[b], step)."""
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    tok_B = sample_logits(
        logits_BV,
        step_keys_B,
        temperature,
        top_p,
        greedy=st.greedy,
        top_k=st.top_k,
        use_top_p=st.use_top_p,
    )
    return tok_B, token_logprobs(logits_BV, tok_B)


def _decode_loop(params, state, cache, keys_B, step, max_new, temperature, top_p, stops, st):
    """Decodes until every row finishes, or until at most st.compact_at rows are left.

    Returns (state, cache, step): what `_continue_chunk` takes to go on with fewer rows.
    """
    cfg, mesh = st.cfg, st.mesh
    weights = decode_weights(params)
    rope = rope_table(cfg, st.cache_len)

    def cond(carry):
        step, state, _ = carry
        left = jnp.sum(~state["done"])
        go_on = (left > st.compact_at) | (max_new - step < MIN_COMPACT_STEPS)
        return (step < max_new) & (left > 0) & go_on

    def body(carry):
        step, state, cache = carry
        logits_BV, cache = decode_step(cfg, params, state["last"], cache, mesh, weights, rope)
        tok_B, logp_B = _draw(st, keys_B, logits_BV, step, temperature, top_p)
        return step + 1, _record(state, tok_B, logp_B, step, max_new, stops), cache

    step, state, cache = jax.lax.while_loop(cond, body, (step, state, cache))
    return state, cache, step


@functools.partial(jax.jit, static_argnames=("st",))
def _generate_chunk(
    params, tokens_PT, lengths_P, rows, max_new, key, temperature, top_p, stops, *, st: _Static
):
    """Prefill P rows, repeat each n times, decode the B = P * n rows (see `_decode_loop`).

    Returns (state, cache, row keys, step).
    """
    from qmath_jax.model.transformer import init_cache

    cfg, mesh = st.cfg, st.mesh
    p, t = tokens_PT.shape
    cache = _constrain_cache(init_cache(cfg, p, t, st.cache_dtype), mesh)
    logits_PV, cache = prefill(cfg, params, tokens_PT, lengths_P, cache, mesh)
    cache = _constrain_cache(_decode_cache(cache, st), mesh)
    logits_BV = jnp.repeat(logits_PV, st.n, axis=0)
    b = logits_BV.shape[0]
    # Row keys depend on (prompt, sample) only, so batching and padding never change draws.
    keys_B = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(key, i), j))(
        rows["prompt"], rows["sample"]
    )
    pattern_width = stops[1].shape[1]
    state = {
        "tokens": jnp.full((b, st.buf_len), _PAD_TOKEN, jnp.int32),
        "logprobs": jnp.zeros((b, st.buf_len), jnp.float32),
        "ngen": jnp.zeros((b,), jnp.int32),
        "recent": jnp.full((b, pattern_width), _NO_TOKEN, jnp.int32),
        "reason": jnp.zeros((b,), jnp.int32),
        "done": ~rows["valid"],
        "last": jnp.zeros((b,), jnp.int32),
    }
    tok_B, logp_B = _draw(st, keys_B, logits_BV, 0, temperature, top_p)
    state = _record(state, tok_B, logp_B, 0, max_new, stops)
    state, cache, step = _decode_loop(
        params, state, cache, keys_B, jnp.int32(1), max_new, temperature, top_p, stops, st
    )
    return state, cache, keys_B, step


@functools.partial(jax.jit, static_argnames=("st",))
def _continue_chunk(
    params, state, cache, keys_B, step, take_R, pad_R, max_new, temperature, top_p, stops,
    *, st: _Static
):
    """Keeps rows take_R of a stopped `_decode_loop` (pad_R marks filler rows, finished
    from the start) and decodes on with R rows."""
    def take(x):
        return jnp.take(x, take_R, axis=0)

    state = jax.tree.map(take, state)
    state["done"] = state["done"] | pad_R
    cache = jax.tree.map(take, cache)
    keys_B = take(keys_B)
    state, cache, step = _decode_loop(
        params, state, cache, keys_B, step, max_new, temperature, top_p, stops, st
    )
    return state, cache, keys_B, step


# ----------------------------------------------------------------------------- stop strings


def stop_string_patterns(tokenizer, stop_string: str) -> list[tuple[int, ...]]:
    """Token-id sequences whose decoded text contains `stop_string`, for on-device matching.

    For each one-character context `pre` and `post` (including none), encodes
    `pre + stop_string + post` and keeps the shortest run of tokens that covers the stop
    string: it ends at the first token at which the text contains the string, and starts
    at the last token from which the text still contains it. Every pattern decodes to a
    text containing the stop string, so a match is never a false stop.

    Args:
      tokenizer: has `encode(text)` and `decode(ids)`.
      stop_string: a non-empty string.

    Returns:
      Distinct patterns, the canonical encoding's first.
    """
    if not isinstance(stop_string, str) or not stop_string:
        raise ValueError(f"stop strings must be non-empty str, got {stop_string!r}")
    patterns: list[tuple[int, ...]] = []
    for pre, post in itertools.product(_CONTEXTS, _CONTEXTS):
        ids = list(tokenizer.encode(pre + stop_string + post))
        end = _first_prefix_containing(tokenizer, ids, (stop_string,))
        if end is None:  # the tokenizer does not round-trip this text
            continue
        start = end - 1
        while stop_string not in tokenizer.decode(ids[start:end]):
            start -= 1
        pattern = tuple(ids[start:end])
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def _first_prefix_containing(tokenizer, ids: Sequence[int], strings: Sequence[str]):
    """Smallest k with some string in decode(ids[:k]), or None (monotone: bisection)."""

    def has(k):
        text = tokenizer.decode(ids[:k])
        return any(s in text for s in strings)

    if not ids or not has(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if has(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


_NEVER = 1 << 30  # length of a padding pattern row: no row ever generates that many


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, -(-x // multiple) * multiple)


def _stop_arrays(tokenizer, stop_token_ids: Sequence[int], stop_strings: Sequence[str]):
    """Stop ids [I], right-aligned patterns [Q, M] (-1 = any token) and lengths [Q].

    Sizes are padded to multiples of 4 / 8 / 4 (ids with -1, pattern rows with length
    _NEVER) so calls with different stops share one compiled program.
    """
    ids = np.full(_round_up(len(stop_token_ids), 4), -1, np.int32)  # -1 never matches
    ids[: len(stop_token_ids)] = stop_token_ids
    patterns = [p for s in stop_strings for p in stop_string_patterns(tokenizer, s)]
    width = _round_up(max((len(p) for p in patterns), default=1), 4)
    table = np.full((_round_up(len(patterns), 8), width), -1, np.int32)
    lengths = np.full(table.shape[0], _NEVER, np.int32)
    for q, pat in enumerate(patterns):
        table[q, width - len(pat) :] = pat
        lengths[q] = len(pat)
    return ids, table, lengths


# ----------------------------------------------------------------------------- host side


def _bucket(x: int, minimum: int = 16) -> int:
    """Powers of two up to 1024, then multiples of 512: few shapes, bounded padding."""
    x = max(x, minimum)
    if x <= 1024:
        return 1 << (x - 1).bit_length()
    return -(-x // 512) * 512


ATTENTION_BLOCK = 64  # fewest cache slots per `block_cache` block
MAX_ATTENTION_BLOCKS = 16  # longer caches get bigger blocks


def _cache_geometry(prompt_len: int, buf_len: int, blocks: bool = True) -> tuple[int, int]:
    """(cache slots S, slots per block) for a prompt bucket and a new-token buffer.

    S is whole blocks of a multiple of ATTENTION_BLOCK slots, the smallest such that
    there are at most MAX_ATTENTION_BLOCKS (each block costs a few ops per layer and
    step; a step wastes at most one block's reads). Without blocks (an attention kernel
    reads the cache) the block is 0 and S is whole ATTENTION_BLOCKs.
    """
    slots = prompt_len + buf_len
    block = ATTENTION_BLOCK * -(-slots // (ATTENTION_BLOCK * MAX_ATTENTION_BLOCKS))
    if not blocks:
        return -(-slots // ATTENTION_BLOCK) * ATTENTION_BLOCK, 0
    return -(-slots // block) * block, block


def _batch_bucket(x: int, multiple: int) -> int:
    pow2 = 1 << max(x - 1, 0).bit_length()
    return -(-pow2 // multiple) * multiple


@functools.lru_cache(maxsize=8)
def _check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")


def _check_inputs(
    cfg, prompts, max_new_tokens, n, stop_token_ids, stop_strings, tokenizer, max_batch
) -> list[list[int]]:
    if cfg.head != "lm":
        raise ValueError(f"generate needs a language-model head; this config has head={cfg.head!r}")
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be a positive int, got {n!r}")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to encode and verify them; pass tokenizer=")
    for t in stop_token_ids:
        if not 0 <= int(t) < cfg.vocab_size:
            raise ValueError(f"stop token id {t} is outside the vocabulary [0, {cfg.vocab_size})")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in np.asarray(p, dtype=np.int64).reshape(-1)]
        if not ids:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"prompts[{i}] has ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size}); "
                "the tokenizer and the model config disagree"
            )
        out.append(ids)
    return out


def _units(num_prompts: int, n: int, max_batch: int | None):
    """(prompt, first sample, count) prefill units with `rows` = decode rows per unit."""
    rows = n if max_batch is None else min(n, max_batch)
    units = [(p, s, min(rows, n - s)) for p in range(num_prompts) for s in range(0, n, rows)]
    per_chunk = len(units) if max_batch is None else max(1, max_batch // rows)
    return rows, [units[i : i + per_chunk] for i in range(0, len(units), per_chunk)]


def generate(
    model_cfg,
    params: dict,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    key: jax.Array | None = None,
    mesh=None,
    max_batch: int | None = None,
    cache_dtype: str | None = None,
) -> list[Completion]:
    """Generates `n` continuations of every prompt.

    Args:
      model_cfg: the ModelConfig (an "lm" head).
      params: model params (placed on `mesh` by their logical axes when a mesh is given).
      prompts: token ids of each prompt (non-empty).
      max_new_tokens: most tokens generated per continuation.
      temperature: 0 = greedy; otherwise logits are divided by it before sampling.
      top_p: nucleus truncation in (0, 1] (1 = off), after top-k.
      top_k: keep the k most likely tokens (0 = off).
      n: samples per prompt; they share the prompt's prefill.
      stop_token_ids: ids that end a continuation (kept as its last token; "eos").
      stop_strings: strings that end a continuation (see the module docstring).
      tokenizer: needed for stop_strings; also fills `Completion.text`.
      key: PRNG key; sample j of prompt i at step t uses fold_in(fold_in(fold_in(key, i),
        j), t), so results depend on the key only, not on batching. Default key(0).
      mesh: a ('data', 'fsdp', 'tensor') mesh: batch rows over data x fsdp, kv heads over
        tensor (cache and activations sharded like the model).
      max_batch: most decode rows per compiled call (prompts are processed in chunks).
      cache_dtype: KV cache dtype; default the model's compute dtype.

    Returns:
      len(prompts) * n Completions, prompt-major (prompt 0's n samples first).
    """
    stop_token_ids = tuple(int(t) for t in stop_token_ids)
    stop_strings = tuple(stop_strings)
    _check_sampling(temperature, top_p, top_k)
    prompts = _check_inputs(
        model_cfg, prompts, max_new_tokens, n, stop_token_ids, stop_strings, tokenizer, max_batch
    )
    if key is None:
        key = jax.random.key(0)
    multiple = 1
    if mesh is not None:
        from qmath_jax import parallel

        multiple = parallel.data_parallel_size(mesh)
        params = jax.device_put(params, parallel.param_shardings_on(mesh)(model_cfg))
    stops = tuple(jnp.asarray(x) for x in _stop_arrays(tokenizer, stop_token_ids, stop_strings))
    buf_len = _bucket(max_new_tokens)
    blocks = _uses_blocks(model_cfg, mesh)
    greedy = temperature == 0.0
    calls = _concurrent_calls(mesh, max_batch, len(prompts) * n)
    rows_per_unit, chunks = _units(len(prompts), n, max_batch or -(-len(prompts) * n // calls))
    shapes = _chunk_shapes(prompts, chunks, multiple, same=calls > 1)

    def decode(chunk, p_rows, t_len):
        cache_len, block = _cache_geometry(t_len, buf_len, blocks)
        st = _Static(
            cfg=model_cfg,
            mesh=mesh,
            n=rows_per_unit,
            buf_len=buf_len,
            cache_len=cache_len,
            block=block,
            cache_dtype=str(jnp.dtype(cache_dtype or model_cfg.dtype)),
            greedy=greedy,
            top_k=top_k,
            use_top_p=top_p < 1.0,
            compact_at=_compact_at(p_rows * rows_per_unit, mesh),
        )
        tokens_PT, lengths_P, rows = _chunk_arrays(prompts, chunk, p_rows, t_len, rows_per_unit)
        args = (
            params,
            tokens_PT,
            lengths_P,
            rows,
            np.int32(max_new_tokens),
            key,
            np.float32(max(temperature, 1e-30)),
            np.float32(top_p),
            stops,
        )
        return _run(args, st, mesh), rows

    results: dict[tuple[int, int], Completion] = {}
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        # One call decodes in the caller's thread (its JAX contexts apply as they are).
        run_all = pool.map if calls > 1 else map
        for out, rows in run_all(decode, chunks, *zip(*shapes)):
            _collect(out, rows, tokenizer, stop_strings, results)
    return [results[(p, s)] for p in range(len(prompts)) for s in range(n)]


CPU_CALLS = 2  # compiled decode calls run at once on a multi-core CPU (see `_concurrent_calls`)
MIN_CALL_ROWS = 8  # fewest decode rows worth a call of their own


def _concurrent_calls(mesh, max_batch: int | None, rows: int) -> int:
    """How many chunks `generate` decodes at once, from as many threads.

    XLA:CPU spreads only large ops over the cores, and a decode step is a chain of small
    ones, so the attention reads (memory-bound, a quarter to 40% of a step) and the
    products of a step keep one core. Decoding two halves of the rows as two concurrent
    calls overlaps them: per step at batch 64 on two cores, 6.1 -> 4.9 ms on Zen 4 and
    3.8 -> 2.8 ms on Zen 5 (four calls shrank the matrix products: slower on Zen 4,
    the same on Zen 5). Only when the caller left the batch whole (max_batch=None: two
    half calls hold the same cache memory as one), without a mesh of several devices
    (that places rows on devices already), on a CPU backend.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    several = mesh is not None and mesh.devices.size > 1
    if several or max_batch is not None or jax.default_backend() != "cpu":
        return 1
    return max(1, min(CPU_CALLS, cores or 1, rows // MIN_CALL_ROWS))


def _chunk_shapes(prompts, chunks, multiple: int, same: bool) -> list[tuple[int, int]]:
    """(prefill rows, prompt bucket) per chunk; with `same`, every chunk gets the largest,
    so that concurrent calls share one compiled program."""
    shapes = [
        (_batch_bucket(len(chunk), multiple), _bucket(max(len(prompts[p]) for p, _, _ in chunk)))
        for chunk in chunks
    ]
    if same:
        shapes = [tuple(map(max, zip(*shapes)))] * len(shapes)
    return shapes


def _uses_blocks(cfg, mesh) -> bool:
    """Whether decoding reads a `block_cache` (the XLA path) rather than a kernel's layout."""
    from qmath_jax.model import attention

    return attention.decode_impl(cfg.attention_impl, attention.target_platform(mesh)) == "xla"


MIN_COMPACT_ROWS = 8  # fewest unfinished rows worth moving to a smaller decode program
MIN_COMPACT_STEPS = 16  # fewest remaining steps worth it


def _compact_at(rows: int, mesh) -> int:
    """Unfinished rows at which a decode loop of `rows` rows stops to go on with the
    unfinished ones only (0 = never). Half: finished rows cost a full row each step until
    the last one ends, and a move costs one read of the kept rows' cache. Not on a mesh of
    several devices, whose rows live on different devices."""
    if mesh is not None and mesh.devices.size > 1:
        return 0
    return rows // 2 if rows // 2 >= MIN_COMPACT_ROWS else 0


def _run(args, st: _Static, mesh):
    """Runs a chunk's decode to the end: (tokens, logprobs, ngen, reason) host arrays per row.

    Each time at most st.compact_at rows are unfinished, the loop stops and goes on
    (`_continue_chunk`) with those rows only, in a program for a power-of-two bucket of
    them; finished rows' results are kept here. Draws depend on a row's key and step
    only, so this changes no completion.
    """
    params, max_new, temperature, top_p, stops = args[0], args[4], args[6], args[7], args[8]
    state, cache, keys_B, step = _call(mesh, _generate_chunk, *args, st=st)
    rows_at = np.arange(len(args[3]["valid"]))  # original row of each current row
    real = np.ones(len(rows_at), bool)  # False: a filler row of a compacted batch
    out = None
    while True:
        host = _fetch(mesh, {k: state[k] for k in ("tokens", "logprobs", "ngen", "reason", "done")})
        if out is None:
            out = {k: v.copy() for k, v in host.items()}
        else:
            for k, v in host.items():
                out[k][rows_at[real]] = v[real]
        left = np.flatnonzero(~host["done"])
        if left.size == 0 or int(step) >= int(max_new):
            return out["tokens"], out["logprobs"], out["ngen"], out["reason"]
        r = min(_batch_bucket(left.size, 1), len(rows_at))
        take = np.concatenate([left, np.full(r - left.size, left[0])]).astype(np.int32)
        pad = np.arange(r) >= left.size
        st = dataclasses.replace(st, compact_at=_compact_at(r, mesh) if r < len(rows_at) else 0)
        state, cache, keys_B, step = _call(
            mesh, _continue_chunk, params, state, cache, keys_B, step, take, pad, max_new,
            temperature, top_p, stops, st=st,
        )
        rows_at, real = rows_at[take], ~pad


def _call(mesh, fn, *args, st: _Static):
    if mesh is None:
        return fn(*args, st=st)
    from qmath_jax import parallel

    with jax.set_mesh(mesh), parallel.axis_rules():
        return fn(*args, st=st)


def _fetch(mesh, tree):
    if mesh is None:
        return jax.device_get(tree)
    from qmath_jax import parallel

    return parallel.fetch(tree)  # on a multi-host mesh every host gets every row


def _chunk_arrays(prompts, chunk, p_rows: int, t_len: int, rows_per_unit: int):
    tokens_PT = np.zeros((p_rows, t_len), np.int32)
    lengths_P = np.ones((p_rows,), np.int32)  # padding rows: one dummy token
    b = p_rows * rows_per_unit
    rows = {
        "prompt": np.zeros(b, np.int32),
        "sample": np.zeros(b, np.int32),
        "valid": np.zeros(b, bool),
    }
    for u, (p, s0, count) in enumerate(chunk):
        tokens_PT[u, : len(prompts[p])] = prompts[p]
        lengths_P[u] = len(prompts[p])
        r = slice(u * rows_per_unit, u * rows_per_unit + count)
        rows["prompt"][r] = p
        rows["sample"][r] = np.arange(s0, s0 + count)
        rows["valid"][r] = True
    return tokens_PT, lengths_P, rows


def _collect(out, rows, tokenizer, stop_strings, results) -> None:
    tokens_BN, logprobs_BN, ngen_B, reason_B = (np.asarray(x) for x in out)
    for b in np.flatnonzero(rows["valid"]):
        m = int(ngen_B[b])
        toks = [int(t) for t in tokens_BN[b, :m]]
        lps = [float(x) for x in logprobs_BN[b, :m]]
        reason = STOP_REASONS[int(reason_B[b]) - 1]
        if stop_strings:
            cut = _first_prefix_containing(tokenizer, toks, stop_strings)
            if cut is not None and (cut < m or reason != "stop_string"):
                toks, lps, reason = toks[:cut], lps[:cut], "stop_string"
        text = tokenizer.decode(toks) if tokenizer is not None else None
        p, s = int(rows["prompt"][b]), int(rows["sample"][b])
        results[(p, s)] = Completion(toks, lps, reason, p, s, text)


def make_generate_fn(
    model_cfg,
    params: dict,
    tokenizer,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    key: jax.Array | None = None,
    stop_token_ids: Sequence[int] | None = None,
    mesh=None,
    max_batch: int | None = None,
    cache_dtype: str | None = None,
):
    """A `generate_fn(prompts, max_new_tokens, stop) -> list[Completion]` for the TIR loop.

    One completion per prompt. Call c draws with fold_in(key, c), so a sequence of calls
    is reproducible from the key.

    Args:
      model_cfg: the ModelConfig.
      params: model params.
      tokenizer: encodes stop strings and decodes texts.
      temperature: as in `generate`.
      top_p: as in `generate`.
      top_k: as in `generate`.
      key: PRNG key; default key(0).
      stop_token_ids: default the tokenizer's EOS and `<|im_end|>` ids.
      mesh: as in `generate`.
      max_batch: as in `generate`.
      cache_dtype: as in `generate`.

    Returns:
      The callable.
    """
    _check_sampling(temperature, top_p, top_k)
    if stop_token_ids is None:
        stop_token_ids = tuple(
            dict.fromkeys(i for i in (tokenizer.eos_id, tokenizer.im_end_id) if i is not None)
        )
    base_key = jax.random.key(0) if key is None else key
    calls = itertools.count()

    def generate_fn(prompts, max_new_tokens: int, stop: Sequence[str]) -> list[Completion]:
        return generate(
            model_cfg,
            params,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            n=1,
            stop_token_ids=stop_token_ids,
            stop_strings=tuple(stop),
            tokenizer=tokenizer,
            key=jax.random.fold_in(base_key, next(calls)),
            mesh=mesh,
            max_batch=max_batch,
            cache_dtype=cache_dtype,
        )

    return generate_fn


def kv_cache_bytes_per_token(cfg, cache_dtype: str | None = None) -> int:
    """Theoretical KV cache size of one token: 2 (k, v) * L * K * E * bytes."""
    itemsize = jnp.dtype(cache_dtype or cfg.dtype).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


__all__ = [
    "STOP_REASONS",
    "Completion",
    "block_cache",
    "decode_step",
    "decode_weights",
    "generate",
    "kv_cache_bytes_per_token",
    "layer_params",
    "lm_head_logits",
    "make_generate_fn",
    "prefill",
    "rope_table",
    "sample_logits",
    "sample_tokens",
    "split_cache",
    "stop_string_patterns",
    "token_logprobs",
]
