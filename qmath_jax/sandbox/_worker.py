"""Warm sandbox worker ("zygote"): runs as its own interpreter, never imported by qmath_jax.

Started by `qmath_jax.sandbox` as ``python -I _worker.py CONFIG_JSON`` with a clean environment.
It pre-imports the math libraries once, seals itself (network, mount and IPC namespaces, a
read-only view of the file system with private home directories hidden), then serves requests
read from stdin. Each request runs in a fresh child forked from this warm interpreter:

    zygote (root, trusted, no network)
      └─ child: PID 1 of a new PID namespace, own mount + IPC namespace, a private tmpfs
         scratch at /tmp, a fresh /proc, rlimits, uid/gid ``nobody``, no_new_privs,
         an audit hook; runs the model's cells and dies. Killing it kills every process
         it started (the kernel empties a PID namespace when its init exits).

The zygote never runs model code, so it stays clean; only children are discarded. Wire format
on stdin/stdout: 4-byte big-endian length + UTF-8 JSON, one request -> one reply.

This file must stay importable without qmath_jax (it runs with ``-I``: no cwd on sys.path).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import fcntl
import io
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

# Namespace / mount constants from <sched.h>, <sys/mount.h>, <linux/mount.h>, <sys/prctl.h>.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_LIBC.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def unshare(flags: int) -> None:
    _check(_LIBC.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_LIBC.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(_LIBC.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_LIBC.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _make_tree_readonly() -> str:
    """Makes every mount in this mount namespace read-only, nosuid and nodev.

    Returns:
      How it was done ("mount_setattr" or "remount"), for the isolation report.
    """
    # Not nodev: /dev/null and friends must stay openable.
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    ret = _LIBC.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(b"/"),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if ret == 0:
        return "mount_setattr"
    # Kernels before 5.12: remount each mount point on its own (bind remounts are per mount).
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        try:
            mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID, None)
        except OSError:
            pass  # a mount we cannot remount (e.g. locked) stays as it was; reported below
    return "remount"


def _outermost(paths: list[str]) -> list[str]:
    """Drops paths that lie inside another path of the list."""
    paths = sorted(set(paths))
    out: list[str] = []
    for p in paths:
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return out


def _untraversable_ancestor(path: str) -> str | None:
    """First ancestor of `path` that other users cannot enter (no o+x), if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & 0o001:
            return anc
    return None


def _hide_paths(hidden: list[str], keep: list[str]) -> dict:
    """Covers `hidden` directories with empty tmpfs, re-exposing the `keep` paths inside them.

    Keep paths are the interpreter's import directories; when they sit under a directory that
    `nobody` cannot enter (a pyenv under /root), that directory is hidden too and the import
    directories are bind-mounted back at their own path, so imports still work after the drop.
    """
    keep = _outermost([os.path.realpath(k) for k in keep if os.path.isdir(k)])
    targets = [os.path.realpath(h) for h in hidden if os.path.isdir(h)]
    targets += [a for a in map(_untraversable_ancestor, keep) if a]
    targets = _outermost(targets)
    done, skipped = [], []
    for h in targets:
        if any(h == k or h.startswith(k + "/") for k in keep):
            skipped.append(h)  # hiding it would break imports
            continue
        inner = [k for k in keep if k.startswith(h + "/")]
        fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in inner]
        mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m,nr_inodes=1024")
        for k, fd in zip(inner, fds):
            os.makedirs(k, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC, None)
            os.close(fd)
        done.append(h)
    return {"hidden": done, "not_hidden": skipped}


class Zygote:
    """The warm interpreter: seals itself once, then forks one jailed child per request."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.iso: dict = {"root": os.geteuid() == 0}
        self.host_pidns_fd = -1

    # ---- start-up -------------------------------------------------------------------------

    def preload(self) -> None:
        """Imports and warms the math libraries so children start with them in memory."""
        import importlib

        loaded = []
        for name in self.cfg["preload"]:
            # A missing optional library is reported (absent from "preloaded"), not fatal.
            with contextlib.suppress(Exception):
                importlib.import_module(name)
                loaded.append(name)
        self.iso["preloaded"] = loaded
        _reseed()  # the first numpy seeding is slow (lazy set-up); pay it once, here
        if self.cfg.get("warmup"):
            g: dict = {"__name__": "__warmup__"}
            stdout = sys.stdout
            sys.stdout = io.StringIO()
            try:
                exec(compile(self.cfg["warmup"], "<warmup>", "exec"), g)  # noqa: S102 - our own code
            except Exception as exc:  # noqa: BLE001
                self.iso["warmup_error"] = repr(exc)
            finally:
                sys.stdout = stdout

    def seal(self) -> None:
        """Enters network/mount/IPC/UTS namespaces and makes the file system read-only."""
        iso = self.iso
        iso.update(netns=False, mountns=False, pidns=False, readonly=None)
        iso["uid"] = self.cfg["uid"] if iso["root"] else None
        if not iso["root"] or not self.cfg["namespaces"]:
            if iso["uid"] is not None:
                # Without a mount namespace, import directories the sandbox user cannot enter
                # stay unreachable: only preloaded modules will import. Report them.
                keep = [p for p in sys.path if p and os.path.isdir(p)]
                iso["unreadable_import_paths"] = [p for p in keep if _untraversable_ancestor(p)]
            return
        for flag, key in ((CLONE_NEWNET, "netns"), (CLONE_NEWNS, "mountns")):
            try:
                unshare(flag)
                iso[key] = True
            except OSError as exc:
                iso[key + "_error"] = str(exc)
        for flag in (CLONE_NEWUTS, CLONE_NEWIPC):
            try:
                unshare(flag)
            except OSError:
                pass
        if iso["mountns"]:
            # Without this, mounts made below would propagate back to the host's namespace.
            mount(None, "/", None, MS_REC | MS_PRIVATE, None)
            keep = [p for p in sys.path if p and os.path.isabs(p)]
            iso.update(_hide_paths(self.cfg["hidden_paths"], keep))
            iso["readonly"] = _make_tree_readonly()
        try:
            self.host_pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            unshare(CLONE_NEWPID)
            setns(self.host_pidns_fd, CLONE_NEWPID)
            iso["pidns"] = True
        except OSError as exc:
            iso["pidns_error"] = str(exc)

    # ---- serving --------------------------------------------------------------------------

    def serve(self, proto_in: int, proto_out: int) -> None:
        """Answers requests until the parent closes stdin."""
        base_as = _vm_size()
        self.iso["baseline_vm_mb"] = round(base_as / 2**20, 1)
        _send(proto_out, {"ready": True, "isolation": self.iso})
        while True:
            req = _recv(proto_in)
            if req is None:
                return
            _send(proto_out, self.handle(req, proto_in, base_as))

    def handle(self, req: dict, proto_in: int, base_as: int) -> dict:
        """Runs one request in a jailed child and collects its output within the deadline."""
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        if not self.iso["mountns"]:
            req["fallback_scratch"] = self._make_scratch()
        if self.iso["pidns"]:
            unshare(CLONE_NEWPID)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(self, req, out_w, res_w, base_as)  # never returns
        if self.iso["pidns"]:
            setns(self.host_pidns_fd, CLONE_NEWPID)
        os.close(out_w)
        os.close(res_w)
        try:
            return self._collect(pid, req, out_r, res_r, proto_in, t0)
        finally:
            os.close(out_r)
            os.close(res_r)
            if "fallback_scratch" in req:
                shutil.rmtree(req["fallback_scratch"], ignore_errors=True)

    def _make_scratch(self) -> str:
        """A private scratch directory for hosts without mount namespaces."""
        path = tempfile.mkdtemp(prefix="qmath_sandbox_")
        if self.iso["root"] and self.cfg["uid"] is not None:
            os.chown(path, self.cfg["uid"], self.cfg["gid"])
        return path

    def _collect(self, pid: int, req: dict, out_r: int, res_r: int, proto_in: int, t0: float):
        cap = self.cfg["max_output_bytes"]
        deadline = t0 + req["timeout_s"]
        out, res = bytearray(), bytearray()
        out_total, timed_out, parent_gone = 0, False, False
        pidfd = os.pidfd_open(pid)
        os.set_blocking(out_r, False)
        os.set_blocking(res_r, False)
        poller = select.poll()
        for fd in (out_r, res_r, pidfd, proto_in):
            poller.register(fd, select.POLLIN | select.POLLHUP)
        open_fds = {out_r, res_r}
        exited, exit_grace = False, 0.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 and not exited:
                timed_out = True
                _kill_tree(pid)
                left = 1.0  # let the kernel finish tearing the namespace down
            for fd, ev in poller.poll(max(0, int(left * 1000)) if not exited else 50):
                if fd == pidfd:
                    exited = True
                    exit_grace = time.monotonic() + 1.0
                    poller.unregister(pidfd)
                elif fd == proto_in:
                    parent_gone = True  # parent died or closed our stdin: stop everything
                    _kill_tree(pid)
                    poller.unregister(proto_in)
                else:
                    out_total += self._drain(fd, fd == out_r, out, res, cap, open_fds, poller)
            if exited and not open_fds:
                break
            if exited and (not self.iso["pidns"] or time.monotonic() > exit_grace):
                # Without a PID namespace a leftover grandchild may hold the pipes open.
                self._drain_now(out_r, out, cap, res_r, res)
                break
        _kill_tree(pid)
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        if parent_gone:
            sys.exit(0)
        return _reply(out, out_total, cap, res, status, timed_out, time.monotonic() - t0, req)

    @staticmethod
    def _drain(fd, is_out, out, res, cap, open_fds, poller) -> int:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return 0
        if not chunk:
            open_fds.discard(fd)
            poller.unregister(fd)
            return 0
        if is_out:
            if len(out) < cap + 1:
                out.extend(chunk[: cap + 1 - len(out)])
            return len(chunk)
        if len(res) < 65536:
            res.extend(chunk)
        return 0

    @staticmethod
    def _drain_now(out_r, out, cap, res_r, res) -> None:
        for fd, buf, limit in ((out_r, out, cap + 1), (res_r, res, 65536)):
            try:
                while len(buf) < limit:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    buf.extend(chunk[: limit - len(buf)])
            except BlockingIOError:
                pass


def _kill_tree(pid: int) -> None:
    """Kills the child and its process group; in a PID namespace this empties the namespace."""
    for fn, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            fn(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reply(out, out_total, cap, res, status, timed_out, duration, req) -> dict:
    text = bytes(out[:cap]).decode("utf-8", errors="replace")
    truncated = out_total > cap
    if truncated:
        text += f"\n... [output truncated: {out_total} bytes, showing the first {cap}]"
    try:
        result = json.loads(bytes(res).decode()) if res else None
        if not isinstance(result, dict):
            result = None
    except ValueError:
        result = None
    error, memory, violation = "", False, ""
    if result is not None:
        error = str(result.get("error", ""))[:2000]
        memory = bool(result.get("memory", False))
        violation = str(result.get("violation", ""))[:500]
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if timed_out or sig == signal.SIGXCPU:
        timed_out = True
        error = f"TimeoutError: execution exceeded {req['timeout_s']:g} s"
    elif result is None:
        if sig:
            error = f"ProcessCrash: killed by signal {signal.Signals(sig).name}"
        else:
            code = os.WEXITSTATUS(status)
            error = f"ProcessExit: the code ended the process with status {code}"
    return {
        "stdout": text,
        "stdout_truncated": truncated,
        "error": error,
        "timed_out": timed_out,
        "memory_exceeded": memory,
        "violation": violation,
        "duration_s": duration,
    }


# ---- the jailed child -------------------------------------------------------------------------


def _child(z: Zygote, req: dict, out_w: int, res_w: int, base_as: int) -> None:
    """Jails this freshly forked child, runs the cells, reports, and exits. Never returns."""
    status, res_fd = 70, res_w
    try:
        _setup_fds(out_w, res_w)
        res_fd = 3
        scratch = _jail(z, req, base_as)
        status = _run_cells(req, scratch, z.cfg["audit"])
    except BaseException:  # noqa: BLE001 - nothing may escape back into the zygote's loop
        with contextlib.suppress(BaseException):
            msg = traceback.format_exc().rstrip().split("\n")[-1]
            os.write(res_fd, json.dumps({"error": f"SandboxSetupError: {msg}"}).encode())
    finally:
        os._exit(status)


def _setup_fds(out_w: int, res_w: int) -> None:
    """fd 0 = /dev/null, 1 = output pipe, 2 = /dev/null, 3 = result pipe; all others closed."""
    devnull = os.open("/dev/null", os.O_RDWR)
    # Move the sources above the targets first, so no dup2 clobbers a source still needed.
    srcs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in (devnull, out_w, devnull, res_w)]
    for dst, src in enumerate(srcs):
        os.dup2(src, dst)
    os.closerange(4, 1 << 16)


def _jail(z: Zygote, req: dict, base_as: int) -> str:
    """Applies every isolation layer to the current (root, just forked) process."""
    cfg, iso = z.cfg, z.iso
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    scratch = "/tmp"
    if iso["mountns"]:
        unshare(CLONE_NEWNS | CLONE_NEWIPC)
        uid, gid = cfg["uid"], cfg["gid"]
        opts = f"mode=700,uid={uid},gid={gid},size={cfg['scratch_mb']}m,nr_inodes=4096"
        mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, opts)
        if iso["pidns"]:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    else:
        scratch = req["fallback_scratch"]
    os.chdir(scratch)
    os.umask(0o077)
    _set_limits(cfg, req, base_as)
    if iso["root"] and cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"]:
            raise PermissionError("could not drop to the sandbox uid")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: credential changes clear it
    os.environ.update(HOME=scratch, TMPDIR=scratch, MPLCONFIGDIR=scratch)
    _reseed()
    return scratch


def _set_limits(cfg: dict, req: dict, base_as: int) -> None:
    cpu = math.ceil(req["timeout_s"]) + 1
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: base_as + req["memory_mb"] * 2**20,
        resource.RLIMIT_FSIZE: cfg["max_file_mb"] * 2**20,
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_NPROC: cfg["max_processes"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_MEMLOCK: 0,
        resource.RLIMIT_MSGQUEUE: 0,
    }
    for res, value in limits.items():
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(res, (soft, hard))


def _reseed() -> None:
    """Forked children share the zygote's RNG state; give each its own."""
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(None)


# Audit events refused inside the sandbox, with the reason reported as a violation.
_REFUSED = {
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "socket.sendto": "network access",
    "socket.getaddrinfo": "network access",
    "socket.gethostbyname": "network access",
    "subprocess.Popen": "starting a process",
    "os.system": "starting a process",
    "os.exec": "starting a process",
    "os.posix_spawn": "starting a process",
    "os.spawn": "starting a process",
    "os.fork": "starting a process",
    "os.forkpty": "starting a process",
    "pty.spawn": "starting a process",
    "os.kill": "signalling a process",
    "os.killpg": "signalling a process",
    "signal.pthread_kill": "signalling a process",
    "ctypes.dlopen": "loading native code",
    "ctypes.dlsym": "loading native code",
    "ctypes.call_function": "calling native code",
}
# Audit events that change the file system: event -> index of the path argument.
_MUTATING = {
    "os.remove": 0,
    "os.rename": 0,
    "os.mkdir": 0,
    "os.rmdir": 0,
    "os.chmod": 0,
    "os.chown": 0,
    "os.symlink": 1,
    "os.link": 1,
    "os.truncate": 0,
    "os.utime": 0,
    "shutil.rmtree": 0,
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install_audit_hook(scratch: str, violations: list[str]) -> None:
    """Refuses network, process, signal and native-code events, and writes outside scratch."""
    root = os.path.realpath(scratch)

    def outside(path) -> bool:
        if isinstance(path, int):
            return False  # an fd already open: its opening was checked
        p = os.path.realpath(os.fsdecode(path))
        return not (p == root or p.startswith(root + "/") or p == "/dev/null")

    def refuse(reason: str, detail: str):
        if not violations:
            violations.append(f"{reason} ({detail})")
        raise PermissionError(f"sandbox: {reason} is not allowed")

    def hook(event: str, args: tuple) -> None:
        reason = _REFUSED.get(event)
        if reason is not None:
            refuse(reason, event)
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and outside(path):
                refuse("writing outside the scratch directory", os.fsdecode(path))
        elif event in _MUTATING:
            path = args[_MUTATING[event]]
            if outside(path):
                refuse("writing outside the scratch directory", os.fsdecode(path))

    sys.addaudithook(hook)


def _exec_cell(code: str, g: dict, echo_last: bool) -> None:
    """Executes one cell; with `echo_last`, a final bare expression's value is printed."""
    tree = ast.parse(code, filename="<cell>", mode="exec")
    last = None
    if echo_last and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<cell>", "exec"), g)  # noqa: S102 - running it is the point
    if last is not None:
        value = eval(compile(last, "<cell>", "eval"), g)
        if value is not None:
            print(value)


def _last_line(exc: BaseException) -> str:
    """The last line of the traceback, as the Qwen2.5-Math executor reports errors."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    return text.split("\n")[-1]


def _run_cells(req: dict, scratch: str, audit: bool) -> int:
    """Replays earlier cells silently, runs the new one, writes the result record to fd 3."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
        write_through=True,
    )  # fmt: skip
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8")
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    sys.dont_write_bytecode = True
    violations: list[str] = []
    if audit:
        _install_audit_hook(scratch, violations)
    g = {"__name__": "__main__", "__builtins__": builtins}
    if req["previous_cells"]:
        saved = os.dup(1)
        os.dup2(0, 1)  # fd 0 is /dev/null: earlier cells' output is not shown again
        for cell in req["previous_cells"]:
            # It succeeded before; a failure now (e.g. randomness) does not stop the new cell.
            with contextlib.suppress(BaseException):
                _exec_cell(cell, g, echo_last=False)
        os.dup2(saved, 1)
        os.close(saved)
    error, memory = "", False
    try:
        _exec_cell(req["code"], g, echo_last=True)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
        error, memory = _last_line(exc), isinstance(exc, MemoryError)
    with contextlib.suppress(BaseException):  # the code may have closed or replaced it
        sys.stdout.flush()
    record = {"error": error, "memory": memory, "violation": violations[0] if violations else ""}
    os.write(3, json.dumps(record).encode())
    return 0


# ---- wire protocol ----------------------------------------------------------------------------


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf.extend(chunk)
    return bytes(buf)


def _recv(fd: int) -> dict | None:
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


def _send(fd: int, msg: dict) -> None:
    body = json.dumps(msg).encode()
    data = struct.pack(">I", len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    proto_in, proto_out = 0, os.dup(1)
    devnull = os.open("/dev/null", os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints from libraries must not corrupt the protocol
    os.umask(0o022)
    z = Zygote(cfg)
    try:
        z.preload()
        z.seal()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a start-up failure
        _send(proto_out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    z.serve(proto_in, proto_out)


if __name__ == "__main__":
    main()
