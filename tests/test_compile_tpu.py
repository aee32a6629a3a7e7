"""AOT compilation of the real train step for TPU topologies with libtpu (no TPU here).

The CLI runs in a subprocess, as a user runs it: libtpu holds its process lock only
while that process lives (ALLOW_MULTIPLE_LIBTPU_LOAD lets another test's libtpu coexist).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from qmath_jax import compile_only
from qmath_jax.model import get_preset
from qmath_jax.model.transformer import param_axes

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not importable: install jax[tpu] to AOT-compile for TPU",
)


def _launch(*args: str) -> tuple[int, str, list[dict]]:
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
    )
    env.pop("XLA_FLAGS", None)  # the topology's devices, not 8 simulated CPUs
    proc = subprocess.run(
        [sys.executable, "-m", "qmath_jax.launch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    reports = [
        json.loads(line[len(compile_only.REPORT_PREFIX) :])
        for line in proc.stdout.splitlines()
        if line.startswith(compile_only.REPORT_PREFIX)
    ]
    return proc.returncode, proc.stdout + proc.stderr[-3000:], reports


@pytest.mark.parametrize(
    "name, shape, slices, devices",
    [
        ("v5p-128", (4, 4, 4), 1, 64),  # 128 TensorCores = 64 megacore chips
        ("v4-64", (2, 4, 4), 1, 32),
        ("v5p-8", (2, 2, 1), 1, 4),
        ("v5e-256", (16, 16), 1, 256),
        ("v5litepod-8", (2, 4), 1, 8),
        ("v6e-4", (2, 2), 1, 4),
        ("2xv5e-4", (2, 2), 2, 8),
        ("v5p:4x4x8", (4, 4, 8), 1, 128),
    ],
)
def test_topology_names_map_to_libtpu_shapes(name, shape, slices, devices):
    topo = compile_only.parse_topology(name)
    assert topo.shape == shape and topo.num_slices == slices and topo.num_devices == devices
    assert topo.libtpu_name == f"{topo.generation.name}:{'x'.join(map(str, shape))}"


def test_memory_report_arithmetic():
    class Stats:
        argument_size_in_bytes = 10 * 2**30
        output_size_in_bytes = 10 * 2**30
        alias_size_in_bytes = 9 * 2**30
        temp_size_in_bytes = 6 * 2**30
        generated_code_size_in_bytes = 2**30

    r = compile_only.memory_report(Stats, 16 * 2**30)
    assert r["total_bytes"] == 18 * 2**30 and not r["fits"]
    assert r["spare_fraction"] == pytest.approx(-2 / 16)
    assert "needs 2.00 GiB more per device" in compile_only.format_report(
        {**r, "target": "t", "lower_s": 0, "compile_s": 0, "flops_per_device": 0}
    )


def _sharded_state_bytes(cfg, fsdp: int) -> int:
    """Per-device bytes of params + AdamW mu + nu when 'embed' (only) splits fsdp ways."""
    from qmath_jax.model import init_params

    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    axes = jax.tree.leaves(param_axes(cfg), is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree.leaves(abstract)
    assert len(axes) == len(leaves) == 15
    total = sum(a.size * 4 // (fsdp if "embed" in tuple(ax) else 1) for ax, a in zip(axes, leaves))
    return 3 * total


@needs_libtpu
def test_tiny_train_step_compiles_for_two_tpu_slices():
    # Two v5e 2x2 slices: fsdp over the 4 chips of a slice, data across the slices (DCN).
    rc, out, reports = _launch(
        "--config",
        "pretrain_tiny",
        "--compile_only",
        "--topology",
        "2xv5e-4",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=4",
        "--config.mesh.dcn_data=2",
        "--config.model.attention_impl=auto",
        "--config.train.batch_size=8",
        "--config.train.seq_len=256",
    )
    assert rc == 0, out
    assert "fits on 2xv5e-4" in out and "TPU v5 lite" in out
    (r,) = reports
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and r["fits"]
    # 'auto' attention followed the TPU mesh, not the CPU host: the Mosaic flash kernels
    # (forward, dq, dk/dv) are in the executable.
    assert r["tpu_custom_calls"] >= 3, r
    # The arguments hold the state split 4 ways by fsdp: more than a quarter of the state
    # (TPU tiles pad small dims), less than the whole state that an unsharded step takes.
    cfg = get_preset("tiny")
    quarter, whole = _sharded_state_bytes(cfg, fsdp=4), _sharded_state_bytes(cfg, fsdp=1)
    assert quarter < r["argument_bytes"] < whole, (r["argument_bytes"], quarter, whole)
    assert r["alias_bytes"] >= quarter  # the state is donated
    assert r["flops_per_device"] > 0 and r["compile_s"] > 0


@needs_libtpu
def test_run_that_does_not_fit_exits_nonzero_saying_by_how_much():
    # Qwen2.5-Math-1.5B with float32 params + AdamW: 1.54e9 * 12 B = 17.2 GiB > 16 GiB v5e.
    rc, out, reports = _launch(
        "--config",
        "pretrain_tiny",
        "--compile_only",
        "--topology",
        "v5e-1",
        "--config.model.preset=qwen2.5-math-1.5b",
        "--config.train.batch_size=1",
        "--config.train.seq_len=128",
        "--config.model.attention_impl=xla",
    )
    assert rc == 1, out
    (r,) = reports
    assert not r["fits"] and r["total_bytes"] > r["hbm_bytes"] > 15 * 2**30
    over = (r["total_bytes"] - r["hbm_bytes"]) / 2**30
    assert f"DOES NOT FIT: needs {over:.2f} GiB more per device" in out


@needs_libtpu
def test_mesh_that_does_not_fit_the_topology_is_refused():
    rc, out, reports = _launch(
        "--config",
        "pretrain_tiny",
        "--compile_only",
        "--topology",
        "v5e-4",
        "--config.mesh.data=1",
        "--config.mesh.tensor=3",
    )
    assert rc == 2 and not reports, out
    assert "refused" in out and "data=4, fsdp=1, tensor=1" in out
