"""The Qwen2 model itself: presets, parameter counts, axes, remat, RM head, KV cache."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_peer import tiny_qwen2

from qmath_jax import hf
from qmath_jax.model import (
    Transformer,
    count_params,
    get_preset,
    init_cache,
    init_params,
    param_axes,
)
from qmath_jax.model.config import PRESETS, PUBLISHED_PARAM_COUNTS

LOGICAL_AXES = {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "layers", None}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_presets_have_published_param_counts(name):
    assert count_params(PRESETS[name]) == PUBLISHED_PARAM_COUNTS[name]


def test_preset_hyperparameters_match_published_configs():
    m15, m7, m72 = (PRESETS[f"qwen2.5-math-{s}"] for s in ("1.5b", "7b", "72b"))
    assert (m15.embed_dim, m15.mlp_dim, m15.num_layers, m15.num_heads, m15.num_kv_heads,
            m15.vocab_size, m15.tie_embeddings) == (1536, 8960, 28, 12, 2, 151936, True)
    assert (m7.embed_dim, m7.mlp_dim, m7.num_layers, m7.num_heads, m7.num_kv_heads,
            m7.vocab_size, m7.tie_embeddings) == (3584, 18944, 28, 28, 4, 152064, False)
    assert (m72.embed_dim, m72.mlp_dim, m72.num_layers, m72.num_heads, m72.num_kv_heads,
            m72.vocab_size) == (8192, 29568, 80, 64, 8, 152064)
    for cfg in (m15, m7, m72):
        assert cfg.rope_theta == 10000.0 and cfg.max_positions == 4096 and cfg.head_dim == 128


def test_every_param_has_logical_axes_and_layers_are_stacked():
    cfg = get_preset("tiny")
    axes = param_axes(cfg)
    params = init_params(cfg, jax.random.key(0))
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat_axes) == len(flat_params)
    for (path, spec), (_, p) in zip(flat_axes, flat_params):
        assert len(spec) == p.ndim, path
        assert set(spec) <= LOGICAL_AXES, (path, spec)
        if "layers" in jax.tree_util.keystr(path):
            assert spec[0] == "layers" and p.shape[0] == cfg.num_layers
        assert p.dtype == jnp.float32


def _inputs(b=2, t=16, vocab=512, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return tokens, positions, jnp.ones((b, t), jnp.int32)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "minimal"])
def test_remat_policies_give_the_same_loss_and_grads(remat):
    base = get_preset("tiny")
    params = init_params(base, jax.random.key(0))
    tokens, positions, segs = _inputs()

    def loss(p, cfg):
        logits = Transformer(cfg).apply({"params": p}, tokens, positions, segs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    ref_l, ref_g = jax.value_and_grad(loss)(params, base)
    l, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, base.replace(remat=remat))
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, ref_g)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = get_preset("tiny")
    params = init_params(cfg, jax.random.key(1))
    tokens, positions, segs = _inputs()
    f32 = Transformer(cfg).apply({"params": params}, tokens, positions, segs)
    bf16 = Transformer(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens,
                                                           positions, segs)
    assert bf16.dtype == jnp.float32  # logits leave the model in float32
    np.testing.assert_allclose(bf16, f32, atol=5e-2)


def test_reward_head_matches_a_torch_reference(tmp_path):
    """Qwen2.5-Math-RM: the trunk, then score.0 -> ReLU -> score.2, in HF's key names."""
    from safetensors.torch import save_file

    trunk_dir = tmp_path / "trunk"
    lm = tiny_qwen2(str(trunk_dir))
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    tensors = {k: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    tensors.update({f"score.{k}": v for k, v in head.state_dict().items()})
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(rm_dir / "model.safetensors"))
    conf = json.loads((trunk_dir / "config.json").read_text())
    conf["architectures"] = ["Qwen2ForRewardModel"]
    (rm_dir / "config.json").write_text(json.dumps(conf))

    cfg, params = hf.load(str(rm_dir), dtype="float32")
    assert cfg.head == "rm" and "lm_head" not in params
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    ours = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens),
                                  jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12)))
    with torch.no_grad():
        hidden = lm.model(input_ids=torch.tensor(tokens)).last_hidden_state
        ref = head(hidden)[..., 0].numpy()
    assert ours.shape == (2, 12)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    hf.save(cfg, params, str(tmp_path / "rm_out"))
    index = json.loads((tmp_path / "rm_out" / hf.INDEX_FILE).read_text())
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= set(
        index["weight_map"])


def test_decode_steps_equal_a_full_forward():
    cfg = get_preset("tiny")
    params = init_params(cfg, jax.random.key(2))
    model = Transformer(cfg)
    lengths = np.array([5, 9])
    full = np.asarray(jax.random.randint(jax.random.key(3), (2, 14), 0, cfg.vocab_size))
    prompt = full[:, :9].copy()
    segs = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
    prompt = prompt * segs
    cache = init_cache(cfg, 2, 32)
    positions = np.broadcast_to(np.arange(9), (2, 9))
    _, cache = model.apply({"params": params}, prompt, positions, segs, cache=cache)
    np.testing.assert_array_equal(cache["end"], lengths)
    # Feed each row its own continuation, one token per step, and compare with a forward
    # pass over the whole (unpadded) prefix.
    steps = 4
    for s in range(steps):
        tok = np.array([full[b, lengths[b] + s] for b in range(2)])[:, None]
        pos = (lengths + s)[:, None]
        logits, cache = model.apply({"params": params}, tok, pos, np.ones_like(tok), cache=cache)
        for b in range(2):
            n = lengths[b] + s + 1
            seq = full[b : b + 1, :n]
            ref = model.apply({"params": params}, seq, np.arange(n)[None], np.ones_like(seq))
            np.testing.assert_allclose(logits[b, 0], ref[0, -1], atol=1e-5)


# ------------------------------------------------------------------ CPU-tuned code paths


def test_dense_cpu_matches_einsum_values_and_grads():
    from qmath_jax.model.dense import dense_cpu

    keys = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(keys[0], (2, 6, 3, 8))  # [B, T, H, E] against an [H, E, D] kernel
    w = jax.random.normal(keys[1], (3, 8, 5))
    dy = jax.random.normal(keys[2], (2, 6, 5))

    def ref(x, w):
        return jnp.sum(jnp.einsum("BTHE,HED->BTD", x, w) * dy)

    def ours(x, w):
        return jnp.sum(dense_cpu(x, w) * dy)

    np.testing.assert_allclose(dense_cpu(x, w), jnp.einsum("BTHE,HED->BTD", x, w), atol=1e-5)
    want = jax.grad(ref, argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-5)
    assert dense_cpu(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), jnp.float32).dtype == (
        jnp.float32)


@pytest.mark.parametrize("causal,min_query_block", [(True, 64), (True, 5), (False, 4)])
def test_cpu_attention_matches_the_reference_with_padding_and_packing(
    causal, min_query_block, monkeypatch
):
    from qmath_jax.model import attention

    # T=16: one query block by default; 3 uneven causal blocks with a minimum of 5.
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK", min_query_block)
    b, t, h, k, e = 3, 16, 4, 2, 8
    keys = jax.random.split(jax.random.key(6), 4)
    q = jax.random.normal(keys[0], (b, t, h, e))
    kk = jax.random.normal(keys[1], (b, t, k, e))
    v = jax.random.normal(keys[2], (b, t, k, e))
    dout = jax.random.normal(keys[3], (b, t, h, e))
    segs = jnp.array([[1] * 5 + [2] * 7 + [0] * 4, [3] * 16, [0] * 3 + [4] * 13])

    def loss(fn, q, kk, v):
        return jnp.sum(fn(q, kk, v, segs, causal=causal) * dout)

    ref_out = attention.attention_xla(q, kk, v, segs, causal=causal)
    out = attention.attention_xla_cpu(q, kk, v, segs, causal=causal)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    assert not np.any(np.asarray(out)[0, 12:])  # padding rows give zeros
    want = jax.grad(functools.partial(loss, attention.attention_xla), argnums=(0, 1, 2))(q, kk, v)
    got = jax.jit(jax.grad(functools.partial(loss, attention.attention_xla_cpu),
                           argnums=(0, 1, 2)))(q, kk, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_cpu_dense_path_gives_the_xla_paths_loss_and_grads():
    base = get_preset("tiny", dense_impl="xla")
    params = init_params(base, jax.random.key(7))
    tokens, positions, segs = _inputs()

    def loss(p, cfg):
        logits = Transformer(cfg).apply({"params": p}, tokens, positions, segs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_l, ref_g = step(params, base)
    l, g = step(params, base.replace(dense_impl="cpu", scan_unroll=base.num_layers))
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, ref_g)
