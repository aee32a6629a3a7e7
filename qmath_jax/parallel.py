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
    """Fills the one -1 of (data, fsdp, tensor) so the sizes multiply to `total`."""
    sizes = list(sizes)
    named = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(
            f"{what} axis sizes {named}: each must be a positive size, with at most "
            f"one -1 (the rest); e.g. {suggest_mesh(total, sizes)}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if total % known or (-1 not in sizes and known != total):
        raise MeshError(
            f"{what} axis sizes {named} multiply to {known}, which "
            f"{'does not divide' if total % known else 'is not'} the {total} devices; "
            f"sizes that fit: {suggest_mesh(total, sizes)} (set one axis to -1 to take the rest)"
        )
    if -1 in sizes:
        sizes[sizes.index(-1)] = total // known
    return tuple(sizes)


def suggest_mesh(total: int, sizes: Sequence[int] = (-1, 1, 1)) -> str:
    """A (data, fsdp, tensor) for `total` devices close to `sizes`: keeps tensor, then fsdp,
    when they divide, and gives the rest to data."""
    tensor = sizes[2] if len(sizes) > 2 and sizes[2] > 0 and total % sizes[2] == 0 else 1
    rest = total // tensor
    fsdp = sizes[1] if len(sizes) > 1 and sizes[1] > 0 and rest % sizes[1] == 0 else rest
    return f"data={rest // fsdp}, fsdp={fsdp}, tensor={tensor}"


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
    devices=None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 takes the remaining devices.

    The `dcn_*` sizes split the mesh across the slices of a multi-slice pod (data-parallel
    across slices is the usual choice: only gradients cross the slower network); the
    others are sizes within one slice. Each mesh axis is then dcn_x * x long.

    Raises:
      MeshError: sizes that do not fit the devices, naming sizes that would.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = (dcn_data, dcn_fsdp, dcn_tensor)
    if any(d < 1 for d in dcn):
        raise MeshError(f"dcn sizes {dict(zip(MESH_AXES, dcn))} must be >= 1")
    num_slices = math.prod(dcn)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if num_slices > 1 and len(slices) != num_slices:
        raise MeshError(
            f"mesh dcn sizes {dict(zip(MESH_AXES, dcn))} ask for {num_slices} slices but the "
            f"devices form {len(slices)}; set dcn_data={len(slices)} (dcn_fsdp=dcn_tensor=1)"
        )
    if len(devices) % num_slices:
        raise MeshError(
            f"dcn sizes {dcn} need a multiple of {num_slices} devices, have {len(devices)}"
        )
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
    return make_mesh(
        get("data", -1),
        get("fsdp", 1),
        get("tensor", 1),
        get("dcn_data", 1),
        get("dcn_fsdp", 1),
        get("dcn_tensor", 1),
        devices=devices,
    )


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
    with jax.set_mesh(mesh), axis_rules(rules):
        tree = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
    return tree, shardings


def abstract_sharded(init_fn: Callable[[], object], mesh: Mesh, rules=RULES):
    """ShapeDtypeStructs with shardings of `init_fn()` (for AOT compilation)."""
    abstract = jax.eval_shape(init_fn)
    shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)
    unboxed = nn.meta.unbox(abstract)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings
    ), shardings


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Rows over data x fsdp; every other dimension whole."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch rows split: data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def num_hosts(mesh: Mesh) -> int:
    """The processes (hosts) that own the mesh's devices."""
    return len({d.process_index for d in mesh.devices.flat})


def check_batch(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """Refuses a global batch that the data axes, the hosts or the micro-batches cannot split.

    Each of the `grad_accum` micro-batches must still give every data x fsdp shard the
    same number of rows, and every host feeds an equal share of rows.

    Raises:
      MeshError: naming the sizes that would fit.
    """
    dp, hosts = data_parallel_size(mesh), num_hosts(mesh)
    if grad_accum < 1 or global_batch < 1:
        raise MeshError(f"batch size {global_batch} and grad_accum {grad_accum} must be >= 1")
    unit = math.lcm(dp * grad_accum, hosts)
    if global_batch % unit == 0:
        return
    fits = [unit * k for k in range(1, 4)]
    why = []
    if global_batch % grad_accum:
        why.append(f"does not split into grad_accum={grad_accum} micro-batches")
    elif (global_batch // grad_accum) % dp:
        why.append(
            f"gives micro-batches of {global_batch // grad_accum} rows, which do not "
            f"divide over data x fsdp = {dp} devices (mesh {dict(mesh.shape)})"
        )
    if global_batch % hosts:
        why.append(f"does not split over the {hosts} hosts")
    raise MeshError(
        f"global batch {global_batch} {' and '.join(why)}; use a multiple of "
        f"{unit}, e.g. {fits}, or change grad_accum / the mesh"
    )


def host_rows(global_batch: int) -> slice:
    """The rows of the global batch this host reads (hosts feed disjoint, equal rows)."""
    hosts = jax.process_count()
    if global_batch % hosts:
        raise MeshError(
            f"global batch {global_batch} does not split over {hosts} hosts; "
            f"use a multiple of {hosts}"
        )
    per_host = global_batch // hosts
    start = jax.process_index() * per_host
    return slice(start, start + per_host)


def shard_batch(local_batch, mesh: Mesh):
    """Host-local numpy rows -> global jax Arrays sharded over data x fsdp.

    Every host passes only its own rows (`host_rows`); the global array, hosts' rows
    stacked in process order, is assembled without any host holding all of it.
    """

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, local_batch)


def param_shardings_on(mesh: Mesh | None):
    """ModelConfig -> its params' shardings on `mesh` by their logical axes (None for no
    mesh): what the checkpoint loaders take to read each array straight into its shards."""
    if mesh is None:
        return None

    def shardings(model_cfg):
        from qmath_jax.model.transformer import param_axes

        return logical_to_sharding(param_axes(model_cfg), mesh)

    return shardings


def fetch(tree):
    """Device arrays -> numpy on this host, whole, also when they span other hosts' devices.

    A jitted call on a multi-host mesh returns global arrays of which this host holds only
    its shards; `jax.device_get` refuses those. This all-gathers them (every host must call
    it, in the same order, as for any collective) and leaves host-local arrays as they are.
    """
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every host's `payload`, in process order (a collective: every host calls it)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [payload]
    sizes = multihost_utils.process_allgather(np.array([len(payload)], np.int64))
    sizes = np.asarray(sizes).reshape(-1)
    buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
    buf[: len(payload)] = np.frombuffer(payload, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [rows[h, : int(n)].tobytes() for h, n in enumerate(sizes)]


def barrier(name: str) -> None:
    """Waits until every host reaches the barrier `name` (no-op on one host): e.g. before
    other hosts read a file host 0 wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed() -> None:
    """Starts multi-host JAX when the environment says this is one host of many.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    TPU pods (GKE, multi-slice): TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing
    several hosts, or MEGASCALE_COORDINATOR_ADDRESS; GPU clusters: SLURM or Open MPI with
    more than one task. JAX's cluster detection then fills in the arguments. A single
    host, or a process already initialised, does nothing.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
        return
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES", "")
    many = (
        "," in tpu_hosts
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
        or ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if many:  # JAX's cluster detection reads the rest from the same environment
        jax.distributed.initialize()
