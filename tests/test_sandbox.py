"""Adversarial and functional tests of qmath_jax.sandbox.

Two pools: `pool` with every layer (audit hook included), and `raw` with the audit hook off,
so the OS layers (namespaces, uid drop, rlimits, read-only file system) are shown to hold on
their own. Every case must end within its limit while this process keeps running.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import sympy

from qmath_jax import sandbox
from qmath_jax.sandbox import SandboxPool

pytestmark = pytest.mark.timeout(120)

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2, timeout_s=5.0) as p:
        yield p


@pytest.fixture(scope="module")
def raw():
    with SandboxPool(1, timeout_s=5.0, audit=False) as p:
        yield p


def _procs_named(comm: str) -> list[int]:
    """Host pids whose command name is `comm` (sandboxed processes are visible from here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _assert_none_survive(comm: str, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while _procs_named(comm):
        assert time.monotonic() < deadline, f"processes named {comm} survived the sandbox"
        time.sleep(0.05)


# ---- normal math code -------------------------------------------------------------------------


def test_sympy_solve_matches_sympy_here(pool):
    x = sympy.Symbol("x")
    expected = str(sympy.solve(x**2 - 5 * x + 6, x))
    r = pool.run("import sympy as sp\nx = sp.Symbol('x')\nprint(sp.solve(x**2 - 5*x + 6, x))")
    assert (r.stdout, r.error, r.ok) == (expected + "\n", "", True)


def test_fractions_and_prints(pool):
    r = pool.run(
        "from fractions import Fraction\nprint(Fraction(1, 3) + Fraction(1, 6))\nprint('ok')"
    )
    assert r.stdout == f"{Fraction(1, 3) + Fraction(1, 6)}\nok\n"


def test_last_bare_expression_is_printed(pool):
    assert pool.run("a = 12\na * (a + 1) // 2").stdout == "78\n"
    assert pool.run("import math\nmath.comb(10, 3)").stdout == f"{120}\n"
    assert pool.run("print('x')").stdout == "x\n"  # print() returns None: nothing extra
    assert pool.run("b = 2").stdout == ""


def test_errors_report_the_last_traceback_line(pool):
    r = pool.run("print('before')\n1 / 0")
    assert r.error == "ZeroDivisionError: division by zero"
    assert r.stdout == "before\n" and not r.ok and not r.timed_out
    assert pool.run("x = (1,").error.startswith("SyntaxError:")
    assert pool.run("undefined_name").error == "NameError: name 'undefined_name' is not defined"


def test_numpy_and_math_available(pool):
    r = pool.run(
        "import numpy as np, math\nprint(round(float(np.linalg.det(np.array([[1, 2], [3, 4]]))), 6), math.isqrt(99))"
    )
    assert r.stdout == "-2.0 9\n"


def test_previous_cells_replayed_silently(pool):
    r = pool.run("print(a * b)", previous_cells=["a = 6\nprint('old output')", "b = 7\nb"])
    assert r.stdout == "42\n"


def test_each_run_is_fresh(pool):
    pool.run("import math\nmath.pi = 3\nopen('note.txt', 'w').write('hi')\nG = 1")
    r = pool.run("import math, os\nprint(math.pi > 3, os.listdir('.'), 'G' in globals())")
    assert r.stdout == "True [] False\n"


def test_scratch_directory_is_writable(pool):
    r = pool.run("open('a.txt', 'w').write('hello')\nprint(open('a.txt').read())")
    assert r.stdout == "hello\n" and r.ok


def test_map_keeps_order(pool):
    results = pool.map([f"print({i} ** 2)" for i in range(7)])
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(7)]


def test_module_level_run():
    r = sandbox.run("print(6 * 7)")
    assert r.stdout == "42\n"


def test_bad_arguments_are_refused(pool):
    with pytest.raises(TypeError, match="code must be a str"):
        pool.run(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        pool.run("1", timeout_s=0)
    with pytest.raises(ValueError, match="previous_cells has 1 entries"):
        pool.map(["1", "2"], previous_cells=[[]])


# ---- containment ------------------------------------------------------------------------------


def test_isolation_layers_present(pool):
    iso = pool.isolation
    if not ROOT:
        pytest.skip("namespaces and the uid drop need root")
    assert iso["netns"] and iso["pidns"] and iso["mountns"] and iso["uid"] == 65534
    r = pool.run("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid())")
    assert r.stdout == "65534 65534 [] 1\n"


def test_infinite_loop_times_out(pool):
    t0 = time.monotonic()
    r = pool.run("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and r.error.startswith("TimeoutError")
    assert time.monotonic() - t0 < 4.0
    assert pool.run("print(1)").stdout == "1\n"


def test_sleep_times_out_on_wall_clock(pool):
    r = pool.run("import time\ntime.sleep(100)", timeout_s=1.0)
    assert r.timed_out and r.duration_s < 3.0


def test_bounded_fork_is_contained(raw):
    # A small, bounded number of processes first: shows where they run and that they die.
    marker = "qmf" + secrets.token_hex(4)
    code = f"""
import ctypes, os, resource, time
ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)  # PR_SET_NAME
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
print(len(kids), os.getuid(), os.getpid(), resource.getrlimit(resource.RLIMIT_NPROC)[0])
"""
    r = raw.run(code, timeout_s=5.0)
    expected = ["3", "65534", "1"] if ROOT else ["3"]
    assert r.stdout.split()[: len(expected)] == expected, r
    assert int(r.stdout.split()[3]) <= 64
    _assert_none_survive(marker)


def test_fork_bomb_is_contained(raw):
    marker = "qmb" + secrets.token_hex(4)
    code = f"""
import ctypes, os
ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)  # PR_SET_NAME
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    t0 = time.monotonic()
    r = raw.run(code, timeout_s=2.0)
    assert r.timed_out and time.monotonic() - t0 < 6.0
    _assert_none_survive(marker)
    assert raw.run("print('alive')").stdout == "alive\n"


def test_fork_is_refused_by_the_audit_hook(pool):
    r = pool.run("import os\nos.fork()")
    assert r.violation and "starting a process" in r.violation_reason


def test_memory_bomb(pool):
    r = pool.run("x = bytearray(8 * 2**30)", memory_mb=256)
    assert r.memory_exceeded and r.error.startswith("MemoryError")
    r = pool.run("import numpy as np\na = np.ones(2 * 10**9)", memory_mb=256)
    assert r.memory_exceeded
    r = pool.run("chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))", memory_mb=256)
    assert r.memory_exceeded and not r.timed_out


def test_deep_recursion(pool):
    r = pool.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.error.startswith("RecursionError: maximum recursion depth exceeded")
    # With the guard lifted the C stack overflows: the process dies, we report it, we go on.
    code = "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return list(map(f, [n + 1]))\nf(0)"
    r = pool.run(code)
    assert r.error == "ProcessCrash: killed by signal SIGSEGV" and not r.timed_out
    assert pool.run("print(2)").stdout == "2\n"


def test_huge_output_is_capped(pool):
    r = pool.run("print('x' * 10**7)")
    assert r.stdout_truncated and r.stdout.startswith("x" * 4096)
    assert len(r.stdout) < 4096 + 200 and "10000001 bytes" in r.stdout
    r = pool.run("while True:\n    print('y' * 1000)", timeout_s=1.0)
    assert r.timed_out and r.stdout_truncated and len(r.stdout) < 4096 + 200


def _probe_paths() -> list[Path]:
    """World-writable host directories outside the sandbox's private /tmp."""
    return [
        Path(d) / f"qmath_probe_{secrets.token_hex(4)}"
        for d in ("/var/tmp", "/dev/shm")
        if os.path.isdir(d)
    ]


def test_writes_outside_scratch_do_not_land(pool, raw, tmp_path):
    outside = Path("/var/tmp" if os.path.isdir("/var/tmp") else "/") / "qmath_escape.txt"
    r = pool.run(f"open({str(outside)!r}, 'w').write('x')")
    assert r.violation and "outside the scratch" in r.violation_reason
    assert not outside.exists()
    # /tmp inside the sandbox is its own scratch tmpfs: the host's /tmp (tmp_path) is unseen.
    target = tmp_path / "escape.txt"
    probes = _probe_paths() + [target, Path("/tmp") / f"qmath_probe_{secrets.token_hex(4)}"]
    code = "import os\n" + "".join(
        f"try:\n    open({str(p)!r}, 'w').write('x')\nexcept OSError as e:\n    print(type(e).__name__)\n"
        for p in probes
    )
    r = raw.run(code)
    assert r.ok, r.error
    for p in probes:
        assert not p.exists(), f"the sandbox wrote {p} on the host"


def test_network_is_unreachable(pool, raw):
    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            received.append(conn.recv(100) or b"<connected>")
            conn.close()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'leak')\nprint('connected')"
    )
    try:
        r = pool.run(code)
        assert r.violation and "network" in r.violation_reason and r.stdout == ""
        r = raw.run(code)
        assert r.error.startswith(("ConnectionRefusedError", "OSError")), r.error
        assert r.stdout == ""
        # The listener is reachable from here, so its silence means the sandbox was cut off.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"self")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert received == [b"self"]


def test_signalling_parent_and_test_process(pool, raw):
    me = os.getpid()
    for p in (pool, raw):
        r = p.run(
            f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({me}, signal.SIGKILL)"
        )
        assert not r.ok
    assert pool.run(f"import os\nos.kill({me}, 9)").violation
    r = raw.run(f"import os\nos.kill({me}, 9)")
    assert r.error.startswith(("ProcessLookupError", "PermissionError")), r.error
    os.kill(me, 0)  # still here
    assert raw.run("print('fine')").stdout == "fine\n"


def test_os_exit(pool):
    r = pool.run("import os\nprint('before', flush=True)\nos._exit(3)")
    assert (
        r.stdout == "before\n"
        and r.error == "ProcessExit: the code ended the process with status 3"
    )
    assert pool.run("print(3)").stdout == "3\n"


def test_shell_is_refused_or_jailed(pool, raw):
    r = pool.run(
        "import subprocess\nprint(subprocess.run(['sh', '-c', 'echo hi'], capture_output=True).stdout)"
    )
    assert r.violation and "starting a process" in r.violation_reason
    assert pool.run("import os\nos.system('echo hi')").violation
    if ROOT:
        r = raw.run(
            "import subprocess\nprint(subprocess.run(['id', '-u'], capture_output=True, text=True).stdout.strip())"
        )
        assert r.stdout == "65534\n", r


def test_environment_secrets_not_visible(monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("QMATH_FAKE_SECRET", secret)
    me = os.getpid()
    code = f"""
import os
print(dict(os.environ))
for path in ('/proc/self/environ', '/proc/1/environ', '/proc/{me}/environ'):
    try:
        print(open(path, 'rb').read())
    except OSError as e:
        print(type(e).__name__)
"""
    with SandboxPool(1) as p:
        r = p.run(code)
    assert r.ok and "QMATH_FAKE_SECRET" not in r.stdout and secret not in r.stdout
    assert "HOME" in r.stdout  # the environment was printed, it just holds no secrets


def test_daemon_does_not_survive(raw):
    marker = "qmd" + secrets.token_hex(4)
    code = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        import ctypes
        ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)  # PR_SET_NAME
        time.sleep(60)
    os._exit(0)
time.sleep(0.3)
print('spawned')
"""
    t0 = time.monotonic()
    r = raw.run(code, timeout_s=5.0)
    assert r.stdout == "spawned\n" and time.monotonic() - t0 < 3.0
    _assert_none_survive(marker)


def test_parent_unharmed_after_everything(pool):
    os.kill(os.getpid(), 0)
    assert pool.run("print(sum(range(10)))").stdout == "45\n"


def test_fallback_without_namespaces():
    # Hosts that refuse namespaces still get rlimits, the uid drop, the audit hook and a
    # private scratch directory that is removed afterwards.
    with SandboxPool(1, namespaces=False) as p:
        assert not p.isolation["netns"] and not p.isolation["pidns"]
        r = p.run(
            "import os, sympy\nopen('f.txt', 'w').write('x')\nprint(os.getcwd(), sympy.sqrt(8))"
        )
        scratch, value = r.stdout.split()
        assert value == "2*sqrt(2)" and not os.path.exists(scratch)
        assert p.run("open('/etc/qmath_escape', 'w')").violation
        assert p.run("while True:\n    pass", timeout_s=1.0).timed_out
