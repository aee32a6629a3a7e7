"""A small persistent pool of symbolic-check worker processes with per-call deadlines.

Why processes and not signals: sympy can spend minutes (or all memory) inside one C
call on hostile input, which no ``signal.alarm`` can interrupt, and ``signal.alarm``
only works in the main thread anyway. A worker that misses its deadline is killed and
replaced, so the caller always gets an answer in bounded time.

Workers are plain subprocesses (``python -m qmath_jax.grading.worker``) talking JSON
lines over pipes, not ``multiprocessing`` children: that works from threads, from
daemonic ``multiprocessing`` pool workers (which may not fork children of their own)
and under any multiprocessing start method.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

# Time a fresh worker may take to import sympy and the parsers before it counts as
# broken. Not charged to a call's deadline: it is a one-off cost, not input-dependent.
STARTUP_TIMEOUT_S = 30.0


class WorkerError(RuntimeError):
    """A worker died, timed out or answered nonsense."""


class _Worker:
    """One worker subprocess and its line-buffered reply pipe."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # The worker must not grab an accelerator or spin up thread pools.
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmath_jax.grading.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self.ready = False

    def _read_line(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError("deadline passed")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                raise WorkerError("deadline passed")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerError("worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self) -> None:
        """Blocks until the worker has imported its modules (bounded by STARTUP_TIMEOUT_S)."""
        if not self.ready:
            if self._read_line(time.monotonic() + STARTUP_TIMEOUT_S) != b"ready":
                raise WorkerError("worker did not start")
            self.ready = True

    def call(self, request: dict, deadline: float) -> dict:
        """Sends one request and waits for its reply until ``deadline``."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError("worker pipe closed") from exc
        reply = json.loads(self._read_line(deadline))
        if reply.get("id") != request["id"]:
            raise WorkerError("reply to another request")
        return reply

    def kill(self) -> None:
        """Kills the process (SIGKILL: it may be stuck inside C code) and reaps it."""
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class SymbolicPool:
    """Thread-safe pool of up to ``max_workers`` symbolic workers.

    Args:
        max_workers: most worker processes alive at once (each is one CPU when busy).
    """

    def __init__(self, max_workers: int = 2) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._slots = threading.Semaphore(max_workers)
        self._next_id = 0
        self.kills = 0
        self.pid = os.getpid()

    def warm_up(self) -> None:
        """Starts all workers now and waits until they are ready."""
        workers = [self._checkout() for _ in range(self.max_workers)]
        for worker in workers:
            worker.wait_ready()
        with self._lock:
            self._idle.extend(workers)

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _replace(self, worker: _Worker) -> None:
        """Kills ``worker`` and starts its successor at once, so that the next call does
        not pay the import time."""
        worker.kill()
        with self._lock:
            self.kills += 1
            self._idle.append(_Worker())

    def run(self, op: str, pred: str, gold: str, timeout_s: float) -> bool | None:
        """Runs ``op`` ("equiv") on one worker; False when the work timed out or crashed
        the worker, None when no worker became free in time.

        Args:
            op: the worker operation.
            pred: normalised prediction.
            gold: normalised reference.
            timeout_s: seconds for waiting for a free worker plus computing.

        Returns:
            The worker's verdict; False on timeout or crash; None without a free worker.
        """
        start = time.monotonic()
        if not self._slots.acquire(timeout=max(timeout_s, 0.0)):
            return None
        try:
            worker = self._checkout()
            try:
                worker.wait_ready()
                with self._lock:
                    self._next_id += 1
                    request = {"id": self._next_id, "op": op, "pred": pred, "gold": gold}
                # Startup (imports) is not charged, only the wait for a slot and the work.
                deadline = time.monotonic() + max(timeout_s - (time.monotonic() - start), 0.05)
                reply = worker.call(request, deadline)
            except (WorkerError, ValueError, OSError):
                self._replace(worker)
                return False
            with self._lock:
                self._idle.append(worker)
            return bool(reply.get("ok", False))
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stops the idle workers (busy ones are stopped by their callers)."""
        if os.getpid() != self.pid:
            return  # a forked child's copy: the workers belong to the parent
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_POOL: SymbolicPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> SymbolicPool:
    """The process-wide pool (created on first use; one per process, fork-aware)."""
    global _POOL
    with _POOL_LOCK:
        # A forked child must not share its parent's worker pipes: it gets its own pool.
        if _POOL is None or _POOL.pid != os.getpid():
            workers = int(os.environ.get("QMATH_GRADING_WORKERS", "2"))
            _POOL = SymbolicPool(max_workers=workers)
            atexit.register(_POOL.close)
        return _POOL
