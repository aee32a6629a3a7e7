"""Run metrics: metrics.jsonl, TensorBoard events, a progress bar, PNG plots at the end."""

from __future__ import annotations

import json
import os

import jax
from tqdm.auto import tqdm


class MetricsLogger:
    """Appends {"step", "stage", ...} rows to workdir/metrics.jsonl and TensorBoard events.

    Only process 0 writes, so a multi-host run keeps one copy.
    """

    def __init__(self, workdir: str, stage: str):
        self.workdir, self.stage = workdir, stage
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._writer = None
        self._active = jax.process_index() == 0

    def _tb(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.workdir, "tensorboard", self.stage))
        return self._writer

    def write(self, step: int, record: dict) -> None:
        if not self._active:
            return
        row = {"step": int(step), "stage": self.stage, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        writer = self._tb()
        for key, value in record.items():
            if isinstance(value, int | float):
                writer.add_scalar(f"{self.stage}/{key}", value, step)
        writer.flush()

    def plot(self) -> list[str]:
        """PNG curves of this stage's metrics in workdir/plots/; returns the file paths."""
        if not self._active or not os.path.exists(self.path):
            return []
        return plot_metrics(self.path, os.path.join(self.workdir, "plots"), stage=self.stage)


def read_metrics(path: str, stage: str | None = None) -> list[dict]:
    with open(path) as f:
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
    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(stage or "run")
    fig.tight_layout()
    out = os.path.join(out_dir, f"{stage or 'run'}.png")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return [out]


def progress(start: int, total: int, stage: str):
    return tqdm(total=total, initial=start, desc=stage, disable=jax.process_index() != 0,
                dynamic_ncols=True, leave=False)
