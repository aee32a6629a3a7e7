"""Import Qwen2 checkpoints from, and export them to, the Hugging Face format.

`load(hf_dir)` reads `config.json` and (sharded) safetensors tensor by tensor, and can
place each tensor straight into its sharding so a 72B checkpoint never sits twice in
host memory. `save(config, params, out_dir)` writes sharded safetensors, the
`model.safetensors.index.json` and a `config.json` that `transformers` loads as
`Qwen2ForCausalLM` (or `Qwen2ForRewardModel` for the RM head).

CLI:
  python -m qmath_jax.hf import --hf_dir DIR --out DIR
  python -m qmath_jax.hf export --checkpoint DIR --out DIR [--dtype bfloat16]

Any DIR may be a bucket (gs://...). safetensors are memory-mapped, so a remote HF
directory is first downloaded to a local temporary directory, and an export to a bucket is
written locally and then uploaded: both need the checkpoint's size in local disk space.

Legend: L layers, D model, H heads, K kv heads, E head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from qmath_jax import fileio, safetensors_io
from qmath_jax.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors older checkpoints carry that hold no learned state.
_BENIGN_EXTRA = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model its config describes."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One of our params and the HF tensor(s) it comes from.

    `hf` is a name template with `{i}` for the layer when `stacked`; `to_ours` maps an HF
    array to our layout for one layer, `to_hf` the reverse.
    """

    path: tuple[str, ...]
    hf: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    stacked: bool = True


def _t(x, cfg):
    return x.T


def _same(x, cfg):
    return x


def _heads_in(n_heads: Callable[[ModelConfig], int]):
    def to_ours(w, cfg):  # [N*E, D] -> [D, N, E]
        return w.T.reshape(cfg.embed_dim, n_heads(cfg), cfg.head_dim)

    def to_hf(w, cfg):  # [D, N, E] -> [N*E, D]
        return w.reshape(cfg.embed_dim, -1).T

    return to_ours, to_hf


def _bias_in(n_heads: Callable[[ModelConfig], int]):
    return (lambda b, cfg: b.reshape(n_heads(cfg), cfg.head_dim),
            lambda b, cfg: b.reshape(-1))


def _o_to_ours(w, cfg):  # [D, H*E] -> [H, E, D]
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.embed_dim)


def _o_to_hf(w, cfg):  # [H, E, D] -> [D, H*E]
    return w.reshape(-1, cfg.embed_dim).T


def _h(cfg):
    return cfg.num_heads


def _k(cfg):
    return cfg.num_kv_heads


_LAYER = "model.layers.{i}."


def _tensor_table(cfg: ModelConfig) -> list[_Tensor]:
    """Every param of `cfg`'s model with its HF name and layout maps."""
    d, f, v = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
    qe, ke = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = ("layers", "attn")
    table = [
        _Tensor(("embedding",), "model.embed_tokens.weight", lambda c: (v, d), _same, _same,
                stacked=False),
        _Tensor(attn + ("q_kernel",), _LAYER + "self_attn.q_proj.weight", lambda c: (qe, d),
                *_heads_in(_h)),
        _Tensor(attn + ("q_bias",), _LAYER + "self_attn.q_proj.bias", lambda c: (qe,),
                *_bias_in(_h)),
        _Tensor(attn + ("k_kernel",), _LAYER + "self_attn.k_proj.weight", lambda c: (ke, d),
                *_heads_in(_k)),
        _Tensor(attn + ("k_bias",), _LAYER + "self_attn.k_proj.bias", lambda c: (ke,),
                *_bias_in(_k)),
        _Tensor(attn + ("v_kernel",), _LAYER + "self_attn.v_proj.weight", lambda c: (ke, d),
                *_heads_in(_k)),
        _Tensor(attn + ("v_bias",), _LAYER + "self_attn.v_proj.bias", lambda c: (ke,),
                *_bias_in(_k)),
        _Tensor(attn + ("o_kernel",), _LAYER + "self_attn.o_proj.weight", lambda c: (d, qe),
                _o_to_ours, _o_to_hf),
        _Tensor(("layers", "mlp", "gate_kernel"), _LAYER + "mlp.gate_proj.weight",
                lambda c: (f, d), _t, _t),
        _Tensor(("layers", "mlp", "up_kernel"), _LAYER + "mlp.up_proj.weight",
                lambda c: (f, d), _t, _t),
        _Tensor(("layers", "mlp", "down_kernel"), _LAYER + "mlp.down_proj.weight",
                lambda c: (d, f), _t, _t),
        _Tensor(("layers", "input_norm", "scale"), _LAYER + "input_layernorm.weight",
                lambda c: (d,), _same, _same),
        _Tensor(("layers", "post_attn_norm", "scale"), _LAYER + "post_attention_layernorm.weight",
                lambda c: (d,), _same, _same),
        _Tensor(("final_norm", "scale"), "model.norm.weight", lambda c: (d,), _same, _same,
                stacked=False),
    ]
    if cfg.head == "rm":
        table += [
            _Tensor(("score", "0_kernel"), "score.0.weight", lambda c: (d, d), _t, _t, False),
            _Tensor(("score", "0_bias"), "score.0.bias", lambda c: (d,), _same, _same, False),
            _Tensor(("score", "2_kernel"), "score.2.weight", lambda c: (1, d), _t, _t, False),
            _Tensor(("score", "2_bias"), "score.2.bias", lambda c: (1,), _same, _same, False),
        ]
    elif not cfg.tie_embeddings:
        table.append(_Tensor(("lm_head",), "lm_head.weight", lambda c: (v, d), _t, _t, False))
    return table


def _hf_names(entry: _Tensor, cfg: ModelConfig) -> list[str]:
    if entry.stacked:
        return [entry.hf.format(i=i) for i in range(cfg.num_layers)]
    return [entry.hf]


# ---------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """Our ModelConfig from an HF Qwen2 `config.json` dict; refuses what we do not model."""
    model_type = hf_config.get("model_type")
    if model_type not in ("qwen2", None):
        raise ValueError(f"config.json: model_type={model_type!r}; only 'qwen2' is supported")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r}; Qwen2 uses 'silu'")
    rope = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"config.json: rope scaling {rope_type!r} is not supported; "
                         "remove rope_scaling to use plain RoPE")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if k not in hf_config]
    if missing:
        raise ValueError(f"config.json lacks {missing}; it is not a Qwen2 config")
    archs = hf_config.get("architectures") or ["Qwen2ForCausalLM"]
    heads = hf_config["num_attention_heads"]
    fields = {
        "vocab_size": hf_config["vocab_size"],
        "embed_dim": hf_config["hidden_size"],
        "mlp_dim": hf_config["intermediate_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf_config.get("num_key_value_heads") or heads,
        "head_dim": hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        "rope_theta": float(rope.get("rope_theta") or hf_config.get("rope_theta", 10000.0)),
        "rms_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "max_positions": hf_config.get("max_position_embeddings", 4096),
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "head": "rm" if "Qwen2ForRewardModel" in archs else "lm",
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32", eos_id: int | None = None) -> dict:
    """An HF `config.json` dict for `cfg`; Qwen's <|endoftext|> id unless `eos_id` is given."""
    if eos_id is None and cfg.vocab_size > 151643:
        eos_id = 151643
    arch = "Qwen2ForRewardModel" if cfg.head == "rm" else "Qwen2ForCausalLM"
    return {
        "architectures": [arch],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "torch_dtype": torch_dtype,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }


# ---------------------------------------------------------------------------- load


class _HFReader:
    """Finds each HF tensor in a (sharded) safetensors checkpoint, opening files lazily."""

    def __init__(self, hf_dir: str):
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
            single = SINGLE_FILE
            weight_map = dict.fromkeys(
                safetensors_io.SafetensorsFile(os.path.join(hf_dir, single)), single)
        else:
            raise FileNotFoundError(f"{hf_dir}: no {INDEX_FILE} or {SINGLE_FILE}; "
                                    "point --hf_dir at a Hugging Face checkpoint directory")
        self.hf_dir = hf_dir
        self.weight_map = weight_map
        self._files: dict[str, safetensors_io.SafetensorsFile] = {}

    def _file(self, name: str) -> safetensors_io.SafetensorsFile:
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = safetensors_io.SafetensorsFile(os.path.join(self.hf_dir, fname))
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)


def _check_tensors(reader: _HFReader, cfg: ModelConfig, table: list[_Tensor]) -> None:
    expected = {n: e.hf_shape(cfg) for e in table for n in _hf_names(e, cfg)}
    present = set(reader.weight_map)
    missing = sorted(set(expected) - present)
    tied_extra = {"lm_head.weight"} if cfg.tie_embeddings or cfg.head == "rm" else set()
    unexpected = sorted(n for n in present - set(expected) - tied_extra
                        if not n.endswith(_BENIGN_EXTRA))
    wrong = [f"{n}: checkpoint {reader.shape(n)}, model expects {s}"
             for n, s in expected.items() if n in present and reader.shape(n) != s]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_preview(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_preview(wrong)}")
    if problems:
        raise CheckpointMismatchError(
            f"{reader.hf_dir} does not match its config.json ({cfg.num_layers} layers, hidden "
            f"{cfg.embed_dim}, vocab {cfg.vocab_size}): " + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _preview(items: list[str], n: int = 8) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _our_shape(entry: _Tensor, cfg: ModelConfig) -> tuple[int, ...]:
    one = entry.to_ours(np.zeros(entry.hf_shape(cfg), np.float32), cfg).shape
    return ((cfg.num_layers,) if entry.stacked else ()) + tuple(one)


def _read_layers(reader, entry, cfg, layers: range, dtype) -> np.ndarray:
    parts = [entry.to_ours(reader.get(entry.hf.format(i=i)), cfg).astype(dtype) for i in layers]
    return np.stack(parts)


def _load_one(reader, entry, cfg, dtype, sharding):
    shape = _our_shape(entry, cfg)
    if not entry.stacked:
        host = entry.to_ours(reader.get(entry.hf), cfg).astype(dtype)
        return jax.device_put(host, sharding) if sharding is not None else jax.numpy.asarray(host)
    if sharding is None:
        out = np.empty(shape, dtype)
        for i in range(cfg.num_layers):
            out[i] = entry.to_ours(reader.get(entry.hf.format(i=i)), cfg)
        return jax.numpy.asarray(out)

    def shard(index):  # read only the layers this device holds, then slice the rest
        layers = range(*index[0].indices(cfg.num_layers))
        return _read_layers(reader, entry, cfg, layers, dtype)[(slice(None),) + index[1:]]

    return jax.make_array_from_callback(shape, sharding, shard)


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_on(hf_dir: str, mesh=None, **config_overrides):
    """`load` with every tensor read straight into its shard of `mesh` (by the logical axes of
    the checkpoint's own architecture; None: unsharded)."""
    from qmath_jax import parallel

    return load(hf_dir, parallel.param_shardings_on(mesh), **config_overrides)


def load(hf_dir: str, shardings=None, **config_overrides):
    """Loads an HF Qwen2 checkpoint.

    Args:
      hf_dir: a directory with `config.json` and safetensors (sharded with an index, or one
        `model.safetensors`); a bucket's is downloaded to a temporary directory first.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params (or a
        function of the checkpoint's ModelConfig giving it); each tensor is then read per
        device shard straight into place.
      **config_overrides: ModelConfig fields to change, e.g. dtype="float32" (compute) or
        param_dtype="bfloat16" (storage of the loaded params; float32 by default).

    Returns:
      (ModelConfig, params) with params a nested dict of arrays.
    """
    cfg_path = os.path.join(hf_dir, "config.json")
    if not fileio.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: an HF checkpoint needs its config.json")
    hf_dir = fileio.fetch(hf_dir)  # a bucket's checkpoint, downloaded to be memory-mapped
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = config_from_hf(json.load(f), **config_overrides)
    if callable(shardings):
        shardings = shardings(cfg)
    dtype = _np_dtype(cfg.param_dtype)
    reader = _HFReader(hf_dir)
    table = _tensor_table(cfg)
    _check_tensors(reader, cfg, table)
    params: dict = {}
    for entry in table:
        sharding = _get_path(shardings, entry.path) if shardings is not None else None
        _set_path(params, entry.path, _load_one(reader, entry, cfg, dtype, sharding))
    return cfg, params


# ---------------------------------------------------------------------------- save


def _hf_tensors(cfg: ModelConfig, params: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_name, array) one tensor at a time, fetching one layer at a time."""
    for entry in _tensor_table(cfg):
        ours = _get_path(params, entry.path)
        if entry.stacked:
            for i in range(cfg.num_layers):
                layer = np.asarray(jax.device_get(ours[i]))
                yield entry.hf.format(i=i), entry.to_hf(layer, cfg).astype(dtype)
        else:
            yield entry.hf, entry.to_hf(np.asarray(jax.device_get(ours)), cfg).astype(dtype)


def _check_params(cfg: ModelConfig, params: dict) -> None:
    for entry in _tensor_table(cfg):
        try:
            shape = tuple(_get_path(params, entry.path).shape)
        except KeyError:
            raise CheckpointMismatchError(f"params lack {'/'.join(entry.path)}") from None
        if shape != _our_shape(entry, cfg):
            raise CheckpointMismatchError(
                f"param {'/'.join(entry.path)} has shape {shape}, the config expects "
                f"{_our_shape(entry, cfg)}")


def save(config: ModelConfig, params: dict, out_dir: str, tokenizer=None,
         dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> None:
    """Writes params as an HF checkpoint `transformers` loads (`Qwen2ForCausalLM`).

    Args:
      config: the model config.
      params: our params (any sharding; each layer is fetched to host in turn).
      out_dir: created if needed; a bucket (gs://...) gets the files once all are written.
      tokenizer: optional object with `save(out_dir)` to ship beside the weights.
      dtype: "float32" or "bfloat16" on disk.
      max_shard_bytes: size of each safetensors shard.
    """
    _check_params(config, params)
    with fileio.staged_dir(out_dir) as local:  # a bucket gets the files once all are written
        _save_local(config, params, local, tokenizer, dtype, max_shard_bytes)


def _save_local(config, params, out_dir, tokenizer, dtype, max_shard_bytes) -> None:
    """`save` into a local directory: shards are renamed into place, which needs a disk."""
    np_dtype = _np_dtype(dtype)
    shards = _write_shards(_hf_tensors(config, params, np_dtype), out_dir, max_shard_bytes)
    n = len(shards)
    weight_map, total = {}, 0
    for k, (tmp_name, names, nbytes) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
        weight_map.update({name: final for name in names})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(os.path.join(out_dir, INDEX_FILE), index)
    eos_id = getattr(tokenizer, "eos_id", None)
    _write_json(os.path.join(out_dir, "config.json"), config_to_hf(config, dtype, eos_id))
    if tokenizer is not None:
        tokenizer.save(out_dir)


def _write_shards(tensors, out_dir, max_shard_bytes):
    shards, batch, size = [], [], 0

    def flush():
        nonlocal batch, size
        tmp = f"shard-{len(shards):05d}.partial"
        nbytes = safetensors_io.write(os.path.join(out_dir, tmp), batch)
        shards.append((tmp, [name for name, _ in batch], nbytes))
        batch, size = [], 0

    for name, array in tensors:
        if batch and size + array.nbytes > max_shard_bytes:
            flush()
        batch.append((name, array))
        size += array.nbytes
    if batch:
        flush()
    return shards


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    import argparse

    from qmath_jax.train import checkpoint

    parser = argparse.ArgumentParser(prog="python -m qmath_jax.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint -> our Orbax params checkpoint")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--out", required=True)
    exp = sub.add_parser("export", help="our checkpoint (params or a run's workdir) -> HF")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    if args.command == "import":
        cfg, params = load(args.hf_dir)
        checkpoint.save_params(args.out, cfg, params)
        print(f"imported {args.hf_dir} -> {args.out}")
    else:
        cfg, params = checkpoint.load_params(args.checkpoint)
        save(cfg, params, args.out, tokenizer=_tokenizer_beside(args.checkpoint),
             dtype=args.dtype)
        print(f"exported {args.checkpoint} -> {args.out}")


def _tokenizer_beside(directory: str):
    """The run's tokenizer (tokenizer.json in the checkpoint dir), shipped with the export."""
    if not fileio.exists(os.path.join(directory, "tokenizer.json")):
        return None
    from qmath_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer

    return Tokenizer.from_file(fileio.fetch(directory, names=TOKENIZER_FILES))


if __name__ == "__main__":
    main()
