"""Parent side of the sandbox: a pool of warm worker interpreters and the result type.

Each worker is a separate interpreter (``_worker.py``) started with a clean environment; it
forks one jailed child per snippet (see that file and docs/sandbox.md for the layers). This
process only writes requests and reads replies, each bounded by a deadline, so nothing the
snippet does can block or reach it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import json
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

_WORKER_PATH = Path(__file__).with_name("_worker.py")

DEFAULT_TIMEOUT_S = 5.0  # the Qwen2.5-Math evaluation executor's timeout
DEFAULT_MEMORY_MB = 1024
DEFAULT_PRELOAD = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "statistics",
    "random",
    "re",
    "numpy",
    "sympy",
    "mpmath",
)
# Run once in each warm worker so the lazy imports and caches of common calls are already in
# memory when a snippet forks off it.
DEFAULT_WARMUP = """
import sympy as sp, numpy as np
x, y = sp.symbols("x y")
sp.solve([x + y - 3, x - y - 1], [x, y]); sp.solve(x**2 - 2, x)
sp.simplify(sp.sin(x)**2 + sp.cos(x)**2); sp.factor(x**2 - 1); sp.expand((x + 1)**3)
sp.integrate(x**2, (x, 0, 1)); sp.diff(sp.sin(x), x); sp.limit(sp.sin(x) / x, x, 0)
sp.summation(x, (x, 1, 10)); sp.Matrix([[1, 2], [3, 4]]).det(); sp.nsimplify(0.5)
sp.N(sp.pi, 20); sp.Rational(1, 3) + sp.sqrt(2); sp.isprime(97); sp.latex(x**2)
print(sp.Rational(1, 3), sp.sqrt(8), x**2 + 1)
np.linalg.solve(np.eye(2), np.ones(2)); print(np.array([1.5, 2]).sum())
"""
_CLEAN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "MPLCONFIGDIR": "/tmp",
    "MPLBACKEND": "Agg",
    # One thread each: threads count against the process limit, and pools run side by side.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
_START_TIMEOUT_S = 120.0
_REPLY_GRACE_S = 10.0  # the worker enforces the deadline; this only catches a stuck worker


class SandboxError(RuntimeError):
    """A sandbox worker could not be started or answered with garbage."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one execution produced.

    Attributes:
      stdout: The new cell's standard output, at most `max_output_bytes` bytes, followed by a
        truncation marker line when it was longer.
      error: The last line of the traceback ("ZeroDivisionError: division by zero"), a
        "TimeoutError: ..." / "ProcessCrash: ..." / "ProcessExit: ..." line, or "" on success.
      timed_out: The deadline (wall clock) or the CPU-time limit was hit; the process tree
        was killed.
      memory_exceeded: The code ran out of its address-space budget (MemoryError).
      violation: The code tried something the sandbox refuses (network, processes, signals,
        native code, writing outside its scratch directory).
      violation_reason: What it tried first, e.g. "network access (socket.connect)".
      duration_s: Wall time of the execution, replayed cells included.
      stdout_truncated: Whether `stdout` was cut.
    """

    stdout: str
    error: str
    timed_out: bool
    memory_exceeded: bool
    violation: bool
    violation_reason: str
    duration_s: float
    stdout_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the cell ran to completion without an error."""
        return not self.error


def _result_from_reply(reply: dict) -> SandboxResult:
    return SandboxResult(
        stdout=str(reply["stdout"]),
        error=str(reply["error"]),
        timed_out=bool(reply["timed_out"]),
        memory_exceeded=bool(reply["memory_exceeded"]),
        violation=bool(reply["violation"]),
        violation_reason=str(reply["violation"]),
        duration_s=float(reply["duration_s"]),
        stdout_truncated=bool(reply["stdout_truncated"]),
    )


class _Worker:
    """One warm worker interpreter, spoken to over its stdin/stdout pipes."""

    def __init__(self, cfg_json: str) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER_PATH), cfg_json],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(_CLEAN_ENV),
            cwd="/",
            close_fds=True,
            start_new_session=True,
            bufsize=0,
        )
        self.isolation: dict = {}

    def wait_ready(self) -> None:
        msg = self._recv(time.monotonic() + _START_TIMEOUT_S)
        if msg is None or not msg.get("ready"):
            detail = msg.get("error") if msg else self._stderr_tail()
            self.kill()
            raise SandboxError(
                f"sandbox worker failed to start: {detail}. Check that {sys.executable} can "
                "import the preload modules, or pass namespaces=False to SandboxPool on hosts "
                "that forbid namespaces."
            )
        self.isolation = msg["isolation"]

    def request(self, msg: dict, deadline: float) -> dict | None:
        """Sends one request; returns the reply, or None if the worker is stuck or dead."""
        body = json.dumps(msg).encode()
        try:
            os.write(self.proc.stdin.fileno(), struct.pack(">I", len(body)) + body)
        except (OSError, ValueError):  # ValueError: the pipe was closed by kill()
            return None
        return self._recv(deadline)

    def _recv(self, deadline: float) -> dict | None:
        head = self._read_exact(4, deadline)
        if head is None:
            return None
        body = self._read_exact(struct.unpack(">I", head)[0], deadline)
        try:
            return None if body is None else json.loads(body)
        except ValueError:
            return None

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf.extend(chunk)
        return bytes(buf)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-2000:] or f"exit status {self.proc.poll()}"

    def kill(self) -> None:
        """Kills the worker's process group (its jailed children die with it: PDEATHSIG)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            stream.close()

    def close(self) -> None:
        """Asks the worker to exit (EOF on stdin), then makes sure it did."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, OSError):
            pass
        self.kill()


class SandboxPool:
    """A pool of warm, isolated Python workers for model-written code.

    Usage:
      with SandboxPool(4) as pool:
          result = pool.run("print(2 + 2)")
          results = pool.map(["1/0", "import sympy; sympy.sqrt(8)"])

    Args:
      size: Number of warm workers (executions that can run at the same time).
      timeout_s: Default wall-clock limit per execution, replayed cells included.
      memory_mb: Default address space a snippet may add on top of the warm interpreter.
      audit: Install the audit hook that refuses and reports forbidden actions. The OS layers
        hold without it; turn it off only to test them on their own.
      namespaces: Use Linux namespaces (network, PID, mount, IPC) when running as root.
      uid: The unprivileged user snippets run as when the pool runs as root.
      gid: Its group.
      hidden_paths: Directories hidden from snippets (covered by an empty tmpfs), in addition
        to those that must be hidden to expose the interpreter's import directories.
      preload: Modules imported once in each worker, so snippets get them for free.
      warmup: Code run once in each worker to pre-load lazy imports and caches.
      max_output_bytes: Cap on returned stdout.
      max_processes: RLIMIT_NPROC for the snippet user (processes and threads, host-wide).
      max_file_mb: RLIMIT_FSIZE, the largest file a snippet may write.
      scratch_mb: Size of each snippet's private scratch tmpfs.
    """

    def __init__(
        self,
        size: int = 2,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int = DEFAULT_MEMORY_MB,
        audit: bool = True,
        namespaces: bool = True,
        uid: int | None = 65534,
        gid: int | None = 65534,
        hidden_paths: Sequence[str] = ("/root", "/home"),
        preload: Sequence[str] = DEFAULT_PRELOAD,
        warmup: str = DEFAULT_WARMUP,
        max_output_bytes: int = 4096,
        max_processes: int = 16,
        max_file_mb: int = 16,
        scratch_mb: int = 64,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"SandboxPool size must be a positive int, got {size!r}")
        _check_limits(timeout_s, memory_mb)
        if (uid is None) != (gid is None):
            raise ValueError("SandboxPool: give both uid and gid, or neither")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self._cfg = json.dumps(
            {
                "uid": uid,
                "gid": gid,
                "audit": bool(audit),
                "namespaces": bool(namespaces),
                "hidden_paths": list(hidden_paths),
                "preload": list(preload),
                "warmup": warmup,
                "max_output_bytes": int(max_output_bytes),
                "max_processes": int(max_processes),
                "max_file_mb": int(max_file_mb),
                "scratch_mb": int(scratch_mb),
            }
        )
        self._size = size
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        workers = [_Worker(self._cfg) for _ in range(size)]  # start all, then wait: in parallel
        try:
            for w in workers:
                w.wait_ready()
        except SandboxError:
            for w in workers:
                w.kill()
            raise
        for w in workers:
            self._all.append(w)
            self._idle.put(w)
        self._executor = concurrent.futures.ThreadPoolExecutor(size, "sandbox")

    @property
    def isolation(self) -> dict:
        """Which isolation layers the workers obtained (namespaces, uid, hidden paths...)."""
        return dict(self._all[0].isolation)

    @property
    def size(self) -> int:
        """Number of workers."""
        return self._size

    def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        previous_cells: Iterable[str] = (),
    ) -> SandboxResult:
        """Runs `code` in a fresh jailed process; earlier cells are replayed first.

        Args:
          code: The new cell. If its last statement is a bare expression, its value is
            printed (as the Qwen2.5-Math executor does), unless it is None.
          timeout_s: Wall-clock limit; defaults to the pool's.
          memory_mb: Address-space budget on top of the warm interpreter; defaults to the pool's.
          previous_cells: Earlier successful cells of the same solution, replayed in order with
            their output discarded, so the new cell sees their variables.

        Returns:
          The new cell's SandboxResult.
        """
        if self._closed:
            raise SandboxError("this SandboxPool is closed; create a new one")
        req = self._request(code, timeout_s, memory_mb, previous_cells)
        worker = self._idle.get()
        t0 = time.monotonic()
        try:
            reply = worker.request(req, t0 + req["timeout_s"] + _REPLY_GRACE_S)
            if reply is None or "stdout" not in reply:
                # The worker itself is stuck or died (never the snippet's doing: snippets run
                # in its children). Replace it and report the execution as failed.
                worker = self._replace(worker)
                elapsed = time.monotonic() - t0
                stuck = elapsed >= req["timeout_s"]
                return SandboxResult(
                    stdout="",
                    error=(
                        "TimeoutError: the sandbox worker stopped answering and was replaced"
                        if stuck
                        else "ProcessCrash: the sandbox worker died and was replaced"
                    ),
                    timed_out=stuck,
                    memory_exceeded=False,
                    violation=False,
                    violation_reason="",
                    duration_s=elapsed,
                )
            return _result_from_reply(reply)
        finally:
            self._idle.put(worker)

    def map(
        self,
        codes: Sequence[str],
        *,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        previous_cells: Sequence[Sequence[str]] | None = None,
    ) -> list[SandboxResult]:
        """Runs many snippets in parallel across the workers; results keep the input order.

        Args:
          codes: The snippets.
          timeout_s: Per-snippet wall-clock limit.
          memory_mb: Per-snippet memory budget.
          previous_cells: Optional, one sequence of earlier cells per snippet.
        """
        if previous_cells is not None and len(previous_cells) != len(codes):
            raise ValueError(
                f"map: previous_cells has {len(previous_cells)} entries but codes has "
                f"{len(codes)}; pass one (possibly empty) list of cells per snippet"
            )
        prev = previous_cells if previous_cells is not None else [()] * len(codes)
        futures = [
            self._executor.submit(
                self.run, c, timeout_s=timeout_s, memory_mb=memory_mb, previous_cells=p
            )
            for c, p in zip(codes, prev)
        ]
        return [f.result() for f in futures]

    def _request(self, code, timeout_s, memory_mb, previous_cells) -> dict:
        if not isinstance(code, str):
            raise TypeError(f"sandbox code must be a str, got {type(code).__name__}")
        cells = list(previous_cells)
        for i, cell in enumerate(cells):
            if not isinstance(cell, str):
                raise TypeError(f"previous_cells[{i}] must be a str, got {type(cell).__name__}")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        memory_mb = self.memory_mb if memory_mb is None else memory_mb
        _check_limits(timeout_s, memory_mb)
        return {
            "code": code,
            "previous_cells": cells,
            "timeout_s": float(timeout_s),
            "memory_mb": int(memory_mb),
        }

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._cfg)
        fresh.wait_ready()
        with self._lock:
            self._all[self._all.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        """Stops every worker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        for w in self._all:
            w.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HostShardedPool:
    """A pool for a multi-host job whose hosts all hold the same batch of cells.

    Host h runs cells h, h + H, h + 2H, ... of each `map` call in its own `pool`, then the
    hosts exchange results, so every host returns the same list whatever its own timings.
    Every host must call `map` with the same cells, in the same order (it is a collective).
    """

    def __init__(self, pool: SandboxPool):
        import jax

        self.pool = pool
        self.host, self.hosts = jax.process_index(), jax.process_count()

    def map(self, codes: Sequence[str], *, timeout_s: float | None = None,
            memory_mb: int | None = None,
            previous_cells: Sequence[Sequence[str]] | None = None) -> list[SandboxResult]:
        """`SandboxPool.map` over all hosts; results keep the input order."""
        from qmath_jax import parallel

        mine = range(self.host, len(codes), self.hosts)
        prev = previous_cells if previous_cells is not None else [()] * len(codes)
        local = self.pool.map([codes[i] for i in mine], timeout_s=timeout_s,
                              memory_mb=memory_mb, previous_cells=[prev[i] for i in mine])
        payload = json.dumps([dataclasses.asdict(r) for r in local]).encode()
        results: list[SandboxResult | None] = [None] * len(codes)
        for h, blob in enumerate(parallel.allgather_bytes(payload)):
            for i, fields in zip(range(h, len(codes), self.hosts), json.loads(blob)):
                results[i] = SandboxResult(**fields)
        return results

    def close(self) -> None:
        self.pool.close()


def across_hosts(pool: SandboxPool) -> SandboxPool | HostShardedPool:
    """`pool` itself on one host; on several, a HostShardedPool around it."""
    import jax

    return HostShardedPool(pool) if jax.process_count() > 1 else pool


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 3600:
        raise ValueError(f"timeout_s must be a number in (0, 3600] seconds, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or not 16 <= memory_mb <= 1 << 20:
        raise ValueError(f"memory_mb must be an int in [16, 1048576] MiB, got {memory_mb!r}")


_DEFAULT_POOL: SandboxPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The lazily created process-wide pool behind `run` (2 to 4 workers)."""
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        if _DEFAULT_POOL is None or _DEFAULT_POOL._closed:
            _DEFAULT_POOL = SandboxPool(max(2, min(4, os.cpu_count() or 2)))
            atexit.register(_DEFAULT_POOL.close)
        return _DEFAULT_POOL


def run(
    code: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    previous_cells: Iterable[str] = (),
) -> SandboxResult:
    """Runs model-written Python isolated from this process (see `SandboxPool.run`).

    Args:
      code: The cell to run.
      timeout_s: Wall-clock limit in seconds.
      memory_mb: Address-space budget in MiB on top of the warm interpreter.
      previous_cells: Earlier successful cells of the same solution, replayed silently.

    Returns:
      A SandboxResult.
    """
    return default_pool().run(
        code, timeout_s=timeout_s, memory_mb=memory_mb, previous_cells=previous_cells
    )
