"""Workdir files on a local disk or in a bucket (`gs://...`), through `etils.epath`.

Multi-host TPU runs keep their workdir in a bucket that every host reaches, so every file
a stage writes or reads there (metrics, reports, the tokenizer, model_config.json, eval
samples) goes through this module. Orbax reaches the same paths itself, through epath and
TensorStore.

Local paths keep the plain `os` calls they always had, so local files stay byte-identical.
A remote path (one with a `scheme://`) differs in three ways, each handled here:

* Objects have no directories: `makedirs` is a no-op, a "directory" is a name prefix.
* Objects cannot be appended to: `append_text` uploads the new text as its own object and
  composes the two server-side (`merge`, GCS compose), so an append costs the new bytes.
* There is no atomic rename, but none is needed: an object appears only when its upload
  completes, so `write_text_atomic` uploads the whole text in one request and a reader
  sees the old or the new object, never a torn one. Locally it writes `PATH.tmp` and
  renames it over PATH.

Libraries that need real local files (HF tokenizers, safetensors memory maps, JSONL
memory maps) get them from `fetch` (a downloaded copy) and `staged_dir` (uploaded after).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from typing import IO


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (gs://, s3://, ...) rather than a local file."""
    return "://" in os.fspath(path)


def _epath(path):
    from etils import epath  # imported only for remote paths: local runs need no etils

    return epath.Path(os.fspath(path))


def abspath(path: str | os.PathLike) -> str:
    """os.path.abspath for local paths; a URL is already absolute (abspath would turn
    gs://b/x into ./gs:/b/x, a local folder)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
    """A file or a directory; in a bucket, an object or a non-empty name prefix."""
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    """A directory; in a bucket, a name prefix that has objects under it."""
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory and its parents; nothing in a bucket, whose objects need
    no parent (and gcsfs would create a missing bucket, hiding a mistyped name)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open(path: str | os.PathLike, mode: str = "r", encoding: str | None = None) -> IO:
    """Opens a file for reading ("r" or "rb"); remote text is read as UTF-8.

    Writes go through `write_text`, `write_bytes`, `write_text_atomic` and `append_text`,
    which a bucket can honour whole (an open remote writer would publish a half-written
    object when the block raises).
    """
    if mode not in ("r", "rb"):
        raise ValueError(f"fileio.open reads only (mode 'r' or 'rb'), got {mode!r}")
    if not is_remote(path):
        return builtins.open(path, mode, encoding=encoding)
    raw = _epath(path).open("rb")
    return raw if mode == "rb" else io.TextIOWrapper(raw, encoding="utf-8")


def write_text(path: str | os.PathLike, text: str, encoding: str | None = None) -> None:
    """Writes (replaces) a text file; remote text is stored as UTF-8 in one upload."""
    if is_remote(path):
        _epath(path).write_bytes(text.encode("utf-8"))
        return
    with builtins.open(path, "w", encoding=encoding) as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes (replaces) a binary file; remotely in one upload."""
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    with builtins.open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str | None = None) -> None:
    """Replaces a file so that no reader (or a crash) ever sees it half-written.

    Locally: write PATH.tmp, then os.replace it over PATH. In a bucket: one upload, which
    is atomic by itself (the object appears only once complete).
    """
    if is_remote(path):
        write_text(path, text)
        return
    tmp = os.fspath(path) + ".tmp"
    with builtins.open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    os.replace(tmp, path)


def append_text(path: str | os.PathLike, text: str, encoding: str | None = None) -> None:
    """Appends to a text file, creating it if missing.

    A bucket has no append (gcsfs's mode "a" silently overwrites), so the text is uploaded
    as a part object and composed onto the end of PATH server-side, then the part deleted.
    """
    if not is_remote(path):
        with builtins.open(path, "a", encoding=encoding) as f:
            f.write(text)
        return
    target = _epath(path)
    if not target.exists():
        target.write_bytes(text.encode("utf-8"))
        return
    part = f"{os.fspath(path)}.part-{uuid.uuid4().hex}"
    _epath(part).write_bytes(text.encode("utf-8"))
    try:
        _filesystem(path).merge(os.fspath(path), [os.fspath(path), part])
    finally:
        _epath(part).unlink(missing_ok=True)


def _filesystem(path: str | os.PathLike):
    """The fsspec file system epath uses for `path` (gcsfs for gs://): it has `merge`."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(path))


def fetch(path: str | os.PathLike, names: Collection[str] | None = None) -> str:
    """A local path holding the file or directory `path` (its files, not sub-directories).

    Local paths come back unchanged. A remote one is downloaded into a fresh temporary
    directory, kept until the process exits (callers may memory-map the files), under its
    own base name so that `tokenizer.json` and the like keep their names. `names` limits a
    directory's download to those files (a tokenizer beside 15 GB of weights).
    """
    path = os.fspath(path)
    if not is_remote(path):
        return path
    src = _epath(path)
    dst = os.path.join(_scratch_dir(), src.name)
    if src.is_dir():
        os.makedirs(dst)
        for child in src.iterdir():
            if (names is None or child.name in names) and not child.is_dir():
                _download(child, os.path.join(dst, child.name))
    elif src.exists():
        _download(src, dst)
    else:
        raise FileNotFoundError(f"{path} does not exist")
    return dst


def _scratch_dir() -> str:
    scratch = tempfile.mkdtemp(prefix="qmath_jax_fetch_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch


def _download(src, dst: str) -> None:
    with src.open("rb") as r, builtins.open(dst, "wb") as w:
        shutil.copyfileobj(r, w, 1 << 24)


@contextlib.contextmanager
def staged_dir(directory: str | os.PathLike) -> Iterator[str]:
    """A local directory for writers that need real files, whose files end up in
    `directory`.

    Local: `directory` itself (created). Remote: a temporary directory whose files (and
    sub-directories) are uploaded to `directory` when the block ends without an error.
    """
    directory = os.fspath(directory)
    if not is_remote(directory):
        os.makedirs(directory, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="qmath_jax_stage_") as local:
        yield local
        _upload_tree(local, directory)


def _upload_tree(local: str, remote: str) -> None:
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        for name in sorted(files):
            dst = _epath(remote) / name if rel == "." else _epath(remote) / rel / name
            with builtins.open(os.path.join(root, name), "rb") as r, dst.open("wb") as w:
                shutil.copyfileobj(r, w, 1 << 24)
