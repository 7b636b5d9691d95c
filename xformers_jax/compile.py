"""Ahead-of-time compile of the train step for a Cloud TPU topology, on a machine without TPUs.

  xformers-jax compile --config configs/xlm_roberta/pretrain_mlm.py:xl --topology v5p-256 \
      [--slices 2] [--config.mesh.fsdp=16 ...] [--out compile.json]

With `libtpu` installed, JAX describes a TPU slice it cannot reach
(`jax.experimental.topologies.get_topology_desc`) and XLA compiles for it on the CPU. The step is
the trainer's own (`train.setup_for_task`: same state shardings, donation, remat, batch shapes and
shardings), traced with the portable backward (`layers.cpu_backward.portable_backward`: the
CPU-tuned custom VJPs are off, as they are on a TPU). The task is built as `train` builds it,
except that its tokenizer is a stand-in of the model's vocabulary size
(`tasks.build_task(..., tokenizer=)`): no data is read, nothing is trained and nothing is
written but `--out`. Only the pretraining tasks are supported (`SHAPE_ONLY`).

Topology names are Cloud TPU accelerator types, `<generation>-<N>`:
  v4-N, v5p-N   N = TensorCores; a chip has 2 (run as one megacore device), so N/2 chips in a 3-D
                torus: 4 chips = 2x2x1, 8 = 2x2x2, 16 = 2x2x4, 32 = 2x4x4, 64 = 4x4x4,
                128 = 4x4x8, 256 = 4x8x8, 512 = 8x8x8 (each doubling doubles the last smallest
                axis). v5p-256 -> "v5p:4x4x8" (128 devices).
  v5e-N (v5litepod-N), v6e-N   N = chips, a 2-D torus: 1 = 1x1, 4 = 2x2, 8 = 2x4, 16 = 4x4,
                32 = 4x8, 64 = 8x8, 128 = 8x16, 256 = 16x16. v5e-256 -> "v5e:16x16".
`--slices K` compiles for K such slices joined by the data-center network (multi-slice). The
config's mesh then describes one slice, and the K slices multiply its `data` axis (a hybrid
ICI x DCN device mesh, `mesh_utils.create_hybrid_device_mesh`): the extra slices are more data
parallelism, the layout MaxText uses for its DCN data axis.

The report: per-device HBM from XLA's memory analysis of the compiled step (arguments = state +
batch, outputs, temporaries, total = their sum less the donated, aliased bytes) against the chip's
HBM (`HBM_GIB`: the topology's devices expose no memory stats), FLOPs per step from XLA's cost
analysis (per device x devices) next to the analytic count
(`flops.py`: 6 x multiply-adds of the matmuls and attention per token), and the compile
time. XLA's cost analysis counts the body of a loop once, so with the layers under `nn.scan` its
figure is about one layer of the stack plus what lies outside it (embeddings, head, optimizer):
far below the analytic count for deep models. The analytic count is the per-step figure to use.
A step that does not fit is a `UserError` (exit 2) of one line naming the GiB it needs and the
chip's HBM.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import importlib
import importlib.util
import json
import math
import os
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from xformers_jax import config_lib, flops, models, paths, sharding, tasks
from xformers_jax.config_lib import UserError

GIB = 2**30

# HBM per device (a chip; v4/v5p megacore) by generation, from the Cloud TPU documentation.
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}

# generation -> (get_topology_desc's prefix, torus rank, TensorCores counted per chip in N)
_GENERATIONS = {
    "v4": ("v4", 3, 2),
    "v5p": ("v5p", 3, 2),
    "v5e": ("v5e", 2, 1),
    "v5litepod": ("v5e", 2, 1),
    "v6e": ("v6e", 2, 1),
}

ACCEPTED = "v4-N, v5p-N (N TensorCores, 8..), v5e-N / v5litepod-N, v6e-N (N chips: 1, 4, 8, ...)"


def topology(name: str) -> tuple[str, str, int]:
    """`"v5p-256"` -> (generation `"v5p"`, `get_topology_desc` name `"v5p:4x4x8"`, chips 128).

    Raises:
      UserError: not an accepted accelerator type (the message lists the accepted forms).
    """
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    bad = UserError(f"unknown topology {name!r}; accepted: {ACCEPTED}")
    if not m:
        raise bad
    prefix, rank, cores = _GENERATIONS[m.group(1)]
    n = int(m.group(2))
    chips = n // cores
    if n % cores or chips < 1 or chips & (chips - 1) or (1 < chips < 4):
        raise bad
    dims = [1] * rank if chips == 1 else [2, 2] + [1] * (rank - 2)
    while math.prod(dims) < chips:
        small = min(dims)
        last = max(i for i, d in enumerate(dims) if d == small)
        dims[last] *= 2
    generation = "v5e" if prefix == "v5e" else m.group(1)
    return generation, f"{prefix}:{'x'.join(map(str, dims))}", chips


def topology_devices(name: str, slices: int = 1) -> tuple[str, list[Any]]:
    """(generation, the devices of `slices` slices of topology `name`), described, not attached."""
    from jax.experimental import topologies

    generation, desc_name, _ = topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            "compile needs libtpu: pip install 'libtpu==0.0.42.1' (the test extra has it)"
        )
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
        # No TPU chips here, so none to guard: let several compiles (tests, other shells) load
        # libtpu at once instead of failing on its one-process lockfile.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if slices < 1:
        raise UserError(f"--slices must be >= 1, got {slices}")
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if generation == "v4" else {}
    if slices > 1:
        kwargs["num_slices"] = slices
    try:
        desc = topologies.get_topology_desc(topology_name=desc_name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu's own message, e.g. a shape it does not know
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"cannot describe topology {name} ({desc_name}): {msg}") from None
    return generation, list(desc.devices)


def make_mesh(mesh_cfg: Any, devices: list[Any], slices: int = 1) -> Mesh:
    """The trainer's `('data', 'fsdp', 'tensor')` mesh over `devices`; with several slices the
    config's mesh is one slice's and the slices multiply `data` (over the DCN).

    Raises:
      UserError: the config's mesh does not fit the topology's devices.
    """
    per_slice = len(devices) // slices
    try:
        sharding.mesh_shape(mesh_cfg, per_slice)
    except ValueError as e:
        raise UserError(f"a {per_slice}-device slice cannot hold the config's mesh: {e}") from None
    cfg = {a: mesh_cfg[a] for a in sharding.MESH_AXES} | {"dcn_data": slices}
    try:
        return sharding.make_mesh(cfg, devices)
    except ValueError as e:
        raise UserError(f"cannot lay the config's mesh over {slices} slices: {e}") from None


# ------------------------------------------------------------------------ the task, data-free


class _ShapeOnlyTokenizer:
    """Stands in for a run's tokenizer where building a task reads only its size and ids."""

    def __init__(self, model_cfg: Any):
        self.vocab_size = int(model_cfg.vocab_size)
        self.pad_id = int(getattr(model_cfg, "pad_token_id", 0) or 0)
        self.eos_id = int(getattr(model_cfg, "eos_token_id", 1) or 1)
        self.path = "<shape only>"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ShapeOnlyTokenizer({self.vocab_size})"


def _stand_in(config) -> _ShapeOnlyTokenizer:
    return _ShapeOnlyTokenizer(models.build_model(config.model, task=config.task)[1])


# The tasks whose `build` takes a stand-in tokenizer (`tasks.build_task(..., tokenizer=)`).
SHAPE_ONLY = ("mlm", "plm", "span_corruption", "mim")


def build_task_shape_only(config) -> tasks.TaskSpec:
    """The `TaskSpec` `train` builds for `config`, with a stand-in tokenizer (no data read)."""
    if config.task not in SHAPE_ONLY:
        raise UserError(
            f"compile supports the pretraining tasks {', '.join(SHAPE_ONLY)}; got {config.task!r}"
        )
    tok = _stand_in(config)
    with tempfile.TemporaryDirectory() as workdir:
        # MIM takes its (train, eval) visual tokenizers as a pair.
        return tasks.build_task(
            config, workdir, tokenizer=(tok, tok) if config.task == "mim" else tok
        )


# ---------------------------------------------------------------------------------- FLOPs


def analytic_flops(config, model_cfg: Any, batch: dict[str, Any]) -> float | None:
    """The analytic FLOPs of one train step for this family and batch (None for a
    family it has no formula for)."""
    family = config.model.family
    c = model_cfg
    if family in ("xlm_roberta", "yoso"):  # YOSO: counted as if its attention were softmax's
        b, s = batch["input_ids"].shape
        dims = dict(
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            layers=c.num_hidden_layers,
            vocab=c.vocab_size,
            seq=s,
            batch=b,
        )
        max_pred = int(config.data.get("max_predictions", 0) or 0)
        if 0 < max_pred < s:  # the LM head runs on the masked positions only
            dims["head_seq"] = max_pred
        return flops.text_flops(dims)
    if family == "xlnet":
        b, s = batch["input_ids"].shape
        dims = dict(
            hidden=c.d_model, ffn=c.d_inner, layers=c.n_layer, vocab=c.vocab_size, seq=s, batch=b
        )
        if getattr(c, "use_mems_train", False) and c.mem_len:
            dims["mem"] = c.mem_len
        if "target_mapping" in batch:
            dims["predict"] = batch["target_mapping"].shape[1]
        dims["bi_data"] = bool(c.bi_data)
        return flops.xlnet_flops(dims)
    if family == "mt5":
        b, s = batch["input_ids"].shape
        dims = dict(
            hidden=c.d_model,
            ffn=c.d_ff,
            layers=c.num_layers,
            vocab=c.vocab_size,
            seq=s,
            batch=b,
            decoder_len=batch["labels"].shape[1],
            inner=c.num_heads * c.d_kv,
        )
        return flops.mt5_flops(dims)
    if family == "beit":
        dims = dict(
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            layers=c.num_hidden_layers,
            image_size=c.image_size,
            patch_size=c.patch_size,
            batch=batch["pixel_values"].shape[0],
        )
        if "bool_masked_pos" in batch:  # MIM: the visual-token head on every patch
            dims["head_vocab"] = c.vocab_size
        return flops.beit_flops(dims)
    return None


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return dict(cost or {})


def _xla_flops(compiled) -> float:
    flops = float(_cost(compiled).get("flops", 0.0))
    return flops if math.isfinite(flops) else 0.0


def _step_seconds_estimate(compiled) -> float | None:
    """XLA's own estimate of the step's seconds on the target, where its cost analysis has one
    (`optimal_seconds`: a roofline from FLOPs and bytes; not a measurement)."""
    v = _cost(compiled).get("optimal_seconds")
    return float(v) if v is not None and math.isfinite(float(v)) and float(v) > 0 else None


def unrolled_config(config):
    """`config` for a cost-only lowering of the step's model FLOPs, with no loops left.

    XLA's cost analysis counts a loop body once, so the compiled step's FLOPs hold one layer of
    each scanned stack (and one micro-batch, one vocabulary chunk). Here the layers are unrolled
    (`model.scan_unroll` beyond the layer count), the batch runs at once
    (`optim.grad_accum_steps=1`: FLOPs are linear in the rows) and the loss unchunked
    (`loss.vocab_chunk_size=0`), attention is einsum (a flash kernel is a custom call whose FLOPs
    XLA's cost analysis does not see), and nothing is rematerialised (`model.remat_policy='none'`):
    the count is the model FLOPs of the whole step, what the analytic count and MFU measure.
    Remat's recomputation (one more forward pass with `full`) is on top of it on the device.
    """
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.model.scan_unroll = 1 << 20
        cfg.model.remat_policy = "none"
        cfg.optim.grad_accum_steps = 1
        if "attention_kernel" in cfg.model:  # a Pallas kernel's FLOPs are hidden from XLA
            cfg.model.attention_kernel = "einsum"
        if "loss" in cfg and "vocab_chunk_size" in cfg.loss:
            cfg.loss.vocab_chunk_size = 0
    return cfg


def unrolled_flops(lowered) -> tuple[float, bool]:
    """(FLOPs, loops left) of a lowered step from XLA's HLO cost analysis, before partitioning
    (the global step, not one device's) and before optimisation, run by the host CPU's XLA (the
    TPU client of a described topology offers none before compiling). `loops left`: the module
    still has a `while` (e.g. the vocabulary-chunked loss), whose body counts once."""
    from jax._src.lib import _jax

    module = lowered._lowering.hlo().as_hlo_module()
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    loops = "stablehlo.while" in lowered.as_text()
    return float(cost.get("flops", 0.0)), loops


# -------------------------------------------------------------------------------- compile

# XLA:TPU's out-of-memory messages, e.g. "the total memory required for HLO temporaries (5.73T)
# exceeds available HBM (95.74G)" or (older) "Used 120.5G of 95.74G hbm".
_OOM = (
    re.compile(
        r"required for ([\w ,]+?) \(([\d.]+)([KMGT]?)\) exceeds available HBM "
        r"\(([\d.]+)([KMGT]?)\)",
        re.IGNORECASE,
    ),
    re.compile(r"()Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE),
)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _does_not_fit(need: float, hbm: float, name: str, generation: str, what: str = "") -> UserError:
    what = f" ({what})" if what else ""
    return UserError(
        f"the step does not fit {name}: it needs {need / GIB:.1f} GiB per device{what}, a "
        f"{generation} chip has {hbm / GIB:.1f} GiB of HBM"
    )


def _oom_error(text: str, name: str, generation: str, hbm: float) -> UserError:
    """The one-line error of XLA's RESOURCE_EXHAUSTED `text`."""
    for pattern in _OOM:
        m = pattern.search(text)
        if m:
            what, need, need_unit, avail, avail_unit = m.groups()
            need_bytes = float(need) * _UNIT[need_unit.upper()]
            avail_bytes = float(avail) * _UNIT[avail_unit.upper()]
            return _does_not_fit(need_bytes, avail_bytes, name, generation, what and f"XLA: {what}")
    return UserError(
        f"the step does not fit {name} ({generation}: {hbm / GIB:.1f} GiB of HBM per device): "
        + " ".join(text.split())[:300]
    )


def _lower_step(config, mesh):
    """(task, abstract batch, Setup, the train step lowered for `mesh`'s devices)."""
    from xformers_jax import train
    from xformers_jax.layers.cpu_backward import portable_backward

    task = build_task_shape_only(config)
    batch = {
        k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
        for k, v in task.init_batch.items()
    }
    # `init` runs only under eval_shape here and its params do not depend on the batch size:
    # two rows (XLNet's bi_data halves the batch) keep a pod-sized global batch (XLNet's
    # perm_mask: GBs) out of host memory.
    rows = 2 if int(config.train.batch_size) % 2 == 0 else 1
    few = {k: np.asarray(v)[:rows] for k, v in task.init_batch.items()}
    s = train.setup_for_task(config, dataclasses.replace(task, init_batch=few), mesh)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with portable_backward(), sharding.use_mesh(mesh, s.rules):
        lowered = s.train_step.lower(s.abstract_state, batch, rng)
    return task, batch, s, lowered


def compile_step(config, name: str, slices: int = 1, unrolled: bool = True) -> dict[str, Any]:
    """Compiles `config`'s train step for `slices` x topology `name`.

    Args:
      unrolled: also lower a cost-only variant with the layer scans unrolled
        (`unrolled_config`) and count its FLOPs (`unrolled_flops`): the step's whole count, to
        set next to the analytic one. Lowering only (no second compile).

    Returns:
      A dict: `topology`, `slices`, `devices`, `mesh`, `architecture`, `params`, per-device
      `argument_bytes`, `output_bytes`, `alias_bytes`, `temp_bytes`, `total_bytes`, `hbm_bytes`,
      `flops` (XLA's count of the compiled step, per device x devices; a scanned layer stack
      counted once), `flops_per_device`, `xla_flops` (the unrolled variant's count, None without
      `unrolled`), `loops_left` (that variant still has a loop), `analytic_flops`,
      `step_seconds_estimate` (XLA's roofline estimate, None where it gives none),
      `compile_seconds`.

    Raises:
      UserError: unknown topology, a mesh the topology cannot hold, an unsupported task, or a
        step that does not fit the chip's HBM (one line each).
    """
    # The config's own multi-slice setting (`mesh.dcn_data`) when --slices is not given.
    slices = slices if slices > 1 else config_lib.get_opt(config, "mesh.dcn_data", 1)
    generation, devices = topology_devices(name, slices)
    hbm = HBM_GIB[generation] * GIB
    mesh = make_mesh(config.mesh, devices, slices)
    t0 = time.perf_counter()
    task, batch, s, lowered = _lower_step(config, mesh)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA's RESOURCE_EXHAUSTED is a JaxRuntimeError / XlaRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds available hbm" not in text.lower():
            raise
        raise _oom_error(text, name, generation, hbm) from None
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, getattr(mem, "alias_size_in_bytes", 0)
    total = args + outs + temp - alias
    if total > hbm:
        raise _does_not_fit(total, hbm, name, generation)
    per_device = _xla_flops(compiled)
    xla_flops, loops_left = None, None
    if unrolled:
        xla_flops, loops_left = unrolled_flops(_lower_step(unrolled_config(config), mesh)[3])
    return {
        "topology": name,
        "topology_desc": topology(name)[1],
        "slices": slices,
        "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "architecture": task.architecture,
        "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params))),
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "argument_bytes": int(args),
        "output_bytes": int(outs),
        "alias_bytes": int(alias),
        "temp_bytes": int(temp),
        "total_bytes": int(total),
        "hbm_bytes": int(hbm),
        "flops_per_device": per_device,
        "flops": per_device * len(devices),
        "xla_flops": xla_flops,
        "loops_left": loops_left,
        "analytic_flops": analytic_flops(config, task.model_config, batch),
        "step_seconds_estimate": _step_seconds_estimate(compiled),
        "compile_seconds": seconds,
    }


def report(r: dict[str, Any]) -> str:
    """A human-readable summary of `compile_step`'s result."""

    def gib(n: float) -> str:
        return f"{n / GIB:.2f} GiB"

    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f"{r['slices']} x " if r["slices"] > 1 else ""
    analytic, xla = r["analytic_flops"], r.get("xla_flops")
    if xla:
        loops = ", a loop body once" if r.get("loops_left") else ""
        flops = f"{xla:.3e} XLA (layers unrolled{loops}), "
    else:
        flops = f"{r['flops']:.3e} XLA (loop bodies once), "
    counted = xla or r["flops"]
    flops += (
        f"{analytic:.3e} analytic (XLA / analytic {counted / analytic:.3f})"
        if analytic
        else "no analytic count"
    )
    estimate = r.get("step_seconds_estimate")
    share = 100 * r["total_bytes"] / r["hbm_bytes"]
    rows = [
        ("arguments / device", f"{gib(r['argument_bytes'])} (state + batch)"),
        ("outputs / device", f"{gib(r['output_bytes'])} ({gib(r['alias_bytes'])} donated)"),
        ("temporaries / device", gib(r["temp_bytes"])),
        ("total / device", f"{gib(r['total_bytes'])} of {gib(r['hbm_bytes'])} HBM ({share:.0f}%)"),
        ("FLOPs / step", flops),
        (
            "step time",
            f"{estimate * 1e3:.2f} ms (XLA's estimate, not measured)"
            if estimate
            else "no estimate from XLA's cost analysis",
        ),
        ("compile", f"{r['compile_seconds']:.1f} s"),
    ]
    head = (
        f"{r['architecture']}: {r['params'] / 1e9:.3f}B params on {slices}{r['topology']} "
        f"({r['topology_desc']}, {r['devices']} devices), mesh {mesh}"
    )
    return "\n".join([head] + [f"  {k:<21}{v}" for k, v in rows])


def main(
    config, name: str, slices: int = 1, out: str | None = None, unrolled: bool = True
) -> dict[str, Any]:
    """`xformers-jax compile`: compiles, prints the report, writes `out` (JSON, local or gs://)
    if given. `unrolled=False` (`--no-unrolled-flops`) skips the cost-only unrolled lowering
    (minutes and tens of GB of host memory for the largest presets)."""
    result = compile_step(config, name, slices, unrolled=unrolled)
    print(report(result), flush=True)
    if out:
        paths.write_text(out, json.dumps(result, indent=1, sort_keys=True))
    return result
