"""The launch scripts, the Colab notebook and the user guide: they parse, they refuse bad
arguments, they build the gcloud / JAX commands they promise, and every config, override
and topology they name exists."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from qmath_jax.compile_only import parse_topology

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
GUIDE = ROOT / "docs" / "guide.md"
NOTEBOOK = LAUNCH / "colab_demo.ipynb"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
STAGES_TO_COVER = {"pretrain", "sft", "rm", "grpo", "eval"}

# `--config NAME` (not `--config.key=`, not a path); names are lower case, placeholders
# upper case.
CONFIG_NAME = re.compile(r"--config[ =]([a-z][a-z0-9_]*)(?![\w./])")
OVERRIDE = re.compile(r"--config\.([A-Za-z0-9_.]+)=(\S*)")
TOPOLOGY = re.compile(r"--topology[ =](\S+)")
ACCELERATOR = re.compile(r"--accelerator-type[ =]([a-z0-9-]+)")


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path, monkeypatch):
    """A `gcloud` first on PATH that fails: a test must never reach the real one."""
    stub = tmp_path / "guard_bin" / "gcloud"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'test reached gcloud' >&2\nexit 99\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")


def bash(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], capture_output=True, text=True, timeout=30, check=check, cwd=ROOT
    )


def notebook() -> dict:
    with open(NOTEBOOK) as f:
        return json.load(f)


def cell_source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def documents() -> dict[str, str]:
    """Every text a user copies commands from: the guide, the scripts, the notebook."""
    docs = {str(p.relative_to(ROOT)): p.read_text() for p in [GUIDE, *SCRIPTS]}
    docs[str(NOTEBOOK.relative_to(ROOT))] = "\n".join(cell_source(c) for c in notebook()["cells"])
    return docs


def launch_commands(text: str) -> list[str]:
    """`python -m qmath_jax.launch ...` command lines, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        line[line.index("qmath_jax.launch") :]
        for line in joined.splitlines()
        if "qmath_jax.launch" in line
    ]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ---------------------------------------------------------------------------- scripts


def test_the_launch_scripts_are_there():
    names = {p.name for p in SCRIPTS}
    assert {"tpu_vm.sh", "gpu_node.sh", "slurm_gpu.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_strict(script):
    assert bash("-n", str(script)).returncode == 0
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_is_clean():
    result = subprocess.run(
        ["shellcheck", "-s", "bash", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_node.sh"])
def test_bad_arguments_print_usage_and_fail(script):
    path = str(LAUNCH / script)
    empty = bash(path)
    assert empty.returncode == 2 and "Usage:" in empty.stdout
    unknown = bash(path, "frobnicate")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr
    missing = bash(path, "run", "--config")
    assert missing.returncode == 2 and "--config needs a value" in missing.stderr


def printed_commands(stdout: str) -> list[list[str]]:
    """The `+ cmd ...` lines a --dry-run prints, split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def tpu(*args: str) -> list[list[str]]:
    result = bash(str(LAUNCH / "tpu_vm.sh"), args[0], "--dry-run", *args[1:])
    assert result.returncode == 0, result.stderr
    return printed_commands(result.stdout)


@pytest.mark.parametrize(
    "accelerator, version",
    [
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v6e-256", "v2-alpha-tpuv6e"),
        ("v4-64", "tpu-ubuntu2204-base"),
    ],
)
def test_tpu_create_one_slice(accelerator, version):
    [cmd] = tpu("create", "--name", "qm", "--zone", "us-east5-a", "--accelerator-type", accelerator)
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "qm",
        "--zone",
        "us-east5-a",
        "--accelerator-type",
        accelerator,
        "--version",
        version,
    ]


def test_tpu_create_multislice_is_a_queued_resource():
    [cmd] = tpu(
        "create",
        "--name",
        "qm",
        "--zone",
        "z",
        "--project",
        "p",
        "--accelerator-type",
        "v5p-128",
        "--num-slices",
        "4",
        "--spot",
    )
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "qm",
        "--zone",
        "z",
        "--project",
        "p",
        "--accelerator-type",
        "v5p-128",
        "--runtime-version",
        "v2-alpha-tpuv5",
        "--node-count",
        "4",
        "--node-prefix",
        "qm",
        "--spot",
    ]


def test_tpu_unknown_accelerator_asks_for_version():
    result = bash(
        str(LAUNCH / "tpu_vm.sh"),
        "create",
        "--name",
        "qm",
        "--zone",
        "z",
        "--accelerator-type",
        "v9x-8",
        "--dry-run",
    )
    assert result.returncode == 2 and "pass --version" in result.stderr


def test_tpu_run_reaches_every_host_and_keeps_arguments_whole():
    overrides = [
        "--config.init.hf_dir=/dev/shm/Qwen2.5-Math-72B",
        "--config.data.sources=/data/a b.jsonl=3,/data/c.jsonl=1",
    ]
    [cmd] = tpu(
        "run",
        "--name",
        "qm",
        "--zone",
        "z",
        "--config",
        "sft_72b",
        "--workdir",
        "gs://bucket/runs/sft_72b",
        "--",
        *overrides,
    )
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qm"]
    assert "--worker=all" in cmd
    remote = cmd[cmd.index("--command") + 1]
    assert bash("-n", "-c", remote).returncode == 0  # the remote shell can parse it
    launch = remote[remote.index("python3 -m qmath_jax.launch") : remote.index(" 2>&1")]
    assert shlex.split(launch) == [
        "python3",
        "-m",
        "qmath_jax.launch",
        "--config",
        "sft_72b",
        "--workdir",
        "gs://bucket/runs/sft_72b",
        *overrides,
    ]


def test_tpu_multislice_commands_address_all_slices():
    [ssh] = tpu("ssh", "--name", "qm", "--zone", "z", "--num-slices", "2", "--command", "ls")
    assert ssh[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "qm"]
    assert "--node=all" in ssh and "--worker=all" in ssh
    [delete] = tpu("delete", "--name", "qm", "--zone", "z", "--num-slices", "2")
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


def test_tpu_install_copies_the_checkout_then_installs_the_tpu_extra():
    scp, ssh = tpu("install", "--name", "qm", "--zone", "z")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5].endswith(".tar.gz") and scp[6] == "qm:" and "--worker=all" in scp
    remote = ssh[ssh.index("--command") + 1]
    assert bash("-n", "-c", remote).returncode == 0
    assert "pip install -q -e '.[tpu]'" in remote


def test_tpu_source_tarball_holds_the_package(tmp_path):
    """The function `install` ships with, run for real: the archive has the package."""
    out = tmp_path / "src.tar.gz"
    bash("-c", f"source {LAUNCH / 'tpu_vm.sh'} && source_tarball {out}", check=True)
    listing = subprocess.run(
        ["tar", "-tzf", str(out)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "pyproject.toml" in listing and "qmath_jax/launch.py" in listing
    assert not any(name.startswith(".git/") for name in listing)


def gpu(*args: str) -> subprocess.CompletedProcess:
    return bash(str(LAUNCH / "gpu_node.sh"), args[0], "--dry-run", *args[1:])


def test_gpu_multinode_sets_the_jax_distributed_environment():
    result = gpu(
        "multinode",
        "--coordinator",
        "10.0.0.1:8476",
        "--num-nodes",
        "2",
        "--node-rank",
        "1",
        "--gpus",
        "4",
        "--config",
        "sft_tiny",
        "--workdir",
        "/shared/runs/x",
        "--",
        "--config.train.steps=5",
    )
    assert result.returncode == 0, result.stderr
    [cmd] = printed_commands(result.stdout)
    assert cmd == [
        "env",
        "JAX_COORDINATOR_ADDRESS=10.0.0.1:8476",
        "JAX_NUM_PROCESSES=2",
        "JAX_PROCESS_ID=1",
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
        "python3",
        "-m",
        "qmath_jax.launch",
        "--config",
        "sft_tiny",
        "--workdir",
        "/shared/runs/x",
        "--config.train.steps=5",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--coordinator", "10.0.0.1", "--num-nodes", "2", "--node-rank", "0"], "HOST:PORT"),
        (["--coordinator", "h:1", "--num-nodes", "2", "--node-rank", "2"], "0 <= R < --num-nodes"),
        (["--coordinator", "h:1", "--num-nodes", "0", "--node-rank", "0"], "--num-nodes N"),
    ],
)
def test_gpu_multinode_refuses_a_bad_layout(args, message):
    result = gpu("multinode", *args, "--gpus", "8", "--config", "sft_tiny")
    assert result.returncode == 2 and message in result.stderr


def test_gpu_run_is_one_process_on_this_node():
    result = gpu("run", "--config", "sft_tiny", "--gpus", "2")
    assert result.returncode == 0, result.stderr
    [cmd] = printed_commands(result.stdout)
    assert cmd == [
        "env",
        "CUDA_VISIBLE_DEVICES=0,1",
        "python3",
        "-m",
        "qmath_jax.launch",
        "--config",
        "sft_tiny",
    ]


def test_slurm_script_requires_a_config():
    env = {k: v for k, v in os.environ.items() if k != "CONFIG"}
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 2 and "set CONFIG" in result.stderr


# ---------------------------------------------------------------------------- notebook


def test_notebook_is_nbformat_4():
    nb = notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["accelerator"] == "TPU"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], str | list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_code_cells_compile():
    for i, cell in enumerate(notebook()["cells"]):
        if cell["cell_type"] != "code":
            continue
        python = "\n".join(
            line
            for line in cell_source(cell).splitlines()
            if not line.lstrip().startswith(("!", "%"))
        )
        compile(python, f"colab_demo.ipynb cell {i}", "exec")


def test_notebook_runs_the_demo_and_exports():
    text = "\n".join(cell_source(c) for c in notebook()["cells"] if c["cell_type"] == "code")
    assert '!pip install -q -e ".[tpu]"' in text
    assert "!python -m qmath_jax.launch --config demo --workdir /content/demo" in text
    assert "!python -m qmath_jax.hf export --checkpoint" in text
    assert "AutoModelForCausalLM.from_pretrained" in text


# ---------------------------------------------------------------------------- names


def referenced_configs() -> dict[str, set[str]]:
    return {doc: set(CONFIG_NAME.findall(text)) for doc, text in documents().items()}


def test_every_referenced_config_exists():
    refs = referenced_configs()
    missing = {
        f"{doc}: {name}"
        for doc, names in refs.items()
        for name in names
        if not (ROOT / "configs" / f"{name}.py").is_file()
    }
    assert not missing, f"configs named but not in configs/: {sorted(missing)}"
    assert "demo" in refs["launch/colab_demo.ipynb"]


def test_the_guide_covers_every_stage():
    names = referenced_configs()["docs/guide.md"]
    stages = {load_config(n).stage for n in names if (ROOT / "configs" / f"{n}.py").is_file()}
    assert STAGES_TO_COVER <= stages, f"guide lacks a config for {STAGES_TO_COVER - stages}"


def test_every_override_names_a_key_of_its_config():
    bad = []
    for doc, text in documents().items():
        for cmd in launch_commands(text):
            names = CONFIG_NAME.findall(cmd)
            if not names:
                continue  # the config is a shell variable
            if not (ROOT / "configs" / f"{names[0]}.py").is_file():
                bad.append(f"{doc}: config {names[0]} does not exist")
                continue
            cfg = load_config(names[0])
            for key, value in OVERRIDE.findall(cmd):
                node = cfg
                try:
                    for part in key.split("."):
                        node = node[part]
                except (KeyError, AttributeError):
                    bad.append(f"{doc}: {names[0]} has no {key}")
                    continue
                if isinstance(node, bool):
                    ok = value.lower() in ("true", "false")
                elif isinstance(node, int | float):
                    ok = re.fullmatch(r"-?[0-9.e+-]+", value) is not None
                else:
                    ok = True
                if not ok:
                    bad.append(f"{doc}: {names[0]}.{key}={value} is not a {type(node).__name__}")
    assert not bad, bad


def test_every_topology_and_accelerator_in_the_guide_is_real():
    text = GUIDE.read_text()
    topologies = set(TOPOLOGY.findall(text))
    assert topologies
    for topo in topologies:
        parse_topology(topo)
    for accel in set(ACCELERATOR.findall(text)):
        result = bash(
            str(LAUNCH / "tpu_vm.sh"),
            "create",
            "--name",
            "x",
            "--zone",
            "z",
            "--accelerator-type",
            accel,
            "--dry-run",
        )
        assert result.returncode == 0, f"{accel}: {result.stderr}"
