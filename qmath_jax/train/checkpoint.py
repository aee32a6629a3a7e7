"""Orbax checkpoints of params alone (imports, exports, stage hand-offs).

Layout of a params checkpoint directory:
  model_config.json   the ModelConfig fields
  params/             an Orbax StandardCheckpointer tree of arrays
A run's workdir (see `trainer.py`) keeps its train states under `checkpoints/<step>/`;
`load_params` accepts either and takes the newest step of a workdir. Either may be local
or in a bucket (gs://...): model_config.json goes through `fileio`, the arrays through
Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from qmath_jax import fileio
from qmath_jax.model.config import ModelConfig

CONFIG_FILE = "model_config.json"


def save_params(directory: str, cfg: ModelConfig, params) -> None:
    """Saves params and their model config to `directory` (created; must not hold params)."""
    directory = fileio.abspath(directory)
    fileio.makedirs(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params)
        ckptr.wait_until_finished()
    write_model_config(directory, cfg)


def write_model_config(directory: str, cfg: ModelConfig) -> None:
    fileio.write_text(os.path.join(directory, CONFIG_FILE),
                      json.dumps(dataclasses.asdict(cfg), indent=2))


def read_model_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not fileio.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a qmath_jax checkpoint (a params checkpoint "
            "or a run's workdir); import HF weights with `python -m qmath_jax.hf import`")
    with fileio.open(path) as f:
        fields = json.load(f)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
    return ModelConfig(**fields)


def load_params(directory: str, shardings=None):
    """Returns (ModelConfig, params) from a params checkpoint or a run's workdir."""
    directory = fileio.abspath(directory)
    cfg = read_model_config(directory)
    params_dir = os.path.join(directory, "params")
    if fileio.isdir(params_dir):
        return cfg, _restore(params_dir, shardings)
    from qmath_jax.train import trainer  # a run's workdir: the newest train state

    return cfg, trainer.restore_params(directory, cfg, shardings)


def _restore(path: str, shardings):
    with ocp.StandardCheckpointer() as ckptr:
        if shardings is None:
            return ckptr.restore(path)
        meta = ckptr.metadata(path)
        meta_tree = getattr(meta, "item_metadata", meta)
        meta_tree = getattr(meta_tree, "tree", meta_tree)
        target = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), meta_tree, shardings)
        return ckptr.restore(path, target)
