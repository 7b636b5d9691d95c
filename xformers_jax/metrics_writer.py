"""Where training metrics go: `metrics.jsonl`, TensorBoard scalars, a progress bar, `loss.png`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


class MetricWriter:
    """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` (train and eval rows,
    told apart by `split`), mirrors them to TensorBoard under `<workdir>/tb`, and plots the loss
    curves into `<workdir>/loss.png`. Only the main host writes (`enabled`)."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def _write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        row = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()

    def write_train(self, step: int, metrics: dict[str, float]) -> None:
        self._write("train", step, metrics)

    def write_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write("eval", step, metrics)

    def progress(self, start: int, total: int, *, enabled: bool = True):
        """A tqdm bar over steps (stderr); a no-op off the main host or when disabled."""
        if not (self.enabled and enabled):
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
            file=sys.stderr, mininterval=1.0,
        )  # fmt: skip

    def plot(self) -> str | None:
        """Writes `loss.png` (train and eval loss vs step) from the whole `metrics.jsonl`."""
        if not self.enabled or not os.path.exists(self.path):
            return None
        return plot_loss(self.path, os.path.join(self.workdir, "loss.png"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_loss(metrics_path: str, out_path: str) -> str:
    """Plots the `loss` of train and eval rows in a metrics.jsonl; returns `out_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = sorted((r["step"], r["loss"]) for r in rows if r["split"] == split and "loss" in r)
        if pts:
            ax.plot(*zip(*pts), style, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
