"""`xformers-jax bench`: every bench suite by name, run one after another into one directory.

`train` is `bench.train` (every family's train step vs transformers, `bench.{json,md,png}`);
`yoso` and `mlm_logits` are `bench.scaling`'s, `decoding` is `bench.decoding`'s, each writing
`<suite>.{json,md,png}`; `all` runs train, then every other suite.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from xformers_jax.bench import decoding, harness, scaling

_SUITES = {s.name: s for s in (scaling.YOSO_SUITE, decoding.SUITE, scaling.MLM_SUITE)}
SUITES = tuple(_SUITES)  # besides train


def run_suite(
    suite: str,
    out_dir: str | None = None,
    n: int = harness.DEFAULT_N,
    dtype: str = "float32",
    device: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs the suite named `suite` (one of `SUITES`): `harness.run_and_write`."""
    return harness.run_and_write(_SUITES[suite], out_dir, n, dtype, device, command)


def main(
    suite: str = "train",
    families: Sequence[str] | None = None,
    out_dir: str | None = None,
    n: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    config: str = "default",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`xformers-jax bench`: the train suite (`bench.train.main`) and/or the other suites.

    Args:
      suite: `'train'`, one of `SUITES`, or `'all'` (train, then every other suite).
      families: train-suite families (default all); only with `suite` train or all.
      out_dir: output directory (default `bench_out`).
      n: timed rounds per case (default 10 for train, `harness.DEFAULT_N` otherwise).
      device: `'cpu'`, `'gpu'` or `'tpu'`: the jax backend to run on (default: jax's default).
      dtype: compute dtype, float32 or bfloat16 (float32 params and optimizer state).
      config / overrides: the train suite's named bench config (`bench.train.CONFIGS`) and field
        overrides, e.g. `("xlmr_xl_512", {"layers": 36})`.

    Returns:
      `{suite: results}` for every suite run.

    Raises:
      config_lib.UserError: unknown suite, dtype, bench config or field, `--family` or a bench
        config with a suite other than train only, a device this machine lacks.
    """
    from xformers_jax.config_lib import UserError

    names = ["train", *SUITES] if suite == "all" else [suite]
    unknown = [s for s in names if s not in ("train", "data", "flops") and s not in SUITES]
    if unknown:
        raise UserError(
            f"unknown bench suite {unknown[0]!r}; known: train, {', '.join(SUITES)}, all"
        )
    if families and "train" not in names and suite != "flops":
        raise UserError(f"--family selects train-suite families; suite {suite!r} has none")
    if families and suite == "flops":
        known = sorted({row[0].split("/")[0] for row in importlib.import_module(
            "xformers_jax.bench.flops").ROWS})  # fmt: skip
        bad = [f for f in families if f not in known]
        if bad:
            raise UserError(f"unknown --family {bad[0]!r}; the flops suite has {', '.join(known)}")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if "train" not in names and (config != "default" or overrides):
        raise UserError(
            f"--bench-config / --bench-set configure the train suite; suite {suite!r} has none"
        )
    # Imported by name when it runs: its model builders and optax are not the other suites' cost.
    train = importlib.import_module("xformers_jax.bench.train") if "train" in names else None
    if train is not None:
        train.bench_config(config, overrides)  # a bad name or field fails before any work
    # Ours and the torch reference share an accelerator: jax must not claim 75% of its memory
    # up front (no effect on a CPU, or once jax's backends are up).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    harness.select_device(device)
    results = {}
    for name in names:
        if name == "flops":
            # XLA's FLOPs of each pretraining preset (bench/flops.py): lowerings for libtpu.
            flops = importlib.import_module("xformers_jax.bench.flops")
            results[name] = flops.main(out_dir, families)
        elif name == "data":
            # The input pipeline (bench/data.py): minutes of prepare and short training runs.
            results[name] = importlib.import_module("xformers_jax.bench.data").main(out_dir)
        elif name == "train":
            kw = dict(config=config, dtype=dtype, overrides=overrides)
            if n is not None:
                kw["n"] = n
            results[name] = train.main(list(families) if families else None, out_dir, **kw)
        else:
            results[name] = run_suite(name, out_dir, n or harness.DEFAULT_N, dtype, device)
    return results
