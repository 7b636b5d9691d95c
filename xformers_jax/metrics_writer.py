"""Where training metrics go: `metrics.jsonl`, TensorBoard scalars, a progress bar, `loss.png`.

The workdir may be a gs:// URL. Objects cannot be appended to, so there `metrics.jsonl` is
rewritten whole after every logged step (its earlier rows read back once at start, so a resumed
run keeps them), TensorBoard event files are written to a local staging directory and uploaded
whole after every flush, and `loss.png` is uploaded whole: each is complete in the bucket after
every log interval.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from typing import Any

from xformers_jax import paths


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
        self.workdir = paths.resolve(workdir)
        self.enabled = enabled
        self.path = paths.join(self.workdir, "metrics.jsonl")
        self._remote = paths.is_remote(self.workdir)
        self._rows: list[str] = []
        if enabled and self._remote and paths.exists(self.path):
            self._rows = paths.read_text(self.path).splitlines(keepends=True)
        self._tb = None
        self._tb_stage = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = paths.join(self.workdir, "tb")
            if self._remote:
                self._tb_stage = tempfile.TemporaryDirectory(prefix="tb-")
                tb_dir = self._tb_stage.name
            self._tb = SummaryWriter(tb_dir)

    def _write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        row = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        if self._remote:
            self._rows.append(line)
            paths.write_text(self.path, "".join(self._rows))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()
            if self._tb_stage is not None:
                paths.upload_tree(self._tb_stage.name, paths.join(self.workdir, "tb"))

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
        if not self.enabled or not paths.exists(self.path):
            return None
        return plot_loss(self.path, paths.join(self.workdir, "loss.png"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._tb_stage is not None:
            paths.upload_tree(self._tb_stage.name, paths.join(self.workdir, "tb"))
            self._tb_stage.cleanup()
            self._tb_stage = None


def plot_loss(metrics_path: str, out_path: str) -> str:
    """Plots the `loss` of train and eval rows in a metrics.jsonl; returns `out_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in paths.read_text(metrics_path).splitlines() if line.strip()]
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
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    paths.write_bytes(out_path, png.getvalue())
    return out_path
