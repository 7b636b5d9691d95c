"""What the bench suites share besides timing: the device they run on, XLA's memory figures, a
random MLM batch, the run header, Markdown tables, plots and the `<out>/<name>.{json,md,png}`
outputs.

Memory: XLA's compiled `memory_analysis()` (arguments + outputs + temporaries, what the program
needs on any backend, CPU included) for our cases; on GPU also the device's `peak_bytes_in_use`
(process-wide peak so far). transformers' memory is an estimate from its tensor sizes (torch has no
CPU allocator statistics) and only decides what is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from xformers_jax.bench import timing

GIB = 2**30
DEFAULT_N = 5
# Memory budget (GiB) above which an O(L^2) / full-logit case is skipped instead of run.
MAX_GIB = 8.0


def mlm_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random masked-LM batch: ids `[batch, seq]`, 15% of positions labelled, no padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, (batch, seq)).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.15, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def select_device(device: str | None) -> str:
    """Makes `device` ('cpu' | 'gpu' | 'tpu') jax's backend; returns the platform in use.

    Before jax initialises its backends this restricts jax to that platform (so kernels pick
    their per-backend defaults for it); afterwards it makes a device of that platform the default.

    Raises:
      config_lib.UserError: no such backend on this machine.
    """
    if device is None:
        return jax.default_backend()
    from xformers_jax.config_lib import UserError

    jax.config.update("jax_platforms", device)  # no effect once backends are initialised
    try:
        devices = jax.devices(device)
    except RuntimeError as e:
        raise UserError(f"--device {device}: no {device} backend on this machine ({e})") from e
    jax.config.update("jax_default_device", devices[0])
    return devices[0].platform


def device() -> jax.Device:
    """The device the suites run on (`select_device`'s choice, else jax's default)."""
    return jax.config.jax_default_device or jax.devices()[0]


def xla_bytes(compiled: Any) -> int:
    """Arguments + outputs + temporaries of a compiled XLA program (aliased buffers once)."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def skip_note(nbytes: float) -> str:
    """What a case over the memory budget reports instead of its time."""
    return f"skipped: would need {nbytes / GIB:.1f} GiB"


def fmt(x: float | None, spec: str = ".1f", missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def gib(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / GIB:.2f}"


def table(header: str, rows: Iterable[str]) -> list[str]:
    """A Markdown table's lines from its header and rows, cells joined by `" | "`."""
    rule = " | ".join(["---"] * (header.count(" | ") + 1))
    return [f"| {line} |" for line in (header, rule, *rows)]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def write_outputs(
    out_dir: str | None, name: str, res: dict[str, Any], markdown: str, plot: Callable
) -> None:
    """Writes `<out_dir>/<name>.json`, `.md` (the table `markdown`) and `.png` (`plot(res,
    path)`); `out_dir` defaults to `bench_out`."""
    out_dir = out_dir or "bench_out"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    plot(res, os.path.join(out_dir, f"{name}.png"))


@dataclasses.dataclass(frozen=True)
class Suite:
    """A suite that `run_and_write` runs: `run(n, dtype)` returns its results, `markdown(res)`
    their table and `plot(res, path)` their figure."""

    name: str
    run: Callable[[int, str], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    plot: Callable[[dict[str, Any], str], None]
    torch_threads: int | None = None  # transformers' intra-op threads (None: all cores)


def header(suite: str, n: int, dtype: str, device_name: str | None) -> dict[str, Any]:
    """The fields every suite's results start with, the reproducing command among them."""
    import torch

    cmd = ["xformers-jax", "bench", "--suite", suite, "--n", str(n), "--dtype", dtype]
    if device_name:
        cmd += ["--device", device_name]
    return {
        "suite": suite,
        "command": shlex.join(cmd + ["--out", "DIR"]),
        "device": device().device_kind,
        "backend": device().platform,
        "dtype": dtype,
        "n": n,
        "torch_threads": torch.get_num_threads(),
        "memory_budget_gib": MAX_GIB,
        "slow_s": timing.SLOW_S,
    }


def device_line(res: dict[str, Any]) -> str:
    """The first line of a suite's Markdown: where and how it ran, and how to reproduce it."""
    return (
        f"Device: {res['device']} ({res['backend']}), dtype {res['dtype']}, torch threads "
        f"{res['torch_threads']}; median of {res['n']} after warm-up (cases over "
        f"{res['slow_s']:g} s: 1 run); memory budget {res['memory_budget_gib']:g} GiB. "
        f"Reproduce: `{res['command']}`."
    )


def run_and_write(
    suite: Suite,
    out_dir: str | None = None,
    n: int = DEFAULT_N,
    dtype: str = "float32",
    device_name: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs `suite`, prints its table and writes `<out>/<suite>.{json,md,png}`.

    Args:
      suite: what to run and how to show it.
      out_dir: output directory (default `bench_out`).
      n: timed rounds per case (median).
      dtype: compute dtype, `'float32'` or `'bfloat16'`.
      device_name: the `--device` it was asked for (recorded in the reproduce command).
      command: the command that reproduces this run, if not `xformers-jax bench ...`.

    Returns:
      The JSON-able results.
    """
    import torch

    torch.set_num_threads(suite.torch_threads or os.cpu_count() or 1)
    res = header(suite.name, n, dtype, device_name)
    if command:
        res["command"] = command
    res.update(suite.run(n, dtype))
    markdown = suite.markdown(res)
    print(markdown, flush=True)
    write_outputs(out_dir, suite.name, res, markdown, suite.plot)
    return res
