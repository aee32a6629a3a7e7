"""Ahead-of-time compilation of a run's step for a TPU topology, on any host.

  python -m qmath_jax.launch --config pretrain_72b --compile_only --topology v5p-128

libtpu builds compile-only devices of the named topology (no TPU needed); the run's
real step — the Trainer's jitted train step with the run's model, loss, mesh and
shardings, or the GRPO stage's `compile_targets` — is lowered and compiled for them.
Per device it reports the memory XLA plans (arguments, outputs, temporaries, code)
against the chip's HBM, the compile time and the compiled FLOPs, and exits 1 when the
run does not fit (saying by how much), 2 when the config or topology is refused.

Topology names: `GEN-COUNT` as Cloud TPU names slices (v4-64, v5p-128: COUNT counts
TensorCores, two per chip; v5e-256, v6e-256: COUNT counts chips), `GEN:SHAPE` (v5p:4x4x4,
v5e:16x16), either prefixed `Nx` for N slices joined over DCN (2xv5p-128; the config's
mesh.dcn_* sizes must multiply to N).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

GIB = 1024**3
REPORT_PREFIX = "COMPILE_REPORT "  # one JSON line per compiled target, for scripts


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation as libtpu's topology API and Cloud TPU's slice names see it."""

    name: str
    hbm_gib: float  # per chip = per JAX device (v4 / v5p run as megacore)
    dims: int  # 3: a torus of 2x2x1 hosts; 2: a 2D grid
    cores_per_chip: int  # what COUNT in `GEN-COUNT` counts per chip
    chip_config: str


GENERATIONS = {
    "v4": Generation("v4", 32, 3, 2, "megacore"),
    "v5p": Generation("v5p", 95, 3, 2, "megacore"),
    "v5e": Generation("v5e", 16, 2, 1, "default"),
    "v6e": Generation("v6e", 32, 2, 1, "default"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
_2D_SHAPES = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
_NAME_RE = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)([-:])([0-9x]+)$")


class TopologyError(ValueError):
    """A topology name this module cannot map onto libtpu's topology API."""


class StageError(ValueError):
    """A config whose stage has nothing to compile."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology name: generation, chip grid and number of slices."""

    name: str
    generation: Generation
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_devices(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        chips = self.chips_per_slice
        if chips == 1:
            return (1, 1, 1)
        if self.generation.dims == 2 and chips == 8:  # v5e-8 / v6e-8: one 8-chip host
            return (2, 4, 1)
        return (2, 2, 1)


def _usage() -> str:
    return (
        f"use GEN-COUNT with GEN one of {', '.join(GENERATIONS)} (e.g. v5p-128, v4-64, "
        "v5e-256, v6e-256), or GEN:SHAPE (e.g. v5p:4x4x4, v5e:2x2), optionally prefixed "
        "Nx for N slices (2xv5p-128)"
    )


def _torus_shape(chips: int) -> tuple[int, int, int]:
    """The 3D slice shape of v4 / v5p: from 2x2x1, double the smallest (last) dimension."""
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(j for j in range(3) if shape[j] == min(shape))
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """'v5p-128' / 'v5e:2x2' / '2xv6e-256' -> Topology.

    Raises:
      TopologyError: an unknown generation or a chip count no slice of it has.
    """
    m = _NAME_RE.match(name.strip().lower())
    if not m or _ALIASES.get(m.group(2), m.group(2)) not in GENERATIONS:
        raise TopologyError(f"unknown TPU topology {name!r}; {_usage()}")
    slices = int(m.group(1) or 1)
    gen = GENERATIONS[_ALIASES.get(m.group(2), m.group(2))]
    if m.group(3) == ":":
        shape = tuple(int(d) for d in m.group(4).split("x") if d)
        if len(shape) != gen.dims or min(shape) < 1:
            raise TopologyError(
                f"topology {name!r}: {gen.name} shapes have {gen.dims} "
                f"dimensions, e.g. {gen.name}:{'x'.join(['2'] * gen.dims)}"
            )
        return Topology(name, gen, shape, slices)
    if not m.group(4).isdigit():
        raise TopologyError(f"topology {name!r}: {_usage()}")
    count = int(m.group(4))
    chips, rem = divmod(count, gen.cores_per_chip)
    if gen.dims == 3:
        valid = [f"{gen.name}-{2**k * 4 * gen.cores_per_chip}" for k in range(9)]
        ok = not rem and chips >= 4 and chips & (chips - 1) == 0
        shape = _torus_shape(chips) if ok else None
    else:
        valid = [f"{gen.name}-{c}" for c in _2D_SHAPES]
        shape = _2D_SHAPES.get(chips)
    if shape is None:
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip == 2 else "chips"
        raise TopologyError(
            f"topology {name!r}: no {gen.name} slice has {count} {unit}; sizes: {', '.join(valid)}"
        )
    return Topology(name, gen, shape, slices)


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of `topo` from libtpu (no TPU attached)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # Compiling never runs on chips, so it needs no exclusive hold on libtpu: another
    # process (a training run, a test) may hold the lock meanwhile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        topo.libtpu_name,
        "tpu",
        chip_config_name=topo.generation.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=topo.num_slices,
    )
    devices = list(desc.devices)
    if len(devices) != topo.num_devices:
        raise TopologyError(
            f"libtpu gave {len(devices)} devices for {topo.name}, expected {topo.num_devices}"
        )
    return devices


# -- what to compile -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One jitted function and abstract arguments (ShapeDtypeStructs with shardings)."""

    name: str
    fn: Callable
    args: Sequence[Any]
    tokens: int = 0  # tokens per call, for the model-FLOPs estimate (0: not estimated)
    model_cfg: Any = None
    seq_len: int = 0


def _abstract(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def lm_batch(batch: int, seq_len: int, mesh) -> dict:
    """Abstract packed batch of the pretrain / SFT pipelines, sharded as `shard_batch` does."""
    import jax.numpy as jnp

    from qmath_jax import parallel

    sharding = parallel.batch_sharding(mesh, 2)
    keys = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
    return {k: _abstract((batch, seq_len), jnp.int32, sharding) for k in keys}


def rm_batch(batch: int, group: int, seq_len: int, mesh) -> dict:
    """Abstract reward-model batch: `batch` questions of `group` responses each."""
    import jax.numpy as jnp

    from qmath_jax import parallel

    out = {
        k: _abstract((batch, group, seq_len), jnp.int32, parallel.batch_sharding(mesh, 3))
        for k in ("tokens", "segment_ids", "positions")
    }
    for k in ("last_index", "labels"):
        out[k] = _abstract((batch, group), jnp.int32, parallel.batch_sharding(mesh, 2))
    return out


def _train_target(cfg, mesh, model_cfg, make_loss, batch: dict, tokens: int) -> Target:
    import jax
    import numpy as np

    from qmath_jax.model import Transformer
    from qmath_jax.stages import common
    from qmath_jax.train import trainer as trainer_lib

    model = Transformer(model_cfg, mesh=mesh)

    def init_fn():  # as stages.common.make_trainer builds the params
        tokens_ = np.zeros((1, 8), np.int32)
        return model.init(jax.random.key(cfg.seed), tokens_, tokens_, tokens_ + 1)["params"]

    built = trainer_lib.build_step(
        mesh,
        init_fn,
        make_loss(model),
        common.optim_config(cfg),
        seed=cfg.seed,
        grad_accum=cfg.train.grad_accum,
    )
    return Target(
        "train_step",
        built.step,
        (built.abstract_state, batch),
        tokens,
        model_cfg,
        cfg.train.seq_len,
    )


def targets_for(cfg, mesh) -> list[Target]:
    """The functions the run of `cfg` compiles on `mesh`, with abstract arguments."""
    from qmath_jax import parallel
    from qmath_jax.stages import common

    t = cfg.train
    if cfg.stage in ("pretrain", "sft"):
        parallel.check_batch(t.batch_size, mesh, t.grad_accum)
        return [
            _train_target(
                cfg,
                mesh,
                common.model_config(cfg),
                common.lm_loss,
                lm_batch(t.batch_size, t.seq_len, mesh),
                t.batch_size * t.seq_len,
            )
        ]
    if cfg.stage == "rm":
        from qmath_jax.stages import reward_model

        parallel.check_batch(t.batch_size, mesh, t.grad_accum)
        g = cfg.rm.group_size
        return [
            _train_target(
                cfg,
                mesh,
                common.model_config(cfg, head="rm"),
                reward_model.rm_loss,
                rm_batch(t.batch_size, g, t.seq_len, mesh),
                t.batch_size * g * t.seq_len,
            )
        ]
    if cfg.stage == "grpo":
        return _grpo_targets(cfg, mesh)
    raise StageError(
        f"--compile_only compiles the pretrain, sft, rm and grpo stages; the "
        f"config's stage is {cfg.stage!r}"
    )


def _grpo_targets(cfg, mesh) -> list[Target]:
    try:
        grpo = importlib.import_module("qmath_jax.stages.grpo")
    except ModuleNotFoundError as e:
        if e.name != "qmath_jax.stages.grpo":
            raise
        grpo = None
    if grpo is None or not hasattr(grpo, "compile_targets"):
        raise StageError(
            "stage 'grpo' has no compile_targets(cfg, mesh) in qmath_jax/stages/grpo.py to compile"
        )
    return [Target(name, fn, tuple(args)) for name, fn, args in grpo.compile_targets(cfg, mesh)]


# -- compile and report ----------------------------------------------------------------


def memory_report(stats, hbm_bytes: float) -> dict:
    """Per-device bytes of a compiled executable and whether they fit in `hbm_bytes`.

    The peak is arguments + outputs - aliased (donated arguments reused as outputs)
    + temporaries + generated code, all of which live in HBM during the step.
    """
    r = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "code_bytes": int(stats.generated_code_size_in_bytes),
    }
    r["total_bytes"] = (
        r["argument_bytes"]
        + r["output_bytes"]
        - r["alias_bytes"]
        + r["temp_bytes"]
        + r["code_bytes"]
    )
    r["hbm_bytes"] = int(hbm_bytes)
    r["spare_fraction"] = 1.0 - r["total_bytes"] / hbm_bytes
    r["fits"] = r["total_bytes"] <= hbm_bytes
    return r


def compiled_flops(compiled) -> float:
    """FLOPs per device of one call, from XLA's cost analysis (0 when it has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


_OOM_RE = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def _oom_report(message: str, hbm_bytes: float) -> dict:
    """The report of a compile that XLA stopped for want of HBM (RESOURCE_EXHAUSTED)."""
    m = _OOM_RE.search(message)
    scale = {"K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}
    need = float(m.group(1)) * scale[m.group(2)] if m else float("nan")
    have = float(m.group(3)) * scale[m.group(4)] if m else hbm_bytes
    return {
        "fits": False,
        "oom": message.strip().splitlines()[0][:500],
        "total_bytes": need,
        "hbm_bytes": have,
        "spare_fraction": 1 - need / have,
    }


def compile_target(target: Target, mesh, hbm_bytes: float) -> dict:
    """Lowers and compiles `target` on `mesh`; returns the report dict."""
    import jax

    from qmath_jax import parallel

    t0 = time.perf_counter()
    with jax.set_mesh(mesh), parallel.axis_rules():
        lowered = target.fn.lower(*target.args)
    t1 = time.perf_counter()
    report = {"target": target.name, "lower_s": round(t1 - t0, 2)}
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["compile_s"] = round(time.perf_counter() - t1, 2)
        return {**report, **_oom_report(str(e), hbm_bytes)}
    report["compile_s"] = round(time.perf_counter() - t1, 2)
    report["flops_per_device"] = compiled_flops(compiled)
    report["tpu_custom_calls"] = compiled.as_text().count("tpu_custom_call")
    report.update(memory_report(compiled.memory_analysis(), hbm_bytes))
    if target.tokens and target.model_cfg is not None:
        from qmath_jax.stages import common

        per_token = common.flops_per_token(target.model_cfg, target.seq_len)
        report["model_flops_per_device"] = per_token * target.tokens / mesh.devices.size
    return report


_ADVICE = (
    "shard wider (mesh.fsdp), raise train.grad_accum, use model.remat=full, or a bigger topology"
)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 100 else f"{n / 2**20:.2f} MiB"


def format_report(r: dict) -> str:
    """Human-readable lines of one target's report."""
    head = f"  {r['target']}: lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s"
    if "oom" in r:  # XLA refused to build it: the temporaries alone exceed HBM
        over = r["total_bytes"] - r["hbm_bytes"]
        return (
            f"{head}\n    DOES NOT FIT: needs {_gib(over)} more per device: XLA's "
            f"temporaries need {_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])} usable HBM "
            f"({r['oom']}); {_ADVICE}"
        )
    spare = r["hbm_bytes"] - r["total_bytes"]
    flops = f"{r['flops_per_device']:.4g} compiled"
    if r.get("model_flops_per_device"):
        flops += f", {r['model_flops_per_device']:.4g} model (6N + attention)"
    lines = [
        f"  {r['target']}: lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s",
        (
            f"    per device: arguments {_gib(r['argument_bytes'])}, outputs "
            f"{_gib(r['output_bytes'])} (aliased to arguments {_gib(r['alias_bytes'])}), "
            f"temporaries {_gib(r['temp_bytes'])}, generated code {_gib(r['code_bytes'])}"
        ),
        (
            f"    total {_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])} HBM "
            f"({100 * (1 - r['spare_fraction']):.1f}% used, {_gib(spare)} spare)"
        ),
        # XLA's cost analysis counts a while loop's body once: scanned layers and
        # micro-batches make the compiled figure a lower bound.
        f"    FLOPs per device per call: {flops} (compiled counts each loop body once)",
    ]
    if not r["fits"]:
        over = r["total_bytes"] - r["hbm_bytes"]
        lines.append(
            f"    DOES NOT FIT: needs {_gib(over)} more per device "
            f"({100 * over / r['hbm_bytes']:.1f}% over); {_ADVICE}"
        )
    return "\n".join(lines)


def _use_cpu_host() -> None:
    """Keeps the host's own accelerator out: only the topology's devices are compiled for."""
    import jax
    from jax._src import xla_bridge

    if not os.environ.get("JAX_PLATFORMS") and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def main(cfg, topology: str) -> int:
    """Compiles `cfg`'s step(s) for `topology`, prints the report; the process exit code.

    Returns:
      0 when every target fits in HBM, 1 when one does not, 2 for a refused config or
      topology (the message says what would fit).
    """
    from qmath_jax import parallel

    if not topology:
        print("--compile_only needs --topology (e.g. v5p-128) or a config with `topology`")
        return 2
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    _use_cpu_host()
    try:
        topo = parse_topology(topology)
        devices = topology_devices(topo)
        if cfg.mesh.get("num_devices", 0):
            devices = devices[: cfg.mesh.num_devices]
        mesh = parallel.mesh_from_config(cfg.mesh, devices=devices)
        targets = targets_for(cfg, mesh)
    except (TopologyError, parallel.MeshError, StageError) as e:
        print(f"[compile_only] refused: {e}")
        return 2
    hbm = topo.generation.hbm_gib * GIB
    kind = devices[0].device_kind
    print(
        f"[compile_only] stage {cfg.stage}, model {cfg.model.preset}, on {topo.name} "
        f"({topo.libtpu_name} x {topo.num_slices} slice(s), {mesh.devices.size} devices of "
        f"{kind}, {_gib(hbm)} HBM each), mesh {dict(mesh.shape)}, "
        f"batch {cfg.train.batch_size} x seq {cfg.train.seq_len}, "
        f"grad_accum {cfg.train.grad_accum}, remat {cfg.model.remat}"
    )
    fits = True
    for target in targets:
        report = compile_target(target, mesh, hbm)
        report.update(topology=topo.name, stage=cfg.stage, mesh=dict(mesh.shape))
        print(format_report(report))
        print(REPORT_PREFIX + json.dumps(report))
        fits &= report["fits"]
    print(f"[compile_only] {'fits' if fits else 'DOES NOT FIT'} on {topo.name}")
    return 0 if fits else 1
