"""Device mesh, the one table of logical-axis rules, sharded init and batches, multi-host.

Params and activations name logical axes (`batch, length, embed, heads, kv_heads,
head_dim, mlp, vocab, layers`); `RULES` maps them onto the mesh axes `data, fsdp,
tensor`. A mesh axis is used at most once per array: the first rule that can still take
it wins (so activations shard `batch` over data+fsdp and leave `embed` whole, while
params shard `embed` over fsdp).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


class MeshError(ValueError):
    """A mesh or batch that cannot be laid out on the devices."""


def _resolve(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise MeshError(f"{what}: at most one axis may be -1 (the rest), got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or total % known:
        raise MeshError(
            f"{what} axis sizes {dict(zip(MESH_AXES, sizes))} do not divide {total} devices; "
            f"choose sizes whose product divides {total} (e.g. data=-1, fsdp={_divisors(total)})")
    if -1 in sizes:
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise MeshError(
            f"{what} axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
            f"not the {total} devices; set one axis to -1 to take the rest")
    return tuple(sizes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn_data: int = 1,
              dcn_fsdp: int = 1, dcn_tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 takes the remaining devices.

    The `dcn_*` sizes split the mesh across slices of a multi-slice pod (data-parallel
    across slices is the usual choice); the others are sizes within one slice.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = (dcn_data, dcn_fsdp, dcn_tensor)
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise MeshError(f"dcn sizes {dcn} need a multiple of {num_slices} devices, "
                        f"have {len(devices)}")
    per_slice = len(devices) // num_slices
    ici = _resolve((data, fsdp, tensor), per_slice, "mesh")
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(ici)  # topologies without a physical layout
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
    """A mesh from a config's `mesh` section (data, fsdp, tensor, optional dcn_* and
    num_devices: use only the first N devices, 0 = all)."""
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
    if devices is None and get("num_devices", 0):
        devices = jax.devices()[: get("num_devices", 0)]
    return make_mesh(get("data", -1), get("fsdp", 1), get("tensor", 1), get("dcn_data", 1),
                     get("dcn_fsdp", 1), get("dcn_tensor", 1), devices=devices)


def logical_to_sharding(specs, mesh: Mesh, rules=RULES):
    """A pytree of logical PartitionSpecs -> NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def axis_rules(rules=RULES):
    """Context manager that lets `nn.with_logical_constraint` see the rules."""
    return nn.logical_axis_rules(list(rules))


def sharded_init(init_fn: Callable[[], object], mesh: Mesh, rules=RULES):
    """Builds `init_fn()`'s output directly in its shardings; nothing whole on one host.

    `init_fn` returns a pytree that may hold Flax `LogicallyPartitioned` boxes (params and
    optimizer state built from boxed params); the result is unboxed.

    Returns:
      (tree, shardings), shardings being the NamedSharding pytree of `tree`.
    """
    abstract = jax.eval_shape(init_fn)
    specs = nn.get_partition_spec(abstract)
    shardings = logical_to_sharding(specs, mesh, rules)
    with mesh, axis_rules(rules):
        tree = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
    return tree, shardings


def abstract_sharded(init_fn: Callable[[], object], mesh: Mesh, rules=RULES):
    """ShapeDtypeStructs with shardings of `init_fn()` (for AOT compilation)."""
    abstract = jax.eval_shape(init_fn)
    shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)
    unboxed = nn.meta.unbox(abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        unboxed, shardings), shardings


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Rows over data x fsdp; every other dimension whole."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """Refuses a global batch that the data axes cannot split evenly."""
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        fits = [b for b in range(dp, 4 * dp + 1, dp)]
        raise MeshError(
            f"global batch {global_batch} does not divide over data x fsdp = {dp} devices "
            f"(mesh {dict(mesh.shape)}); use a multiple of {dp}, e.g. {fits[:3]}")
    if global_batch % jax.process_count():
        raise MeshError(f"global batch {global_batch} does not split over "
                        f"{jax.process_count()} hosts")


def host_rows(global_batch: int) -> slice:
    """The rows of the global batch this host reads (hosts feed disjoint rows)."""
    per_host = global_batch // jax.process_count()
    start = jax.process_index() * per_host
    return slice(start, start + per_host)


def shard_batch(local_batch, mesh: Mesh):
    """Host-local numpy rows -> global jax Arrays sharded over data x fsdp."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, local_batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed() -> None:
    """Starts multi-host JAX when the environment says this is one host of many.

    TPU VM pods: detected from the TPU runtime's environment, arguments auto-discovered.
    GPU clusters: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
    or SLURM / Open MPI variables, which `jax.distributed.initialize` reads itself.
    A single host does nothing.
    """
    env = os.environ
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
    elif "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize()
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
