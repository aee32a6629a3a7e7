"""HF parity: our Qwen2 against transformers' on the same random weights."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from hf_peer import tiny_qwen2, torch_logits

from qmath_jax import hf, safetensors_io
from qmath_jax.model import Transformer

F32 = {"dtype": "float32"}  # compute dtype override


def our_logits(cfg, params, tokens, segment_ids=None, positions=None):
    tokens = jnp.asarray(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    out = Transformer(cfg).apply({"params": params}, tokens, jnp.asarray(positions),
                                 jnp.asarray(segment_ids))
    return np.asarray(out)


@pytest.mark.parametrize("tied,heads,kv_heads", [(False, 4, 4), (True, 4, 2), (False, 8, 2)])
def test_logits_match_transformers(tmp_path, tied, heads, kv_heads):
    model = tiny_qwen2(str(tmp_path), tied=tied, num_heads=heads, num_kv_heads=kv_heads)
    cfg, params = hf.load(str(tmp_path), **F32)
    assert cfg.num_kv_heads == kv_heads and cfg.tie_embeddings == tied
    tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
    np.testing.assert_allclose(our_logits(cfg, params, tokens), torch_logits(model, tokens),
                               atol=1e-4, rtol=1e-4)


def test_padding_and_packed_segments_match_per_document_runs(tmp_path):
    model = tiny_qwen2(str(tmp_path), num_heads=4, num_kv_heads=2)
    cfg, params = hf.load(str(tmp_path), **F32)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 256, 10), rng.integers(0, 256, 7)
    # One row: doc_a, doc_b, then 3 padding tokens.
    tokens = np.concatenate([doc_a, doc_b, [0, 0, 0]])[None]
    segments = np.array([[1] * 10 + [2] * 7 + [0] * 3])
    positions = np.array([list(range(10)) + list(range(7)) + [0] * 3])
    ours = our_logits(cfg, params, tokens, segments, positions)[0]
    np.testing.assert_allclose(ours[:10], torch_logits(model, doc_a[None])[0], atol=1e-4)
    np.testing.assert_allclose(ours[10:17], torch_logits(model, doc_b[None])[0], atol=1e-4)
    # Right padding with an attention mask in HF equals segment 0 in ours.
    padded = np.concatenate([doc_b, [0] * 5])[None]
    mask = np.array([[1] * 7 + [0] * 5])
    ours_pad = our_logits(cfg, params, padded, mask)[0, :7]
    np.testing.assert_allclose(ours_pad, torch_logits(model, padded, mask)[0, :7], atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_and_round_trips_bit_identically(tmp_path, tied):
    import transformers

    src, out, again = tmp_path / "src", tmp_path / "out", tmp_path / "again"
    tiny_qwen2(str(src), tied=tied)
    cfg, params = hf.load(str(src), **F32)
    hf.save(cfg, params, str(out), max_shard_bytes=100_000)  # forces several shards
    index = json.loads((out / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(out)).eval()
    tokens = np.random.default_rng(2).integers(0, 256, (2, 16))
    np.testing.assert_allclose(torch_logits(reloaded, tokens), our_logits(cfg, params, tokens),
                               atol=1e-4, rtol=1e-4)
    cfg2, params2 = hf.load(str(out), **F32)
    hf.save(cfg2, params2, str(again), max_shard_bytes=100_000)
    assert cfg2 == cfg
    for name, fname in index["weight_map"].items():
        a = safetensors_io.SafetensorsFile(str(out / fname)).get(name)
        b = safetensors_io.SafetensorsFile(str(again / fname)).get(name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_bfloat16_export_reads_back(tmp_path):
    tiny_qwen2(str(tmp_path / "src"))
    cfg, params = hf.load(str(tmp_path / "src"))
    hf.save(cfg, params, str(tmp_path / "bf16"), dtype="bfloat16")
    _, params_bf16 = hf.load(str(tmp_path / "bf16"), param_dtype="bfloat16")
    emb = np.asarray(params_bf16["embedding"], np.float32)
    np.testing.assert_allclose(emb, np.asarray(params["embedding"]), rtol=1e-2, atol=1e-3)


def _rewrite(path, drop=None, reshape=None):
    f = safetensors_io.SafetensorsFile(str(path))
    tensors = []
    for name in f:
        if name == drop:
            continue
        arr = np.array(f.get(name))
        if name == reshape:
            arr = arr[:-1]
        tensors.append((name, arr))
    safetensors_io.write(str(path), tensors)


def test_missing_tensor_is_named(tmp_path):
    tiny_qwen2(str(tmp_path))
    _rewrite(tmp_path / "model.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(hf.CheckpointMismatchError, match=r"missing.*layers\.1\.mlp\.up_proj"):
        hf.load(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    tiny_qwen2(str(tmp_path))
    _rewrite(tmp_path / "model.safetensors", reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(hf.CheckpointMismatchError, match=r"k_proj.weight: checkpoint \(31, 64\)"):
        hf.load(str(tmp_path))


def test_wrong_config_is_refused(tmp_path):
    tiny_qwen2(str(tmp_path))
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(hf.CheckpointMismatchError, match=r"missing.*model\.layers\.2\."):
        hf.load(str(tmp_path))
    conf["num_hidden_layers"], conf["hidden_act"] = 2, "gelu"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="hidden_act"):
        hf.load(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path))


def test_cli_import_then_export_round_trips(tmp_path):
    import subprocess
    import sys

    import transformers

    model = tiny_qwen2(str(tmp_path / "hf"), tied=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for args in (["import", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")],
                 ["export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]):
        subprocess.run([sys.executable, "-m", "qmath_jax.hf", *args], check=True, env=env,
                       capture_output=True, timeout=300)
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    tokens = np.random.default_rng(4).integers(0, 256, (1, 10))
    np.testing.assert_allclose(torch_logits(back, tokens), torch_logits(model, tokens), atol=1e-5)
