"""Runs a Python script in a fresh interpreter and returns what it printed after RESULT.

For tests that need a process of their own (libtpu's lock, a module made unimportable
before JAX loads). The script prints one line "RESULT <payload>".
"""

from __future__ import annotations

import os
import subprocess
import sys


def script_result(script: str, timeout: float, **env: str) -> str:
    """The payload of the script's first RESULT line; fails the test with its stderr if
    it exits non-zero or prints none."""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return lines[0][len("RESULT") :].strip()
