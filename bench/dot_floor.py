"""How long the matrix products of our forward+backward step take on their own.

  python bench/dot_floor.py

Compiles `forward_backward.py`'s step (the bench config, batch 8 x 256, float32), reads
every dot out of the optimised HLO (shapes and dimension numbers as XLA:CPU runs them)
and times those products alone: in one jitted program (XLA:CPU's kernels, YNNPACK for
most), both free to overlap and each waiting for the one before, and with PyTorch's
kernels on the same CPU (the same operands, as `torch.einsum`). It also times the whole
step of both sides, as `forward_backward.py` does, and sets the products against the
foundation issue's goal (1.2x PyTorch's step): `rest_budget_s` is what the goal leaves
for everything else (norms, RoPE, softmax, SwiGLU, the loss and their gradients),
`ours_rest_s` what that takes now. Prints JSON lines; the last is {"ours", "peer",
"ratio"} in seconds of the products alone (ratio = peer / ours, above 1 when XLA's
kernels are the faster).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
import forward_backward as fb
import jax
import numpy as np

from qmath_jax import hf
from qmath_jax.model import get_preset, init_params

GOAL_RATIO = 1.2  # the foundation issue's goal: our step at 1.2x PyTorch's tokens/s

_DOT = re.compile(r"= f32\[[\d,]*\]\S* dot\(%(\S+), %(\S+)\), (.*)")
_DECL = re.compile(r"%(\S+) = f32\[([\d,]*)\]")


def _dims(text: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", text)
    return tuple(int(x) for x in m.group(1).split(",")) if m and m.group(1) else ()


def hlo_dots(hlo_text: str) -> list[tuple]:
    """(lhs shape, rhs shape, contracting dims, batch dims) of every f32 dot in the HLO."""
    dots = []
    for computation in hlo_text.split("\n\n"):
        shapes = {
            m.group(1): tuple(int(x) for x in m.group(2).split(",") if x)
            for m in _DECL.finditer(computation)
        }
        for m in _DOT.finditer(computation):
            lhs, rhs, rest = m.groups()
            contracting = (_dims(rest, "lhs_contracting_dims"), _dims(rest, "rhs_contracting_dims"))
            batch = (_dims(rest, "lhs_batch_dims"), _dims(rest, "rhs_batch_dims"))
            dots.append((shapes[lhs], shapes[rhs], contracting, batch))
    return dots


def dot_flops(dot) -> int:
    lhs, rhs, (_, rhs_c), (_, rhs_b) = dot
    rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_c and i not in rhs_b]
    return 2 * int(np.prod(lhs)) * int(np.prod(rhs_free))


def _operands(dots, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(lhs, np.float32), rng.standard_normal(rhs, np.float32))
        for lhs, rhs, _, _ in dots
    ]


def xla_products(dots, operands, in_order: bool):
    """Every product in one jitted program, each result an output (nothing else runs).

    in_order: each product waits for the one before (as most do in the step, where each
    consumes the last one's result); otherwise XLA:CPU may run independent ones at once.
    """
    specs = [(contracting, batch) for _, _, contracting, batch in dots]

    @jax.jit
    def run(pairs):
        outs = []
        for (a, b), spec in zip(pairs, specs):
            if in_order and outs:
                a, b, _ = jax.lax.optimization_barrier((a, b, outs[-1]))
            outs.append(jax.lax.dot_general(a, b, spec))
        return outs

    pairs = jax.device_put(operands)
    return lambda: jax.block_until_ready(run(pairs))


def _einsum_spec(dot) -> str:
    """The dot_general as an einsum string (batch dims first in the output, as XLA's)."""
    lhs, rhs, (lhs_c, rhs_c), (lhs_b, rhs_b) = dot
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    a = [next(letters) for _ in lhs]
    b = [next(letters) for _ in rhs]
    for i, j in zip(lhs_c + lhs_b, rhs_c + rhs_b):
        b[j] = a[i]
    out = [a[i] for i in lhs_b]
    out += [a[i] for i in range(len(lhs)) if i not in lhs_c and i not in lhs_b]
    out += [b[j] for j in range(len(rhs)) if j not in rhs_c and j not in rhs_b]
    return f"{''.join(a)},{''.join(b)}->{''.join(out)}"


def torch_products(dots, operands, threads: int):
    import torch

    specs = [_einsum_spec(d) for d in dots]
    pairs = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]

    def run():
        torch.set_num_threads(threads)
        with torch.no_grad():
            for (a, b), spec in zip(pairs, specs):
                torch.einsum(spec, a, b)

    return run


def main() -> None:
    common.emit(**common.machine())
    cfg = get_preset("bench")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (fb.BATCH, fb.SEQ), 0, cfg.vocab_size)
    step = jax.jit(jax.value_and_grad(fb.ours_loss(cfg)))
    dots = hlo_dots(step.lower(params, *fb.ours_inputs(tokens)).compile().as_text())
    operands = _operands(dots)
    flops = sum(dot_flops(d) for d in dots)
    peak = common.matmul_peak_flops()
    common.emit(
        metric="products", count=len(dots), gflop=flops / 1e9, matmul_peak_gflops=peak / 1e9
    )

    seconds = {
        "ours_products": common.best_time(xla_products(dots, operands, False), 5, 2),
        "ours_products_in_order": common.best_time(xla_products(dots, operands, True), 5, 2),
    }
    seconds["peer_products"] = min(
        common.best_time(torch_products(dots, operands, t), 5, 2) for t in (1, 2)
    )
    seconds["ours_step"] = common.best_time(fb.ours_step(cfg, params, tokens), 5, 2)
    with tempfile.TemporaryDirectory() as hf_dir:
        hf.save(cfg, params, hf_dir)
        seconds["peer_step"] = common.best_time(fb.peer_step(hf_dir, tokens), 5, 2)
    goal_step = seconds["peer_step"] / GOAL_RATIO
    for name, s in seconds.items():
        common.emit(
            metric=name,
            seconds=s,
            fraction_of_matmul_peak=(flops / s / peak if "products" in name else None),
        )
    common.emit(
        metric="goal",
        goal_step_s=goal_step,
        ours_products_over_goal=seconds["ours_products"] / goal_step,
        # what the goal leaves for everything but the products, and what that takes now
        rest_budget_s=goal_step - seconds["ours_products"],
        ours_rest_s=seconds["ours_step"] - seconds["ours_products"],
    )
    common.emit(
        ours=seconds["ours_products"],
        peer=seconds["peer_products"],
        ratio=seconds["peer_products"] / seconds["ours_products"],
        unit="seconds of the step's products alone",
    )


if __name__ == "__main__":
    common.host_memory_settings()
    main()
