"""The train suite, `xformers-jax bench [--suite train]`: our jitted train step and forward vs
transformers' PyTorch, in one run.

For each family, a named bench config (`CONFIGS`; the default: hidden 256, 4 layers, 4 heads,
ffn 1024, vocab 32000, batch 8, seq 128, BEiT 224 px patch 16, MT5 decoder length 32) is built
twice -- our Flax module and the transformers PyTorch model with the same config and batch -- and
timed alternately (ours, theirs, ours, ...), median of N after warm-up; each timed call directly
follows an untimed call of the same side (steps back to back, as in a training loop; `timing`).
Our models run their layer scan unrolled (`scan_unroll` = the layer count: 3-10% faster steps
on CPU; transformers' models are Python loops anyway). Reported: ms per train step (AdamW) and
per forward, the ratio ours / reference, model FLOPs per step (analytic, cross-checked with
XLA's cost analysis), MFU against the matmul peak measured in the same run (a large matmul in
the run's dtype on its device), and our compile time. Results go to `<out>/bench.json`,
`<out>/bench.md` and `<out>/bench.png`.

`dtype` bfloat16 computes in bfloat16 with float32 params and optimizer state on both sides
(ours: the configs' `dtype`; transformers: `torch.autocast`). On a GPU the reference runs on the
same GPU when torch has CUDA; otherwise (a TPU, a CPU-only torch) it is left out and only our
figures are reported.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import flops
from xformers_jax.bench import harness, timing

_DEFAULT = dict(hidden=256, layers=4, heads=4, ffn=1024, vocab=32000, batch=8, seq=128)
_DEFAULT.update(decoder_len=32, image_size=224, patch_size=16, num_labels=10)  # MT5's, BEiT's
# The layer shapes of XLM-R-XL (hidden 2560, 32 heads, ffn 10240, the 250,880 vocabulary) and of
# mT5-base (d_model 768, 12 heads x 64, gated ffn 2048, 250,112 vocab, untied LM head).
_XLMR_XL = dict(hidden=2560, heads=32, ffn=10240, vocab=250880, families=("xlm_roberta",))
_MT5_BASE = dict(hidden=768, heads=12, ffn=2048, vocab=250112, families=("mt5",))
CONFIGS: dict[str, dict[str, Any]] = {
    # Every family, CPU-sized: the README's train figures.
    "default": _DEFAULT,
    # XLM-R-XL at seq 512; 8 of its 36 layers and batch 4, so ours and the reference fit on one
    # 80 GB GPU together: 1.28B params, float32 params + AdamW state 14.3 GiB per side; our
    # step's temporaries 18.5 GiB by XLA's memory analysis (30.7 GiB at batch 8).
    "xlmr_xl_512": dict(_DEFAULT, **_XLMR_XL, layers=8, batch=4, seq=512),
    # mT5-base, 12 + 12 layers, encoder 512 / decoder 128 tokens: 0.58B params (6.5 GiB with the
    # AdamW state), our step's temporaries 25.0 GiB by XLA's memory analysis.
    "mt5_base": dict(_DEFAULT, **_MT5_BASE, layers=12, batch=16, seq=512, decoder_len=128),
}


@dataclasses.dataclass
class Case:
    """One family's bench, for a bench config `b` (a `CONFIGS` entry) and a compute dtype:
    builders for both sides and the analytic FLOPs of a train step."""

    family: str
    # (config, dtype) -> module, params, batch, loss_fn
    build_ours: Callable[[dict, str], tuple[Any, Any, dict, Callable]]
    build_torch: Callable[[dict], tuple[Any, dict]]  # model, batch (loss from model(**batch).loss)
    flops_per_step: Callable[[dict], float]


# --------------------------------------------------------------------------------- families


def _encoder_fields(b, dtype: str) -> dict[str, Any]:
    """The config fields XLM-R, YOSO and BEiT name alike: sizes, no dropout, layers unrolled."""
    return dict(
        hidden_size=b["hidden"],
        num_hidden_layers=b["layers"],
        num_attention_heads=b["heads"],
        intermediate_size=b["ffn"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        scan_unroll=b["layers"],
        dtype=dtype,
    )


def _xlmr_config(b, dtype="float32"):
    from xformers_jax.models.xlm_roberta import XLMRobertaConfig

    return XLMRobertaConfig(
        model_type="xlm-roberta-xl",
        vocab_size=b["vocab"],
        max_position_embeddings=b["seq"] + 2,
        **_encoder_fields(b, dtype),
    )


def _mlm_batch(b) -> dict[str, np.ndarray]:
    return harness.mlm_batch(b["batch"], b["seq"], b["vocab"])


def _case(
    family: str,
    make_cfg,
    ours_cls: str,
    torch_cls: str,
    torch_cfg_cls: str,
    batch_fn,
    step_flops: Callable[[dict], float],
) -> Case:
    """A family's case: same config, same batch, HF's loss on both sides."""

    def ours(b, dtype):
        from xformers_jax.models import FAMILIES

        module_cls = FAMILIES[family].head_class(ours_cls)
        module = module_cls(make_cfg(b, dtype))
        batch = batch_fn(b)
        init_kw = {k: v[:1] for k, v in batch.items()}  # labels too: MT5 derives decoder inputs
        params = jax.jit(lambda r: module.init(r, **init_kw)["params"])(jax.random.key(0))
        return module, params, batch, lambda p, x: module.apply({"params": p}, **x).loss

    def reference(b):
        import torch
        import transformers

        cfg = getattr(transformers, torch_cfg_cls)(**make_cfg(b).to_hf_config())
        model = getattr(transformers, torch_cls)(cfg)
        tb = {}
        for k, v in batch_fn(b).items():
            t = torch.from_numpy(v)
            tb[k] = t.long() if v.dtype.kind in "iu" else t
        return model, tb

    return Case(family, ours, reference, step_flops)


def _xlnet_config(b, dtype="float32"):
    from xformers_jax.models.xlnet import XLNetConfig

    return XLNetConfig(
        vocab_size=b["vocab"],
        d_model=b["hidden"],
        n_layer=b["layers"],
        n_head=b["heads"],
        d_inner=b["ffn"],
        dropout=0.0,
        mem_len=None,
        scan_unroll=b["layers"],
        dtype=dtype,
    )


def _lm_batch(b) -> dict[str, np.ndarray]:
    """Causal/permutation LM style: labels are the inputs (XLNet's plain LM loss)."""
    ids = _mlm_batch(b)["input_ids"]
    return {"input_ids": ids, "labels": ids.copy()}


def _yoso_config(b, dtype="float32"):
    from xformers_jax.models.yoso import YosoConfig

    return YosoConfig(
        vocab_size=b["vocab"],
        max_position_embeddings=b["seq"],
        use_expectation=True,
        **_encoder_fields(b, dtype),
    )


def _mt5_config(b, dtype="float32"):
    from xformers_jax.models.mt5 import MT5Config

    return MT5Config(
        vocab_size=b["vocab"],
        d_model=b["hidden"],
        d_kv=b["hidden"] // b["heads"],
        d_ff=b["ffn"],
        num_layers=b["layers"],
        num_heads=b["heads"],
        dropout_rate=0.0,
        scan_unroll=b["layers"],
        dtype=dtype,
    )


def _seq2seq_batch(b) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, b["vocab"], (b["batch"], b["seq"])).astype(np.int32)
    labels = rng.integers(2, b["vocab"], (b["batch"], b["decoder_len"])).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _beit_config(b, dtype="float32"):
    from xformers_jax.models.beit import BeitConfig

    return BeitConfig(
        image_size=b["image_size"],
        patch_size=b["patch_size"],
        num_labels=b["num_labels"],
        drop_path_rate=0.0,
        use_relative_position_bias=True,
        **_encoder_fields(b, dtype),
    )


def _image_batch(b) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n, size = b["batch"], b["image_size"]
    return {
        "pixel_values": rng.standard_normal((n, 3, size, size)).astype(np.float32),
        "labels": rng.integers(0, b["num_labels"], (n,)).astype(np.int32),
    }


CASES: dict[str, Case] = {
    "xlm_roberta": _case(
        "xlm_roberta",
        _xlmr_config,
        "XLMRobertaForMaskedLM",
        "XLMRobertaXLForMaskedLM",
        "XLMRobertaXLConfig",
        _mlm_batch,
        flops.text_flops,
    ),
    "xlnet": _case(
        "xlnet",
        _xlnet_config,
        "XLNetLMHeadModel",
        "XLNetLMHeadModel",
        "XLNetConfig",
        _lm_batch,
        flops.xlnet_flops,
    ),
    "yoso": _case(
        "yoso",
        _yoso_config,
        "YosoForMaskedLM",
        "YosoForMaskedLM",
        "YosoConfig",
        _mlm_batch,
        flops.text_flops,
    ),
    "mt5": _case(
        "mt5",
        _mt5_config,
        "MT5ForConditionalGeneration",
        "MT5ForConditionalGeneration",
        "MT5Config",
        _seq2seq_batch,
        flops.mt5_flops,
    ),
    "beit": _case(
        "beit",
        _beit_config,
        "BeitForImageClassification",
        "BeitForImageClassification",
        "BeitConfig",
        _image_batch,
        flops.beit_flops,
    ),
}


def bench_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The named bench config with `overrides` (e.g. `{"layers": 36}`) applied.

    Raises:
      config_lib.UserError: an unknown name or key, or a value that is not a positive int.
    """
    from xformers_jax.config_lib import UserError

    if name not in CONFIGS:
        raise UserError(f"unknown bench config {name!r}; known: {', '.join(CONFIGS)}")
    b = dict(CONFIGS[name])
    for key, value in (overrides or {}).items():
        if key not in b or key == "families":
            known = ", ".join(k for k in b if k != "families")
            raise UserError(f"bench config {name!r} has no field {key!r}; fields: {known}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"bench config field {key} must be a positive int, got {value!r}")
        b[key] = value
    if b["hidden"] % b["heads"]:
        raise UserError(
            f"bench config: hidden {b['hidden']} is not a multiple of heads {b['heads']}"
        )
    return b


# ------------------------------------------------------------------------------ measuring


def _torch_device() -> str | None:
    """Where the reference runs: the GPU when ours does and torch has CUDA, the CPU when ours
    runs there, else None (no like-for-like reference on this machine)."""
    import torch

    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    return None


def _sync(device: str | None) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_peak(
    dtype: str = "float32", device: str | None = "cpu", reps: int = 10, size: int | None = None
) -> dict[str, float]:
    """Measured matmul FLOP/s of this machine in `dtype`, for jax and torch on `device` (None:
    jax only): the MFU denominator. A `size^3` matmul (default 2048 on a CPU, 8192 on an
    accelerator), the median of `reps` calls (`run` measures it before and after the families
    and keeps the higher, so a slow spell of a shared VM does not inflate every MFU)."""
    import torch

    n = size or (2048 if jax.default_backend() == "cpu" else 8192)

    def flops_per_s(fn: Callable[[], Any]) -> float:
        timer = timing.Timer("matmul", fn)
        timing.alternate([timer], reps, slow_s=math.inf)  # a warm-up call, then `reps` timed
        return 2.0 * n**3 / (timing.median_ms(timer.times) / 1e3)

    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    out = {"jax_flops": flops_per_s(lambda: mm(a).block_until_ready())}
    if device is not None:
        t = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)

        def torch_mm():
            torch.mm(t, t)
            _sync(device)

        out["torch_flops"] = flops_per_s(torch_mm)
    return out


def _torch_calls(
    case: Case, b: dict, dtype: str, device: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The reference's train step (AdamW) and forward on torch `device`, each blocking."""
    import torch

    tmodel, tbatch = case.build_torch(b)
    tmodel = tmodel.to(device)
    tbatch = {k: v.to(device) for k, v in tbatch.items()}
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)
    autocast = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16))
        if dtype == "bfloat16"
        else nullcontext
    )

    def torch_step():
        topt.zero_grad(set_to_none=True)
        with autocast():
            loss = tmodel(**tbatch).loss
        loss.backward()
        topt.step()
        _sync(device)

    def torch_fwd():
        with torch.no_grad(), autocast():
            tmodel(**tbatch).loss.item()

    return torch_step, torch_fwd


def _bench_case(case: Case, b: dict, dtype: str, n: int, device: str | None) -> dict[str, Any]:
    """One family: ours and (on torch `device`, unless None) the reference, timed alternately."""
    module, params, batch, loss_fn = case.build_ours(b, dtype)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def step(p, o, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    fwd = jax.jit(loss_fn)
    fwd(params, batch).block_until_ready()
    state = {"p": params, "o": opt_state}
    del params, opt_state  # donated to the first step

    def ours_step():
        state["p"], state["o"], loss = compiled(state["p"], state["o"], batch)
        loss.block_until_ready()

    def ours_fwd_call():
        fwd(state["p"], batch).block_until_ready()

    calls = {"train": ours_step, "fwd": ours_fwd_call}
    if device is not None:
        calls["ref_train"], calls["ref_fwd"] = _torch_calls(case, b, dtype, device)
    order = [k for k in ("train", "ref_train", "fwd", "ref_fwd") if k in calls]
    timers = [timing.Timer(k, calls[k]) for k in order]
    timing.alternate(timers, n, settle=True, slow_s=math.inf)  # a slow step is timed n times too
    med = {t.name: timing.median_ms(t.times) for t in timers}
    ref = device is not None
    return {
        "family": case.family,
        "train_ms": med["train"],
        "ref_train_ms": med["ref_train"] if ref else None,
        "train_ratio": med["train"] / med["ref_train"] if ref else None,
        "forward_ms": med["fwd"],
        "ref_forward_ms": med["ref_fwd"] if ref else None,
        "forward_ratio": med["fwd"] / med["ref_fwd"] if ref else None,
        "flops_per_step": case.flops_per_step(b),
        "xla_flops_per_step": xla_flops,
        "compile_s": compile_s,
    }


def run(
    families: list[str] | None = None,
    n: int = 10,
    config: str = "default",
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    peak_size: int | None = None,
) -> dict[str, Any]:
    """Benchmarks `families` (default: the config's, else all) on the named bench config in
    `dtype`; returns the JSON-able results. `peak_size`: the side of `matmul_peak`'s matmul
    (default: its own; smoke tests use a tiny one, as a CPU without bfloat16 units takes ~15 s
    per 2048^3 bfloat16 matmul).

    Raises:
      config_lib.UserError: an unknown family, config, config field or dtype.
    """
    import torch

    from xformers_jax.config_lib import UserError

    b = bench_config(config, overrides)
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"bench dtype must be float32 or bfloat16, got {dtype!r}")
    torch.set_num_threads(os.cpu_count() or 1)
    names = families or list(b.get("families", CASES))
    unknown = [f for f in names if f not in CASES]
    if unknown:
        raise UserError(f"unknown bench family {unknown[0]!r}; known: {sorted(CASES)}")
    device = _torch_device()
    first = matmul_peak(dtype, device, size=peak_size)
    rows = []
    for name in names:
        rows.append(_bench_case(CASES[name], b, dtype, n, device))
        gc.collect()  # this family's models and optimizer states: gone before the next one's
        if device == "cuda":
            torch.cuda.empty_cache()
    # Again after the families: the higher of the two counts.
    last = matmul_peak(dtype, device, size=peak_size)
    peak = {k: max(first[k], last[k]) for k in first}
    for r in rows:
        r["mfu"] = r["flops_per_step"] / (r["train_ms"] / 1e3) / peak["jax_flops"]
        r["ref_mfu"] = (
            r["flops_per_step"] / (r["ref_train_ms"] / 1e3) / peak["torch_flops"]
            if device is not None
            else None
        )
    return {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "reference_device": device,
        "threads": torch.get_num_threads(),
        "config_name": config,
        "bench_config": {k: v for k, v in b.items() if k != "families"},
        "dtype": dtype,
        "peak": peak,
        "results": rows,
    }


def _f(x: float | None, spec: str) -> str:
    return harness.fmt(x, spec, missing="-")


def markdown(res: dict[str, Any]) -> str:
    peak, torch_peak = res["peak"]["jax_flops"], res["peak"].get("torch_flops")
    b = res["bench_config"]
    shape = (
        f"hidden {b['hidden']}, {b['layers']} layers, {b['heads']} heads, ffn {b['ffn']}, "
        f"vocab {b['vocab']}, batch {b['batch']}, seq {b['seq']}"
    )
    ref = res["reference_device"]
    lines = [
        f"Device: {res['device']} ({res['backend']}), {res['threads']} host threads; bench config "
        f"{res['config_name']!r} ({shape}), {res['dtype']}. Measured {res['dtype']} matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (jax), "
        + (f"{torch_peak / 1e9:.1f} (torch)" if torch_peak else "no torch reference")
        + ": median of 10, the higher of before and after the families. Median of the timed "
        "calls, ours and transformers alternated; each timed call directly follows an untimed "
        "call of the same side. "
        + (
            f"Reference: transformers on {ref}."
            if ref
            else "Reference: none (torch cannot run on this backend here); ours only."
        ),
        "",
        *harness.table(
            "family | train ms (ours) | train ms (HF torch) | ratio | fwd ms (ours) | fwd ms (HF) "
            "| ratio | GFLOP/step (analytic / XLA count) | MFU ours | MFU HF | compile s",
            map(_row, res["results"]),
        ),
    ]
    return "\n".join(lines) + "\n"


def _row(r: dict[str, Any]) -> str:  # one family's cells of the table
    return (
        f"{r['family']} | {r['train_ms']:.1f} | {_f(r['ref_train_ms'], '.1f')} | "
        f"{_f(r['train_ratio'], '.2f')} | {r['forward_ms']:.1f} | "
        f"{_f(r['ref_forward_ms'], '.1f')} | {_f(r['forward_ratio'], '.2f')} | "
        f"{r['flops_per_step'] / 1e9:.1f} / {r['xla_flops_per_step'] / 1e9:.1f} | "
        f"{r['mfu']:.0%} | {_f(r['ref_mfu'], '.0%')} | {r['compile_s']:.1f}"
    )


def plot(res: dict[str, Any], path: str) -> None:
    plt = harness.pyplot()
    rows = res["results"]
    fams = [r["family"] for r in rows]
    x = np.arange(len(fams))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(fams)), 3.5), dpi=110)
    ax.bar(x - 0.2, [r["train_ms"] for r in rows], 0.4, label="ours (jax)")
    ref = [r["ref_train_ms"] or 0.0 for r in rows]
    ax.bar(x + 0.2, ref, 0.4, label="transformers (torch)")
    ax.set_xticks(x, fams)
    ax.set_ylabel("train step ms (lower is better)")
    ax.set_title(f"{res['config_name']}, {res['dtype']}, {res['device']}", fontsize=9)
    ax.legend()
    harness.save(fig, path)


def main(
    families: list[str] | None = None,
    out_dir: str | None = None,
    n: int = 10,
    config: str = "default",
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    peak_size: int | None = None,
) -> dict:
    """Runs the bench (see `run`), prints the table and writes JSON / Markdown / PNG into
    `out_dir` (default `bench_out`)."""
    res = run(families, n, config=config, dtype=dtype, overrides=overrides, peak_size=peak_size)
    table = markdown(res)
    print(table)
    harness.write_outputs(out_dir, "bench", res, table, plot)
    return res
