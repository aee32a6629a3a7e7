"""Multi-host runs, as two JAX processes on this machine (CPU collectives over localhost).

Each process owns one CPU device and the mesh spans both, as hosts of a TPU pod slice do.
The same job in one process with two devices is the reference: a 2-host run must give
the same rollouts, rewards, losses and params.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from qmath_jax.model import get_preset, init_params
from qmath_jax.run_config import base
from qmath_jax.stages import common
from qmath_jax.train import checkpoint

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **extra)
    return env


def _run_hosts(argv: list[str], hosts: int = 2, timeout: int = 400) -> list[str]:
    """Starts `argv` as `hosts` JAX processes of one job; returns each one's output."""
    port = _free_port()
    procs = [
        subprocess.Popen(argv, env=_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                        JAX_NUM_PROCESSES=str(hosts), JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(hosts)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"host {i} failed:\n{out[-4000:]}"
    return outs


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    tok = common.tokenizer(base("grpo"), str(root / "tok"))
    rm_cfg = get_preset("tiny", head="rm", vocab_size=tok.vocab_size)
    checkpoint.save_params(str(root / "rm"), rm_cfg, init_params(rm_cfg, jax.random.key(7)))
    policy_cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    checkpoint.save_params(str(root / "policy"), policy_cfg,
                           init_params(policy_cfg, jax.random.key(3)))
    return root, str(root / "tok" / "tokenizer.json"), str(root / "rm")


def _launch_argv(config: str, workdir, flags: dict) -> list[str]:
    return [sys.executable, "-m", "qmath_jax.launch", "--config", config,
            "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in flags.items()]


def _grpo_argv(workdir, tok_path, rm_dir) -> list[str]:
    return _launch_argv("grpo_tiny", workdir, {
        "tokenizer.path": tok_path, "grpo.rm_checkpoint": rm_dir,  # random RM: updates happen
        "mesh.num_devices": 2, "train.steps": 2, "train.lr": 1e-3,
        "train.checkpoint_every_steps": 1, "grpo.group_size": 4, "grpo.prompts_per_step": 2,
        "grpo.mini_batch": 4, "grpo.max_new_tokens": 16,
    })


def _iterations(workdir) -> dict:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "rollout_s" in r}


def test_two_host_grpo_equals_one_host_with_two_devices(grpo_setup):
    root, tok_path, rm_dir = grpo_setup
    one, two = root / "one_host", root / "two_hosts"
    done = subprocess.run(_grpo_argv(one, tok_path, rm_dir), env=_env(2), capture_output=True,
                          text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    outs = _run_hosts(_grpo_argv(two, tok_path, rm_dir))
    assert all("[grpo] iteration 2" in out for out in outs)  # both hosts ran every iteration
    a, b = _iterations(one), _iterations(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for it in (1, 2):
        for key in ("reward", "rm_score", "response_length", "loss", "kl", "grad_norm"):
            np.testing.assert_allclose(b[it][key], a[it][key], rtol=1e-5, atol=1e-6)
    assert a[2]["grad_norm"] > 0
    _, pa = checkpoint.load_params(str(one))  # written by 1 process, read here (8 devices)
    _, pb = checkpoint.load_params(str(two))  # written by 2 processes
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb)


def test_host_sharded_sandbox_pool_gives_every_host_every_result():
    outs = _run_hosts([sys.executable, os.path.join(HERE, "multihost_pool.py")], timeout=120)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert results[0] == results[1]  # both hosts hold the same, complete list
    by_host = results[0]
    assert [r["stdout"] for r in by_host[:4]] == ["0\n", "1\n", "4\n", "9\n"]
    assert by_host[4]["error"].startswith("ZeroDivisionError")
    assert by_host[5]["stdout"] == "42\n"  # ran after its previous cell


def _rm_groups(path, count: int) -> None:
    with open(path, "w") as f:
        for i in range(count):
            gold = 10 + i
            answers = [gold, gold + 1, gold, gold - 1, gold + 2, gold]
            f.write(json.dumps({
                "question": f"What is {i} + 10?",
                "responses": [f"We add.\nThe answer is $\\boxed{{{a}}}$." for a in answers],
                "labels": [int(a == gold) for a in answers]}) + "\n")


def test_two_host_rm_scores_every_held_out_group_on_every_host(grpo_setup):
    root, tok_path, rm_dir = grpo_setup
    _rm_groups(root / "train.jsonl", 16)
    _rm_groups(root / "held_out.jsonl", 5)
    flags = {
        "model.preset": "tiny", "model.vocab_size": 0, "tokenizer.path": tok_path,
        "init.checkpoint": rm_dir, "data.sources": root / "train.jsonl",
        "rm.eval_source": root / "held_out.jsonl", "mesh.num_devices": 2, "train.steps": 2,
        "train.batch_size": 2, "train.grad_accum": 1, "train.seq_len": 160,
        "train.warmup_steps": 0,
    }
    outs = _run_hosts(_launch_argv("rm_7b", root / "rm_two_hosts", flags))
    held_out = [next(x for x in out.splitlines() if x.startswith("[rm] held-out")) for out in outs]
    assert held_out[0] == held_out[1]
    report = json.loads((root / "rm_two_hosts" / "rm_eval.json").read_text())
    assert report["groups"] == 5  # all of them, not one host's share


def test_two_host_eval_writes_the_rows_and_table_of_one_host(grpo_setup):
    root, tok_path, rm_dir = grpo_setup
    flags = {
        "init.checkpoint": root / "policy", "tokenizer.path": tok_path,
        "eval.rm_checkpoint": rm_dir, "eval.sets": "synthetic", "eval.limit": 4,
        "eval.modes": "cot,tir", "eval.k": 2, "eval.max_new_tokens": 24,
        "eval.batch_size": 4, "mesh.num_devices": 2,
    }
    one, two = root / "eval_one_host", root / "eval_two_hosts"
    done = subprocess.run(_launch_argv("eval_tiny", one, flags), env=_env(2),
                          capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    _run_hosts(_launch_argv("eval_tiny", two, flags))
    rows_one = [json.loads(x) for x in (one / "samples.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two / "samples.jsonl").read_text().splitlines()]
    assert len(rows_one) == 4 * 2 * (1 + 2)  # problems x modes x (greedy + k): written once
    key = lambda r: (r["mode"], r["kind"], r["idx"], r["sample"])
    for a, b in zip(sorted(rows_one, key=key), sorted(rows_two, key=key), strict=True):
        assert a["text"] == b["text"] and a["answer"] == b["answer"]
        np.testing.assert_allclose(b["rm_score"], a["rm_score"], rtol=1e-5, atol=1e-6)
    summary = [json.loads((d / "summary.json").read_text())["results"] for d in (one, two)]
    assert summary[0] == summary[1]


def test_two_host_synth_writes_every_group_once(grpo_setup):
    root, tok_path, _ = grpo_setup
    flags = {
        "stage": "synth", "init.checkpoint": root / "policy", "tokenizer.path": tok_path,
        "synth.write": "rm", "synth.mode": "tir", "synth.num_problems": 6,
        "synth.batch_size": 4, "synth.max_new_tokens": 24, "mesh.num_devices": 2,
        "synth.decontam_synthetic": 0,
    }
    workdir = root / "synth_two_hosts"
    outs = _run_hosts(_launch_argv("sft_tiny", workdir, flags))
    reports = [next(x for x in out.splitlines() if x.startswith("[synth]")) for out in outs]
    assert reports[0] == reports[1]
    groups = [json.loads(x) for x in (workdir / "synth_rm.jsonl").read_text().splitlines()]
    assert len(groups) == 6 and all(len(g["responses"]) == 6 for g in groups)
    assert all(g["mode"] == "tir" for g in groups)  # the RM renders them as sampled
