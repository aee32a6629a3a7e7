"""Sharding on 8 simulated CPU devices: same numbers as one device, params laid out as the
rules table says, and wrong meshes / batches / topologies refused with what would fit."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qmath_jax import compile_only, parallel
from qmath_jax.model import Transformer, get_preset
from qmath_jax.stages import common
from qmath_jax.train import trainer as trainer_lib

SEQ, BATCH, STEPS = 32, 8, 3

# What RULES says for each param of the tiny model, written out by hand:
# layers -> unsharded, embed -> fsdp, heads / kv_heads / mlp / vocab -> tensor.
EXPECTED_SPECS = {
    "embedding": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm/scale": P("fsdp"),
    "layers/input_norm/scale": P(None, "fsdp"),
    "layers/post_attn_norm/scale": P(None, "fsdp"),
    "layers/attn/q_kernel": P(None, "fsdp", "tensor", None),
    "layers/attn/k_kernel": P(None, "fsdp", "tensor", None),
    "layers/attn/v_kernel": P(None, "fsdp", "tensor", None),
    "layers/attn/o_kernel": P(None, "tensor", None, "fsdp"),
    "layers/attn/q_bias": P(None, "tensor", None),
    "layers/attn/k_bias": P(None, "tensor", None),
    "layers/attn/v_bias": P(None, "tensor", None),
    "layers/mlp/gate_kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/up_kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/down_kernel": P(None, "tensor", "fsdp"),
}


def _norm(spec) -> tuple:
    """A PartitionSpec without trailing Nones, 1-tuples of axes as plain names."""
    parts = [p[0] if isinstance(p, tuple) and len(p) == 1 else p for p in spec]
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _batches(vocab: int) -> list[dict]:
    """Packed rows: two documents per row, the tail padding, as the pipelines give them."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        seg = np.zeros((BATCH, SEQ), np.int32)
        pos = np.zeros((BATCH, SEQ), np.int32)
        for r in range(BATCH):
            a, b = rng.integers(4, SEQ // 2), rng.integers(SEQ // 2, SEQ - 2)
            seg[r, :a], seg[r, a:b] = 1, 2
            pos[r, :a], pos[r, a:b] = np.arange(a), np.arange(b - a)
        out.append(
            {
                "tokens": rng.integers(0, vocab, (BATCH, SEQ), dtype=np.int32),
                "targets": rng.integers(0, vocab, (BATCH, SEQ), dtype=np.int32),
                "segment_ids": seg,
                "positions": pos,
                "loss_mask": (seg > 0).astype(np.int32),
            }
        )
    return out


def _train(mesh, grad_accum: int):
    cfg = get_preset("tiny", dtype="float32", param_dtype="float32", remat="none")
    model = Transformer(cfg, mesh=mesh)

    def init_fn():
        tokens = np.zeros((1, 8), np.int32)
        return model.init(jax.random.key(0), tokens, tokens, tokens + 1)["params"]

    optim = trainer_lib.OptimConfig(
        lr=1e-3, end_lr=1e-4, warmup_steps=1, total_steps=10, weight_decay=0.1
    )
    built = trainer_lib.build_step(
        mesh, init_fn, common.lm_loss(model), optim, grad_accum=grad_accum
    )
    state, _ = parallel.sharded_init(
        lambda: trainer_lib.boxed_state(init_fn, built.optimizer, 0), mesh
    )
    losses = []
    for batch in _batches(cfg.vocab_size):
        parallel.check_batch(BATCH, mesh, grad_accum)
        with jax.set_mesh(mesh), parallel.axis_rules():
            state, metrics = built.step(state, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def runs():
    sharded = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    single = parallel.make_mesh(devices=jax.devices()[:1])
    return sharded, _train(sharded, grad_accum=2), _train(single, grad_accum=1)


def test_sharded_steps_match_one_device(runs):
    _, (state8, losses8), (state1, losses1) = runs
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
    assert losses8[-1] < losses8[0]  # the steps did train
    flat8 = jax.tree_util.tree_leaves_with_path(state8.params)
    flat1 = dict(jax.tree_util.tree_leaves_with_path(state1.params))
    assert len(flat8) == len(flat1) == len(EXPECTED_SPECS)
    for path, leaf in flat8:
        np.testing.assert_allclose(
            np.asarray(leaf), np.asarray(flat1[path]), rtol=1e-5, atol=1e-5, err_msg=_path(path)
        )
    assert int(state8.step) == int(state1.step) == STEPS


def test_param_and_optimizer_shardings_follow_the_rules(runs):
    mesh, (state, _), _ = runs
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    seen = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        name = _path(path)
        seen.add(name)
        assert leaf.sharding.mesh.shape == mesh.shape, name
        assert _norm(leaf.sharding.spec) == _norm(EXPECTED_SPECS[name]), name
        # The shard each device holds is the slice the spec implies.
        want = list(leaf.shape)
        for i, axis in enumerate(_norm(EXPECTED_SPECS[name])):
            want[i] //= mesh.shape[axis] if axis else 1
        assert leaf.addressable_shards[0].data.shape == tuple(want), name
    assert seen == set(EXPECTED_SPECS)
    # AdamW's moments live where their params live.
    adam = state.opt_state[-1][0]
    for moments in (adam.mu, adam.nu):
        for path, leaf in jax.tree_util.tree_leaves_with_path(moments):
            assert _norm(leaf.sharding.spec) == _norm(EXPECTED_SPECS[_path(path)]), path


def test_batch_rows_split_over_data_and_fsdp(runs):
    mesh = runs[0]
    batch = _batches(512)[0]
    sharded = parallel.shard_batch(batch, mesh)
    tokens = sharded["tokens"]
    assert tokens.shape == (BATCH, SEQ)
    assert _norm(tokens.sharding.spec) == (("data", "fsdp"),)
    shards = sorted(tokens.addressable_shards, key=lambda s: s.index[0].start)
    assert {s.data.shape for s in shards} == {(BATCH // 4, SEQ)}
    for s in shards:  # each device holds its rows, replicated over 'tensor'
        np.testing.assert_array_equal(np.asarray(s.data), batch["tokens"][s.index])
    assert parallel.host_rows(BATCH) == slice(0, BATCH)


def _suggested(message: str) -> dict:
    m = re.search(r"data=(\d+), fsdp=(\d+), tensor=(\d+)", message)
    assert m, message
    return dict(zip(("data", "fsdp", "tensor"), map(int, m.groups())))


@pytest.mark.parametrize(
    "sizes",
    [
        {"data": 3},  # does not divide 8
        {"data": 2, "fsdp": 2, "tensor": 1},  # multiplies to 4, not 8
        {"data": -1, "fsdp": -1},  # two "rest" axes
        {"data": 1, "fsdp": 0, "tensor": 8},
    ],
)
def test_wrong_mesh_is_refused_with_sizes_that_fit(sizes):
    with pytest.raises(parallel.MeshError) as e:
        parallel.make_mesh(**sizes)
    fit = _suggested(str(e.value))
    assert parallel.make_mesh(**fit).devices.size == 8  # the suggestion does fit


def test_multi_slice_sizes_need_slices():
    with pytest.raises(parallel.MeshError, match="dcn_data=1"):
        parallel.make_mesh(data=-1, dcn_data=2)  # CPU devices form one slice


def test_batch_that_does_not_divide_is_refused(runs):
    mesh = runs[0]  # data x fsdp = 4
    with pytest.raises(parallel.MeshError, match=r"multiple of 4, e\.g\. \[4, 8, 12\]"):
        parallel.check_batch(6, mesh)
    with pytest.raises(parallel.MeshError, match="micro-batches of 2 rows.*multiple of 16"):
        parallel.check_batch(8, mesh, grad_accum=4)
    parallel.check_batch(16, mesh, grad_accum=4)


@pytest.mark.parametrize(
    "name, hint",
    [
        ("v9z-8", "v5p-128"),
        ("tpu-64", "GEN-COUNT"),
        ("v5p-100", "v5p-128"),  # v5p counts TensorCores, 2 a chip, in powers of two
        ("v5e-12", "v5e-16"),
        ("v4:2x2", "v4:2x2x2"),
    ],
)
def test_unknown_topology_is_refused_with_names_that_exist(name, hint):
    with pytest.raises(compile_only.TopologyError) as e:
        compile_only.parse_topology(name)
    assert hint in str(e.value) and name in str(e.value)
