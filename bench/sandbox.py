"""Sandbox throughput: executions per second of short snippets.

Ours: `SandboxPool(n).map(snippets)` (warm workers, one jailed fork per snippet).
Peer: a fresh `python -c SNIPPET` subprocess per snippet, `n` at a time, in the same run.
Both use n = the number of CPU cores. Prints JSON lines; the last one is
{"ours": ..., "peer": ..., "ratio": ...} for plain-Python snippets (the peer's best case: no
heavy imports). A second line reports snippets that use sympy, as TIR code usually does.

Run: python bench/sandbox.py [--n_ours 400] [--n_peer 60]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from qmath_jax.sandbox import SandboxPool

PLAIN = [
    "print(sum(i * i for i in range({k})))",
    "from fractions import Fraction\nprint(Fraction({k}, 7) + Fraction(1, 3))",
    "import math\nprint(math.comb({k}, 3))",
    "x = {k}\nprint(x ** 3 - 2 * x)",
]
SYMPY = [
    "import sympy as sp\nx = sp.Symbol('x')\nprint(sp.solve(x**2 - {k}*x + 6, x))",
    "import sympy as sp\nprint(sp.factorint({k} * 360))",
    "import sympy as sp\nx = sp.Symbol('x')\nprint(sp.integrate(x**{k} + 1, (x, 0, 1)))",
]


def snippets(templates: list[str], n: int) -> list[str]:
    return [templates[i % len(templates)].format(k=i % 50 + 7) for i in range(n)]


def expected_outputs(codes: list[str]) -> list[str]:
    """Reference outputs, computed by plain exec in this process (trusted snippets)."""
    import contextlib
    import io

    outs = []
    for code in codes:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(code, {})  # noqa: S102 - the benchmark's own fixed snippets
        outs.append(buf.getvalue())
    return outs


def rate_ours(pool: SandboxPool, codes: list[str]) -> float:
    pool.map(codes[: pool.size * 2])  # warm the request path
    t0 = time.perf_counter()
    results = pool.map(codes)
    elapsed = time.perf_counter() - t0
    got = [r.stdout for r in results]
    if got != expected_outputs(codes):
        raise SystemExit("sandbox outputs differ from the reference outputs")
    return len(codes) / elapsed


def rate_peer(codes: list[str], workers: int) -> float:
    def one(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True)  # fmt: skip
        return proc.stdout

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        got = list(ex.map(one, codes))
    elapsed = time.perf_counter() - t0
    if got != expected_outputs(codes):
        raise SystemExit("peer outputs differ from the reference outputs")
    return len(codes) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n_ours", type=int, default=400)
    ap.add_argument("--n_peer", type=int, default=60)
    args = ap.parse_args()
    n = os.cpu_count() or 2
    t0 = time.perf_counter()
    with SandboxPool(n) as pool:
        start_s = time.perf_counter() - t0
        print(json.dumps({"event": "pool_started", "workers": n, "seconds": round(start_s, 2),
                          "isolation": pool.isolation}))  # fmt: skip
        rows = {}
        for name, templates in (("sympy", SYMPY), ("plain", PLAIN)):
            ours = rate_ours(pool, snippets(templates, args.n_ours))
            peer = rate_peer(snippets(templates, args.n_peer), n)
            rows[name] = {"ours": round(ours, 1), "peer": round(peer, 1),
                          "ratio": round(ours / peer, 2)}  # fmt: skip
            print(json.dumps({"case": name, "unit": "executions/s", "workers": n, **rows[name]}))
    print(json.dumps({**rows["plain"], "unit": "executions/s", "case": "plain", "workers": n}))


if __name__ == "__main__":
    main()
