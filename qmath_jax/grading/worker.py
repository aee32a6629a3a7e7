"""Entry point of a symbolic-check worker process (started by ``grading.pool``).

Protocol: after its imports the worker writes ``ready``; then, for each JSON request
line ``{"id", "op", "pred", "gold"}`` on stdin, it writes one JSON reply line
``{"id", "ok"}``. It exits when stdin closes (its parent is gone).
"""

from __future__ import annotations

import json
import os
import sys

# Address-space cap: a runaway big-integer power then fails with MemoryError inside
# the worker instead of pushing the whole machine into swap before the deadline.
MEMORY_LIMIT_BYTES = 4 * 1024**3


_WARM_UP = (
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("x^2+2x+1", "(x+1)^{2}"),
    ("2x+2y=4", "x+y=2"),
    ("(1,\\frac{9}{2})", "(1,4.5)"),
    ("4:30", "4:30p"),
)


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # not on every platform; the parent's deadline still bounds the time


def main() -> None:
    """Serves requests until stdin closes."""
    # Replies go to a private copy of stdout; anything a library prints goes to stderr.
    reply_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _limit_memory()
    from qmath_jax.grading import symbolic  # noqa: F401 - import before saying ready
    from qmath_jax.grading.equiv import full_equiv

    # The parsers build their tables on first use (ANTLR's DFA cache, math-verify's
    # grammars): do that now, so that no caller's deadline pays for it.
    for pred, gold in _WARM_UP:
        full_equiv(pred, gold)

    reply_out.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok = bool(full_equiv(request["pred"], request["gold"]))
        except (Exception, RecursionError, MemoryError):  # noqa: BLE001 - never die on input
            ok = False
        reply_out.write(json.dumps({"id": request["id"], "ok": ok}) + "\n")


if __name__ == "__main__":
    main()
