"""`xformers-jax bench --suite flops`: XLA's FLOPs of each pretraining preset's step next to the
analytic count (`flops.py`).

Each row lowers the preset's train step for the devices of a described v5p topology (libtpu,
no TPU needed) in its cost-only variant (`compile.unrolled_config`: layers unrolled, the batch at
once, no remat, the loss unchunked) and runs XLA's HLO cost analysis on it, the global step
before partitioning (`compile.unrolled_flops`). Lowering only, no compile: seconds for the tiny
presets, under a minute for most large ones. A row may set a smaller global batch than the
preset's (XLNet's: its batch-sized `perm_mask` init is captured as a multi-GB constant); FLOPs
are linear in the batch, so the ratio is the preset's.

Writes `flops.json` and `flops.md` into the output directory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

# (config, preset, topology, global batch or None for the preset's).
ROWS: tuple[tuple[str, str, str, int | None], ...] = (
    ("xlm_roberta/pretrain_mlm.py", "tiny", "v5p-8", None),
    ("xlm_roberta/pretrain_mlm.py", "base", "v5p-8", None),
    ("xlm_roberta/pretrain_mlm.py", "large", "v5p-8", None),
    ("xlnet/pretrain_plm.py", "tiny", "v5p-8", None),
    ("xlnet/pretrain_plm.py", "base", "v5p-8", 64),
    ("xlnet/pretrain_plm.py", "large", "v5p-64", 64),
    ("yoso/pretrain_mlm.py", "tiny", "v5p-8", None),
    ("yoso/pretrain_mlm.py", "base", "v5p-8", None),
    ("mt5/pretrain_span.py", "tiny", "v5p-8", None),
    ("mt5/pretrain_span.py", "small", "v5p-8", None),
    ("mt5/pretrain_span.py", "base", "v5p-8", None),
    ("beit/pretrain_mim.py", "tiny", "v5p-8", None),
    ("beit/pretrain_mim.py", "base", "v5p-8", None),
    ("beit/pretrain_mim.py", "large", "v5p-8", None),
)


def row(config_path: str, preset: str, topology: str, batch: int | None) -> dict:
    """One row: XLA's unrolled count, the analytic one and their ratio."""
    from xformers_jax import compile as compile_lib
    from xformers_jax import config_lib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    c = config_lib.load_config(os.path.join(root, "configs", config_path) + ":" + preset)
    if batch is not None:
        with c.unlocked():
            c.train.batch_size = batch
    _, devices = compile_lib.topology_devices(topology)
    mesh = compile_lib.make_mesh(c.mesh, devices)
    t0 = time.perf_counter()
    task, shapes, _, lowered = compile_lib._lower_step(compile_lib.unrolled_config(c), mesh)
    xla, loops = compile_lib.unrolled_flops(lowered)
    analytic = compile_lib.analytic_flops(c, task.model_config, shapes)
    return {
        "config": f"{config_path}:{preset}",
        "family": c.model.family,
        "topology": topology,
        "batch": int(c.train.batch_size),
        "xla_flops": xla,
        "loops_left": loops,
        "analytic_flops": analytic,
        "ratio": xla / analytic if analytic else None,
        "lower_seconds": time.perf_counter() - t0,
    }


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| config | devices of | batch | XLA (unrolled) | analytic | XLA / analytic |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(
            f"| `{r['config']}` | {r['topology']} | {r['batch']} | {r['xla_flops']:.3e} | "
            f"{r['analytic_flops']:.3e} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(out_dir: str | None = None, families: Sequence[str] | None = None) -> list[dict]:
    """Every row of `ROWS` (only `families`' when given), written as it completes."""
    out_dir = out_dir or "bench_out"
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for spec in ROWS:
        if families and spec[0].split("/")[0] not in families:
            continue
        rows.append(row(*spec))
        r = rows[-1]
        print(f"{r['config']}: XLA {r['xla_flops']:.3e}, analytic {r['analytic_flops']:.3e} "
              f"({r['lower_seconds']:.0f} s)", flush=True)  # fmt: skip
        with open(os.path.join(out_dir, "flops.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out_dir, "flops.md"), "w") as f:
            f.write(table(rows))
    return rows
