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
    """Returns (ModelConfig, params) from a params checkpoint or a run's workdir; `shardings`
    is a pytree matching the params or a function of the ModelConfig giving one."""
    directory = fileio.abspath(directory)
    cfg = read_model_config(directory)
    if callable(shardings):
        shardings = shardings(cfg)
    params_dir = os.path.join(directory, "params")
    if fileio.isdir(params_dir):
        return cfg, _restore(params_dir, shardings)
    from qmath_jax.train import trainer  # a run's workdir: the newest train state

    return cfg, trainer.restore_params(directory, cfg, shardings)


def load_params_on(directory: str, mesh=None):
    """(ModelConfig, params) restored straight onto `mesh`, each array sharded by its logical
    axes, so no host ever holds the whole model (None: whole on this host's first device)."""
    from qmath_jax import parallel

    return load_params(directory, parallel.param_shardings_on(mesh))


def _restore(path: str, shardings):
    return restore_subtree(path, None, shardings)


def restore_subtree(path: str, key: str | None, shardings=None):
    """The arrays of an Orbax tree at `path` (only its `key` subtree when given), placed on
    `shardings` (default: whole on this host's first device).

    Always restored against a target built from the checkpoint's metadata, so it reads
    checkpoints written by any number of hosts and devices: a 2-host run's params load in
    one process, and a train state's optimizer moments are never read.
    """
    from etils import epath

    handler = ocp.PyTreeCheckpointHandler()  # reads the tree's own metadata file only
    try:
        meta = handler.metadata(epath.Path(path))
    finally:
        handler.close()
    meta = getattr(meta, "tree", meta)
    meta = meta if key is None else meta[key]
    if shardings is None:
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: local, meta)
    leaves = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), meta, shardings)
    target = leaves if key is None else {key: leaves}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=key is not None))
    return restored if key is None else restored[key]
