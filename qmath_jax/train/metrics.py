"""Run metrics: metrics.jsonl, TensorBoard events, a progress bar, PNG plots at the end."""

from __future__ import annotations

import io
import json
import os
import time

import jax
from tqdm.auto import tqdm

from qmath_jax import fileio

REMOTE_FLUSH_EVERY_S = 30.0


class MetricsLogger:
    """Appends {"step", "stage", ...} rows to workdir/metrics.jsonl and TensorBoard events.

    Only process 0 writes, so a multi-host run keeps one copy. A local workdir gets each
    row as it comes; a bucket gets them in batches (every `flush_every_s`, and at every
    `flush()`, which the trainer calls with each checkpoint), since every append there
    costs requests and a re-upload of the event file.
    """

    def __init__(self, workdir: str, stage: str, flush_every_s: float | None = None):
        self.workdir, self.stage = workdir, stage
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._writer = None
        self._active = jax.process_index() == 0
        if flush_every_s is None:
            flush_every_s = REMOTE_FLUSH_EVERY_S if fileio.is_remote(workdir) else 0.0
        self.flush_every_s = flush_every_s
        self._pending: list[str] = []
        self._last_flush = time.monotonic()

    def _tb(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.workdir, "tensorboard", self.stage))
        return self._writer

    def write(self, step: int, record: dict) -> None:
        if not self._active:
            return
        row = {"step": int(step), "stage": self.stage, **record}
        self._pending.append(json.dumps(row) + "\n")
        writer = self._tb()
        for key, value in record.items():
            if isinstance(value, int | float):
                writer.add_scalar(f"{self.stage}/{key}", value, step)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Writes the rows held back so far and flushes the TensorBoard events."""
        if not self._active:
            return
        if self._pending:
            fileio.append_text(self.path, "".join(self._pending))
            self._pending = []
        if self._writer is not None:
            self._writer.flush()
        self._last_flush = time.monotonic()

    def plot(self) -> list[str]:
        """PNG curves of this stage's metrics in workdir/plots/; returns the file paths."""
        self.flush()
        if not self._active or not fileio.exists(self.path):
            return []
        return plot_metrics(self.path, os.path.join(self.workdir, "plots"), stage=self.stage)


def read_metrics(path: str, stage: str | None = None) -> list[dict]:
    with fileio.open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def plot_metrics(path: str, out_dir: str, stage: str | None = None,
                 keys=("loss", "accuracy", "grad_norm", "lr", "reward", "kl",
                       "pair_accuracy", "tokens_per_s")) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path, stage)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return []
    fileio.makedirs(out_dir)
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(stage or "run")
    fig.tight_layout()
    out = os.path.join(out_dir, f"{stage or 'run'}.png")
    png = io.BytesIO()  # matplotlib writes local files only; the bytes go through fileio
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    fileio.write_bytes(out, png.getvalue())
    return [out]


def progress(start: int, total: int, stage: str):
    return tqdm(total=total, initial=start, desc=stage, disable=jax.process_index() != 0,
                dynamic_ncols=True, leave=False)
