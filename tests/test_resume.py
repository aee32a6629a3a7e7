"""Preemption and crashes: a killed or SIGTERM'd run resumes exactly where it left off."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qmath_jax.train import checkpoint
from qmath_jax.train.metrics import read_metrics

STEPS = 10


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qmath_jax.run_config import base
    from qmath_jax.stages import common

    out = tmp_path_factory.mktemp("tok")
    common.tokenizer(base("pretrain"), str(out))
    return str(out / "tokenizer.json")


def _command(workdir, tokenizer, *extra):
    return [sys.executable, "-m", "qmath_jax.launch", "--config", "pretrain_tiny",
            "--workdir", str(workdir), f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every_steps=2", "--config.train.batch_size=4",
            "--config.train.seq_len=64", "--config.mesh.num_devices=1",
            f"--config.tokenizer.path={tokenizer}", *extra]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(workdir, tokenizer, *extra):
    subprocess.run(_command(workdir, tokenizer, *extra), env=_env(), check=True, timeout=300,
                   capture_output=True)


def _start(workdir, tokenizer):
    return subprocess.Popen(_command(workdir, tokenizer), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_step(proc, workdir, step, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(path)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _losses(workdir):
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows}  # the last run of a step wins


def _params(workdir):
    _, params = checkpoint.load_params(str(workdir))
    return params


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir):
    workdir = tmp_path_factory.mktemp("straight")
    # Run with the host-memory settings (the launcher re-executes itself with them): the
    # runs compared against this one run without, so they must not change a number.
    _run(workdir, tokenizer_dir, "--keep_host_memory")
    return workdir


def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(
        tmp_path, tokenizer_dir, reference):
    kill_at = int(np.random.default_rng(int(time.time())).integers(3, STEPS - 2))
    proc = _start(tmp_path, tokenizer_dir)
    _wait_for_step(proc, str(tmp_path), kill_at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _run(tmp_path, tokenizer_dir)
    ours, ref = _losses(tmp_path), _losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ours[s] for s in ref], [ref[s] for s in ref], atol=1e-6)
    import jax

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 _params(tmp_path), _params(reference))


def test_sigterm_saves_and_exits_cleanly(tmp_path, tokenizer_dir):
    proc = _start(tmp_path, tokenizer_dir)
    _wait_for_step(proc, str(tmp_path), 3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    last_logged = max(_losses(tmp_path))
    assert steps[-1] == last_logged and steps[-1] < STEPS
    saved = json.loads((tmp_path / "model_config.json").read_text())
    assert saved["num_layers"] == 2
