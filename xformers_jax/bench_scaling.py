"""Scaling benchmarks: `xformers-jax bench --suite yoso | decoding | mlm_logits | all`.

Each suite is one process run that writes `<out>/<suite>.json`, `<out>/<suite>.md` and
`<out>/<suite>.png`; every number in them is reproduced by the command stored under `"command"`.
Cases are timed after a warm-up call (compile time is reported apart), ours and transformers'
alternated round by round so machine noise hits both alike, and reported as the median of N
rounds (a case whose single run takes longer than `SLOW_S` seconds is timed once).

* `yoso`: one attention op (batch 1, 4 heads, head_dim 64) at lengths 512 ... 16384. YOSO sampled
  mode (the XLA path, `num_hash` / `hash_code_len` / `lsh_backward` of the YOSO base config),
  YOSO expectation mode, plain softmax attention, and transformers' `YosoCumulation` (the
  expectation op of `YosoSelfAttention`; its sampled op needs CUDA). Forward and forward+backward
  time and memory; O(L^2) cases that need more than the memory budget are skipped with the figure
  they would need. Reports the growth exponent (slope of log time vs log L) per method and the
  first length where sampled beats softmax.
* `decoding`: greedy and 4-beam MT5ForConditionalGeneration and greedy XLNetLMHeadModel
  generation (the `bench` model sizes) vs transformers' `generate` with the same settings:
  ms per token and tokens/s per output length, our compile time apart. Each timed call follows
  an untimed one of the same side (`_alternate(settle=True)`).
* `mlm_logits`: an XLM-V-vocabulary (901629) masked LM: forward+backward of the trainer's MLM loss
  (`tasks.mlm.make_loss_fn`) with full logits, at the masked positions only
  (`data.max_predictions`), vocabulary-chunked (`loss.vocab_chunk_size`) and both; XLA memory.

Memory: XLA's compiled `memory_analysis()` (arguments + outputs + temporaries, what the program
needs on any backend, CPU included) for our cases; on GPU also the device's `peak_bytes_in_use`
(process-wide peak so far). transformers' memory is an estimate from its tensor sizes (torch has no
CPU allocator statistics) and only decides what is skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUITES = ("yoso", "decoding", "mlm_logits")
GIB = 2**30
DEFAULT_N = 5
# Memory budget (GiB) above which an O(L^2) / full-logit case is skipped instead of run.
MAX_GIB = 8.0
# A case whose warm-up run takes longer than this is timed once, not N times.
SLOW_S = 10.0

YOSO = dict(
    lengths=(512, 1024, 2048, 4096, 8192, 16384),
    batch=1,
    heads=4,
    head_dim=64,
    methods=("yoso_sampled", "yoso_expectation", "softmax", "hf_yoso_expectation"),
)
DECODING = dict(new_tokens=(16, 32, 64, 128), batch=8, encoder_len=128, prompt_len=16,
                num_beams=4, hidden=256, layers=4, heads=4, ffn=1024, vocab=32000,
                models=("mt5", "xlnet"))  # fmt: skip
YOSO_METHODS = YOSO["methods"]
# transformers' intra-op threads per suite (None: all cores). Generation runs many small ops per
# token, each an OpenMP fork/join: on a shared (oversubscribed) CPU extra threads made
# transformers' generate 5-20x slower, never faster, so it runs single-threaded -- a choice
# that favours transformers.
TORCH_THREADS = {"decoding": 1}
# max_predictions_fraction: the xlm-v-base config's 80 masked positions per 512 tokens.
MLM = dict(vocab=901629, hidden=256, layers=4, heads=4, ffn=1024, shapes=((8, 512), (2, 128)),
           max_predictions_fraction=80 / 512, vocab_chunk_size=32768)  # fmt: skip


# ================================================================================== plumbing


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


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclasses.dataclass
class _Timer:
    """One timed case: `run()` blocks until its result is ready."""

    name: str
    run: Callable[[], Any]
    keep_result: bool = False  # keep what the warm-up call returned (else it is freed at once)
    warmup_s: float = 0.0
    result: Any = None
    times: list[float] = dataclasses.field(default_factory=list)

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        result = self.run()
        self.warmup_s = time.perf_counter() - t0
        self.result = result if self.keep_result else None
        self.times = [self.warmup_s] if self.warmup_s > SLOW_S else []


def _alternate(timers: Sequence[_Timer], n: int, settle: bool = False) -> None:
    """Times every timer n times, one of each per round (slow ones keep their single run).

    `settle`: each timed call right after an untimed one of the same case, so every side is
    timed back to back. On the 2-core VM the first JAX call after transformers' ~0.3-4 s
    single-threaded `generate` ran ~20 ms slower (XLA's pool threads waking: ~130
    involuntary context switches instead of ~1), which would count against whichever side's
    calls are short (ours: 45 ms at 16 XLNet tokens)."""
    for t in timers:
        t.warm_up()
    for _ in range(n):
        for t in timers:
            if t.warmup_s <= SLOW_S:
                if settle:
                    t.run()
                t.times.append(_timed(t.run))


def xla_bytes(compiled: Any) -> int:
    """Arguments + outputs + temporaries of a compiled XLA program (aliased buffers once)."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _device() -> jax.Device:
    """The device the suites run on (`select_device`'s choice, else jax's default)."""
    return jax.config.jax_default_device or jax.devices()[0]


def _device_peak() -> int | None:
    stats = _device().memory_stats() if _device().platform != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _skip(nbytes: float) -> str:
    return f"skipped: would need {nbytes / GIB:.1f} GiB"


def growth_exponent(lengths: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope of log(time) vs log(length); None with fewer than two points."""
    pts = [(math.log(x), math.log(t)) for x, t in zip(lengths, times) if t]
    if len(pts) < 2:
        return None
    return float(np.polyfit(*zip(*pts), 1)[0])


def _header(suite: str, n: int, dtype: str, device: str | None) -> dict[str, Any]:
    import torch

    cmd = ["xformers-jax", "bench", "--suite", suite, "--n", str(n), "--dtype", dtype]
    if device:
        cmd += ["--device", device]
    return {
        "suite": suite,
        "command": shlex.join(cmd + ["--out", "DIR"]),
        "device": _device().device_kind,
        "backend": _device().platform,
        "dtype": dtype,
        "n": n,
        "torch_threads": torch.get_num_threads(),
        "memory_budget_gib": MAX_GIB,
        "slow_s": SLOW_S,
    }


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _gib(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / GIB:.2f}"


# ================================================================================== yoso


def _l2n(x):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def yoso_methods(dtype: str) -> dict[str, Callable]:
    """Our attention ops, `(q, k, v) [batch, heads, L, head_dim] -> [batch, heads, L, head_dim]`.

    YOSO's inputs are L2-normalised inside (as the model does); softmax scales by 1/sqrt(d) and
    runs the softmax in float32.
    """
    from xformers_jax.kernels.yoso import yoso_expectation_attention, yoso_lsh_attention
    from xformers_jax.models.yoso import YosoConfig

    base = YosoConfig()
    key = jax.random.key(0)
    cdt = jnp.dtype(dtype)

    def sampled(q, k, v):
        out = yoso_lsh_attention(
            _l2n(q), _l2n(k), v, None, None, key, num_hash=base.num_hash,
            hash_code_len=base.hash_code_len, lsh_backward=base.lsh_backward, impl="xla",
        )  # fmt: skip
        return out.astype(cdt)

    def expectation(q, k, v):
        return yoso_expectation_attention(_l2n(q), _l2n(k), v, None, None, base.hash_code_len)

    def softmax(q, k, v):
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v)

    return {"yoso_sampled": sampled, "yoso_expectation": expectation, "softmax": softmax}


def _yoso_ours(fn, q, k, v, g) -> dict[str, Any]:
    """Compiles forward and forward+backward; memory from XLA before anything runs."""
    fwd = jax.jit(fn)
    fb = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), g),
                          argnums=(0, 1, 2)))  # fmt: skip
    t0 = time.perf_counter()
    c_fwd = fwd.lower(q, k, v).compile()
    c_fb = fb.lower(q, k, v).compile()
    return dict(fwd=c_fwd, fb=c_fb, compile_s=time.perf_counter() - t0,
                fwd_bytes=xla_bytes(c_fwd), fb_bytes=xla_bytes(c_fb))  # fmt: skip


def _hf_expectation(q, k, v, g, dtype: str) -> dict[str, Any]:
    """transformers' `YosoCumulation` (the expectation op of `YosoSelfAttention`) on the same
    normalised inputs, `[batch * heads, L, head_dim]` as it takes them."""
    import torch
    from transformers.models.yoso import modeling_yoso

    from xformers_jax.models.yoso import YosoConfig

    tdt = getattr(torch, dtype)
    flat = lambda x: torch.from_numpy(np.array(x, np.float32).reshape(-1, *x.shape[-2:]))  # noqa: E731
    tq, tk = (flat(_l2n(x)).to(tdt) for x in (q, k))
    tv, tg = flat(v).to(tdt), flat(g).to(tdt)
    mask = torch.ones(tq.shape[:2], dtype=torch.int32)
    cfg = {"hash_code_len": YosoConfig().hash_code_len}
    op = modeling_yoso.YosoCumulation.apply

    def fwd():
        with torch.no_grad():
            op(mask, mask, tq, tk, tv, cfg)

    leaves = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]

    def fb():
        op(mask, mask, *leaves, cfg).backward(tg)

    # [BH, L, L] float32 tensors alive at once: forward (scores, acos, power, masked) ~3, the
    # backward adds the saved expectation and the weighted gradient ~2 more.
    square = tq.shape[0] * tq.shape[1] ** 2 * tq.element_size()
    return dict(fwd=fwd, fb=fb, fwd_bytes=3 * square, fb_bytes=5 * square)


def run_yoso(n: int = DEFAULT_N, dtype: str = "float32") -> dict[str, Any]:
    """The `yoso` suite; returns its JSON-able results (rows per length and method)."""
    cfg = YOSO
    wanted = cfg.get("methods", YOSO_METHODS)
    methods = {k: v for k, v in yoso_methods(dtype).items() if k in wanted}
    budget = MAX_GIB * GIB
    rows = []
    for length in cfg["lengths"]:
        rng = np.random.default_rng(length)
        shape = (cfg["batch"], cfg["heads"], length, cfg["head_dim"])
        q, k, v, g = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
        g32 = g.astype(jnp.float32)
        timers, entries = [], []
        for name, fn in methods.items():
            row = dict(length=length, method=name, impl="ours (jax)")
            c = _yoso_ours(fn, q, k, v, g32)
            row.update(compile_s=c["compile_s"], fwd_bytes=c["fwd_bytes"], fb_bytes=c["fb_bytes"])
            entries.append((row, c, "jax"))
        if "hf_yoso_expectation" in wanted:
            hf = _hf_expectation(q, k, v, g, dtype)
            hf_row = dict(length=length, method="hf_yoso_expectation",
                          impl="transformers (torch)", fwd_bytes=hf["fwd_bytes"],
                          fb_bytes=hf["fb_bytes"], estimated_memory=True)  # fmt: skip
            entries.append((hf_row, hf, "torch"))  # fmt: skip
        for row, c, kind in entries:
            rows.append(row)
            for mode in ("fwd", "fb"):
                if row[f"{mode}_bytes"] > budget:
                    row[f"{mode}_skipped"] = _skip(row[f"{mode}_bytes"])
                    continue
                if kind == "jax":
                    compiled = c[mode]
                    run = lambda compiled=compiled: jax.block_until_ready(compiled(q, k, v))  # noqa: E731
                else:
                    run = c[mode]
                timers.append((row, mode, _Timer(f"{row['method']}/{mode}", run)))
        _alternate([t for _, _, t in timers], n)
        for row, mode, t in timers:
            row[f"{mode}_ms"] = _median_ms(t.times)
            row[f"{mode}_reps"] = len(t.times)
        peak = _device_peak()
        if peak is not None:
            for row, _, _ in entries:
                row["device_peak_bytes_so_far"] = peak
        print(f"yoso L={length}: " + ", ".join(
            f"{r['method']} {_fmt(r.get('fwd_ms'))}/{_fmt(r.get('fb_ms'))} ms"
            for r, _, _ in entries), flush=True)  # fmt: skip
    return {**_yoso_summary(rows), "config": dict(cfg, **_yoso_base()), "rows": rows}


def _yoso_base() -> dict[str, Any]:
    from xformers_jax.models.yoso import YosoConfig

    b = YosoConfig()
    return dict(num_hash=b.num_hash, hash_code_len=b.hash_code_len, lsh_backward=b.lsh_backward)


def _yoso_summary(rows: list[dict]) -> dict[str, Any]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    exponents = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        exponents[m] = {
            mode: growth_exponent([r["length"] for r in mine if r.get(f"{mode}_ms")],
                                  [r[f"{mode}_ms"] for r in mine if r.get(f"{mode}_ms")])
            for mode in ("fwd", "fb")
        }  # fmt: skip
    return {
        "growth_exponent": exponents,
        "sampled_beats_softmax_from": {m: _crossover(rows, m) for m in ("fwd", "fb")},
    }


def _crossover(rows: list[dict], mode: str) -> dict[str, Any]:
    """Where YOSO sampled gets faster than softmax attention: the first measured length, or the
    first length where softmax no longer fits, or a power-law projection from the last two
    lengths both ran at (`projected`)."""
    both = []
    if not {"yoso_sampled", "softmax"} <= {r["method"] for r in rows}:
        return dict(length=None)
    for length in sorted({r["length"] for r in rows}):
        at = {r["method"]: r for r in rows if r["length"] == length}
        ours, soft = at["yoso_sampled"].get(f"{mode}_ms"), at["softmax"]
        if ours is None:
            continue
        if soft.get(f"{mode}_skipped"):
            return dict(length=length, softmax_skipped=True)
        if ours < soft[f"{mode}_ms"]:
            return dict(length=length)
        both.append((length, ours, soft[f"{mode}_ms"]))
    if len(both) < 2:
        return dict(length=None)
    (l1, o1, s1), (l2, o2, s2) = both[-2:]
    p_ours, p_soft = (math.log(b / a) / math.log(l2 / l1) for a, b in ((o1, o2), (s1, s2)))
    if p_soft <= p_ours:
        return dict(length=None)
    projected = l2 * (o2 / s2) ** (1 / (p_soft - p_ours))
    if projected > 64 * l2:  # too far out for two points to say anything
        return dict(length=None)
    # o2 (L / l2)^p_ours = s2 (L / l2)^p_soft
    return dict(length=None, projected=round(projected))


def yoso_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        _device_line(res),
        f"One attention op, batch {cfg['batch']}, {cfg['heads']} heads, head_dim "
        f"{cfg['head_dim']}; YOSO sampled: num_hash {cfg['num_hash']}, hash_code_len "
        f"{cfg['hash_code_len']}, lsh_backward {cfg['lsh_backward']} (the YOSO base config), "
        "XLA path. Time: median ms. Memory: GiB, XLA `memory_analysis()` (arguments + outputs + "
        "temporaries) for ours; a tensor-size estimate for transformers (marked ~).",
        "",
        "| L | method | fwd ms | fwd+bwd ms | fwd GiB | fwd+bwd GiB | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        est = "~" if r.get("estimated_memory") else ""
        cells = [
            r.get("fwd_skipped") or _fmt(r.get("fwd_ms")),
            r.get("fb_skipped") or _fmt(r.get("fb_ms")),
            est + _gib(r["fwd_bytes"]),
            est + _gib(r["fb_bytes"]),
            _fmt(r.get("compile_s")),
        ]
        lines.append(f"| {r['length']} | {r['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | growth exponent fwd | growth exponent fwd+bwd |",
        "| --- | --- | --- |",
    ]
    for m, e in res["growth_exponent"].items():
        lines.append(f"| {m} | {_fmt(e['fwd'], '.2f')} | {_fmt(e['fb'], '.2f')} |")
    lines += ["", "YOSO sampled beats softmax attention from " + " and ".join(
        _crossover_text(res["sampled_beats_softmax_from"][m]) + f" ({label})"
        for m, label in (("fwd", "forward"), ("fb", "forward+backward"))) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _crossover_text(c: dict[str, Any]) -> str:
    if c["length"] is not None:
        return f"L = {c['length']}" + (" (softmax does not fit there)" if c.get("softmax_skipped")
                                       else "")  # fmt: skip
    if c.get("projected"):
        return f"L ~ {c['projected']} (projected from the two longest measured lengths)"
    return "no measured length"


def yoso_plot(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for i, m in enumerate(dict.fromkeys(r["method"] for r in res["rows"])):
        mine = [r for r in res["rows"] if r["method"] == m]
        for mode, style in (("fwd", "-o"), ("fb", "--s")):
            pts = [(r["length"], r[f"{mode}_ms"]) for r in mine if r.get(f"{mode}_ms")]
            if pts:
                label = f"{m} {'fwd' if mode == 'fwd' else 'fwd+bwd'}"
                ax.plot(*zip(*pts), style, color=f"C{i}", label=label, markersize=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms (lower is better)")
    ax.legend(fontsize=6)
    _save(fig, path)


# ================================================================================== decoding


def _mt5_hf(cfg):
    import transformers

    return transformers.MT5ForConditionalGeneration(transformers.MT5Config(
        vocab_size=cfg["vocab"], d_model=cfg["hidden"], d_kv=cfg["hidden"] // cfg["heads"],
        d_ff=cfg["ffn"], num_layers=cfg["layers"], num_heads=cfg["heads"], dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip


def _xlnet_hf(cfg):
    import transformers

    return transformers.XLNetLMHeadModel(transformers.XLNetConfig(
        vocab_size=cfg["vocab"], d_model=cfg["hidden"], n_layer=cfg["layers"],
        n_head=cfg["heads"], d_inner=cfg["ffn"], dropout=0.0, pad_token_id=5, bos_token_id=1,
        eos_token_id=2,
    ))  # fmt: skip


def decoding_cases(cfg: dict) -> list[dict[str, Any]]:
    """(model, generate settings) per case: MT5 greedy and beam search, XLNet greedy."""
    cases = [
        dict(model="mt5", build=_mt5_hf, mode="greedy", num_beams=1, prompt=cfg["encoder_len"]),
        dict(model="mt5", build=_mt5_hf, mode=f"beam{cfg['num_beams']}",
             num_beams=cfg["num_beams"], prompt=cfg["encoder_len"]),
        dict(model="xlnet", build=_xlnet_hf, mode="greedy", num_beams=1, prompt=cfg["prompt_len"]),
    ]  # fmt: skip
    return [c for c in cases if c["model"] in cfg.get("models", ("mt5", "xlnet"))]


def run_decoding(n: int = DEFAULT_N, dtype: str = "float32") -> dict[str, Any]:
    """The `decoding` suite: ms/token and tokens/s per output length, ours vs transformers.

    Both sides generate exactly `new` tokens (`min_new_tokens = max_new_tokens`, so a random
    model's early EOS cannot shorten one side); transformers XLNet uses its default `use_mems`.
    """
    import torch

    import xformers_jax as xj

    cfg = DECODING
    rows, built = [], {}
    for case in decoding_cases(cfg):
        if case["model"] not in built:
            torch.manual_seed(0)
            hf = case["build"](cfg).eval().to(getattr(torch, dtype))
            with tempfile.TemporaryDirectory() as path:
                hf.save_pretrained(path)
                ours = xj.from_pretrained(path, dtype=dtype)
            built[case["model"]] = (hf, ours)
        hf, ours = built[case["model"]]
        rng = np.random.default_rng(0)
        ids = rng.integers(6, cfg["vocab"], (cfg["batch"], case["prompt"])).astype(np.int32)
        ids_t = torch.from_numpy(ids.astype(np.int64))
        for new in cfg["new_tokens"]:
            kw = dict(max_new_tokens=new, min_new_tokens=new, num_beams=case["num_beams"])

            def mine(kw=kw):
                return ours.generate(ids, **kw)

            def theirs(kw=kw):
                with torch.no_grad():
                    return hf.generate(ids_t, do_sample=False, **kw)

            first_s = _timed(mine)  # compiles this (shape, settings) once
            timers = [
                _Timer(name, fn, keep_result=True) for name, fn in (("ours", mine), ("hf", theirs))
            ]
            _alternate(timers, n, settle=True)
            ours_s, hf_s = (statistics.median(t.times) for t in timers)
            out_ours, out_hf = timers[0].result, timers[1].result.numpy()
            tokens = cfg["batch"] * new
            rows.append(dict(
                model=case["model"], mode=case["mode"], new_tokens=new, batch=cfg["batch"],
                prompt_len=case["prompt"], ours_ms_per_token=1e3 * ours_s / new,
                hf_ms_per_token=1e3 * hf_s / new, ours_tokens_per_s=tokens / ours_s,
                hf_tokens_per_s=tokens / hf_s, speedup=hf_s / ours_s,
                ours_compile_s=max(0.0, first_s - ours_s), reps=len(timers[0].times),
                same_tokens=bool(np.array_equal(np.asarray(out_ours), out_hf)),
            ))  # fmt: skip
            r = rows[-1]
            print(f"decoding {r['model']} {r['mode']} {new:4d} tokens: ours "
                  f"{r['ours_ms_per_token']:.2f} ms/token, transformers "
                  f"{r['hf_ms_per_token']:.2f}, x{r['speedup']:.1f}, compile "
                  f"{r['ours_compile_s']:.1f} s", flush=True)  # fmt: skip
    return {"config": cfg, "rows": rows, "summary": _decoding_summary(rows)}


# tokens/s targets vs transformers (ours / theirs) per model.
DECODING_TARGETS = {"xlnet": 5.0, "mt5": 2.0}


def _decoding_summary(rows: list[dict]) -> list[dict[str, Any]]:
    out = []
    for key in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["mode"]) == key]
        per_token = [r["ours_ms_per_token"] for r in mine]
        speedups = [r["speedup"] for r in mine]
        out.append(dict(
            model=key[0], mode=key[1], min_speedup=min(speedups), max_speedup=max(speedups),
            target=DECODING_TARGETS.get(key[0]),
            target_met=min(speedups) >= DECODING_TARGETS.get(key[0], 0.0),
            # ms/token at the longest over the shortest output: 1.0 = flat in the output length.
            ours_flatness=per_token[-1] / per_token[0],
            hf_flatness=mine[-1]["hf_ms_per_token"] / mine[0]["hf_ms_per_token"],
        ))  # fmt: skip
    return out


def decoding_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        _device_line(res),
        f"Random-init models (hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} "
        f"heads, ffn {cfg['ffn']}, vocab {cfg['vocab']}), batch {cfg['batch']}; MT5 encoder "
        f"length {cfg['encoder_len']}, XLNet prompt {cfg['prompt_len']}; exactly N new tokens "
        "per row on both sides. transformers XLNet: default `generate` (use_mems); transformers "
        "single-threaded (`TORCH_THREADS`). Each timed call directly follows an untimed call of "
        "the same side. Compile time is ours, first call minus a steady call.",
        "",
        "| model | mode | new tokens | ours ms/token | HF ms/token | ours tokens/s | HF tokens/s "
        "| speedup | same tokens | our compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['new_tokens']} | {r['ours_ms_per_token']:.2f} | "
            f"{r['hf_ms_per_token']:.2f} | {r['ours_tokens_per_s']:.0f} | "
            f"{r['hf_tokens_per_s']:.0f} | {r['speedup']:.1f}x | {r['same_tokens']} | "
            f"{r['ours_compile_s']:.1f} |"
        )
    lines += ["", "| model | mode | speedup (min-max) | target | met | ms/token flatness ours / HF "
              "(longest / shortest) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in res["summary"]:
        lines.append(
            f"| {s['model']} | {s['mode']} | {s['min_speedup']:.1f}-{s['max_speedup']:.1f}x | "
            f">= {s['target']:.0f}x | {'yes' if s['target_met'] else 'no'} | "
            f"{s['ours_flatness']:.2f} / {s['hf_flatness']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def decoding_plot(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key in dict.fromkeys((r["model"], r["mode"]) for r in res["rows"]):
        mine = [r for r in res["rows"] if (r["model"], r["mode"]) == key]
        x = [r["new_tokens"] for r in mine]
        (line,) = ax.plot(x, [r["ours_ms_per_token"] for r in mine], "-o", markersize=3,
                          label=f"{key[0]} {key[1]} ours")  # fmt: skip
        ax.plot(x, [r["hf_ms_per_token"] for r in mine], "--s", color=line.get_color(),
                markersize=3, label=f"{key[0]} {key[1]} transformers")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("new tokens")
    ax.set_ylabel("ms per token (lower is better)")
    ax.legend(fontsize=6)
    _save(fig, path)


# ================================================================================== mlm_logits


MLM_VARIANTS = (  # name, data.max_predictions?, loss.vocab_chunk_size?
    ("full_logits", False, False),
    ("masked_only", True, False),
    ("vocab_chunked", False, True),
    ("masked_chunked", True, True),
)


def _mlm_model(cfg: dict, dtype: str):
    from xformers_jax.models.xlm_roberta import XLMRobertaConfig, XLMRobertaForMaskedLM

    seq = max(s for _, s in cfg["shapes"])
    config = XLMRobertaConfig(
        model_type="xlm-roberta", vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        intermediate_size=cfg["ffn"], max_position_embeddings=seq + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, dtype=dtype,
    )  # fmt: skip
    return config, XLMRobertaForMaskedLM(config)


def _mlm_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, (batch, seq)).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.15, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _mlm_loss(max_predictions: int, vocab_chunk_size: int):
    """The trainer's MLM loss for these two config keys (`tasks.mlm.make_loss_fn`)."""
    import ml_collections

    from xformers_jax.tasks import mlm

    config = ml_collections.ConfigDict({
        "data": {"max_predictions": max_predictions},
        "loss": {"vocab_chunk_size": vocab_chunk_size},
    })  # fmt: skip
    return mlm.make_loss_fn(config)


def _hf_mlm_bytes(tokens: int, vocab: int, n_params: int) -> int:
    """transformers' full-logit MLM forward+backward: logits, log-softmax and their gradient
    (~3 `[tokens, vocab]` float32 tensors) plus the parameters and their gradients."""
    return 3 * tokens * vocab * 4 + 2 * n_params * 4


def _hf_mlm_step(model, batch: dict) -> Callable[[], None]:
    import torch

    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}

    def fb():
        model.zero_grad(set_to_none=True)
        model(**tb).loss.backward()

    return fb


def _hf_mlm_model(config, dtype: str):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in config.to_hf_config().items() if k != "architectures"}
    return transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**hf_cfg)).to(
        getattr(torch, dtype)
    )


def run_mlm_logits(n: int = DEFAULT_N, dtype: str = "float32") -> dict[str, Any]:
    """The `mlm_logits` suite: loss forward+backward time and XLA memory per variant and shape."""
    cfg = MLM
    config, module = _mlm_model(cfg, dtype)
    budget = MAX_GIB * GIB
    rows = []
    params = hf_model = None
    for batch_size, seq in cfg["shapes"]:
        batch = _mlm_batch(batch_size, seq, cfg["vocab"])
        if params is None:
            init = jax.jit(lambda r: module.init(r, batch["input_ids"][:1, :8])["params"])
            params = init(jax.random.key(0))
            n_params = sum(x.size for x in jax.tree.leaves(params))
        jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
        rng = jax.random.key(1)
        max_pred = max(1, round(cfg["max_predictions_fraction"] * seq))
        timers, shape_rows = [], []
        for name, masked, chunked in MLM_VARIANTS:
            loss_fn = _mlm_loss(
                max_pred if masked else 0, cfg["vocab_chunk_size"] if chunked else 0
            )
            step = jax.jit(
                jax.value_and_grad(lambda p, b, r, f=loss_fn: f(p, b, r, model=module)[0])
            )
            t0 = time.perf_counter()
            compiled = step.lower(params, jbatch, rng).compile()
            row = dict(batch=batch_size, seq=seq, variant=name, impl="ours (jax)",
                       max_predictions=max_pred if masked else 0,
                       vocab_chunk_size=cfg["vocab_chunk_size"] if chunked else 0,
                       compile_s=time.perf_counter() - t0, bytes=xla_bytes(compiled))  # fmt: skip
            shape_rows.append(row)
            if row["bytes"] > budget:
                row["skipped"] = _skip(row["bytes"])
                continue
            run = lambda c=compiled: jax.block_until_ready(c(params, jbatch, rng))  # noqa: E731
            timers.append((row, _Timer(name, run)))
        hf_bytes = _hf_mlm_bytes(batch_size * seq, cfg["vocab"], n_params)
        hf_row = dict(
            batch=batch_size,
            seq=seq,
            variant="hf_full_logits",
            impl="transformers (torch)",
            bytes=hf_bytes,
            estimated_memory=True,
        )
        shape_rows.append(hf_row)  # fmt: skip
        if hf_bytes > budget:
            hf_row["skipped"] = _skip(hf_bytes)
        else:
            hf_model = hf_model or _hf_mlm_model(config, dtype)
            timers.append((hf_row, _Timer("hf", _hf_mlm_step(hf_model, batch))))
        _alternate([t for _, t in timers], n)
        for row, t in timers:
            row["ms"] = _median_ms(t.times)
            row["reps"] = len(t.times)
        rows += shape_rows
        print(f"mlm_logits {batch_size}x{seq}: " + ", ".join(
            f"{r['variant']} {r.get('skipped') or _fmt(r.get('ms'))}" for r in shape_rows
        ), flush=True)  # fmt: skip
    return {"config": dict(cfg, params=n_params), "rows": rows}


def mlm_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        _device_line(res),
        f"XLM-R MLM with the XLM-V vocabulary ({cfg['vocab']}), hidden {cfg['hidden']}, "
        f"{cfg['layers']} layers ({cfg['params'] / 1e6:.0f}M params): forward+backward of the "
        "trainer's MLM loss (`tasks.mlm.make_loss_fn`, no optimizer). Memory: GiB, XLA "
        "`memory_analysis()` (params, batch, grads, temporaries); transformers: estimate (~).",
        "",
        "| batch x seq | variant | max_predictions | vocab_chunk_size | fwd+bwd ms | GiB "
        "| compile s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        est = "~" if r.get("estimated_memory") else ""
        lines.append(
            f"| {r['batch']}x{r['seq']} | {r['variant']} | {r.get('max_predictions', '—')} | "
            f"{r.get('vocab_chunk_size', '—')} | {r.get('skipped') or _fmt(r.get('ms'))} | "
            f"{est}{_gib(r['bytes'])} | {_fmt(r.get('compile_s'))} |"
        )
    return "\n".join(lines) + "\n"


def mlm_plot(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in res["rows"]))
    variants = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        mine = {(r["batch"], r["seq"]): r for r in res["rows"] if r["variant"] == v}
        x = np.arange(len(shapes)) + i * width
        axes[0].bar(x, [mine[s].get("ms") or 0 for s in shapes], width, label=v)
        axes[1].bar(x, [mine[s]["bytes"] / GIB for s in shapes], width, label=v)
    for ax, label in zip(axes, ("fwd+bwd ms (0 = skipped)", "GiB")):
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, [f"{b}x{s}" for b, s in shapes])
        ax.set_ylabel(label)
    axes[1].axhline(MAX_GIB, color="k", lw=0.8, ls=":")
    axes[0].legend(fontsize=6)
    _save(fig, path)


# ================================================================================== outputs


def _device_line(res: dict[str, Any]) -> str:
    return (
        f"Device: {res['device']} ({res['backend']}), dtype {res['dtype']}, torch threads "
        f"{res['torch_threads']}; median of {res['n']} after warm-up (cases over "
        f"{res['slow_s']:g} s: 1 run); memory budget {res['memory_budget_gib']:g} GiB. "
        f"Reproduce: `{res['command']}`."
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


RUNNERS = {"yoso": run_yoso, "decoding": run_decoding, "mlm_logits": run_mlm_logits}
WRITERS = {
    "yoso": (yoso_markdown, yoso_plot),
    "decoding": (decoding_markdown, decoding_plot),
    "mlm_logits": (mlm_markdown, mlm_plot),
}


def run_suite(
    suite: str,
    out_dir: str | None = None,
    n: int = DEFAULT_N,
    dtype: str = "float32",
    device: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs one scaling suite, prints its table and writes `<out>/<suite>.{json,md,png}`.

    Args:
      suite: one of `SUITES`.
      out_dir: output directory (default `bench_out`).
      n: timed rounds per case (median).
      dtype: compute dtype, `'float32'` or `'bfloat16'`.
      device: the `--device` it was asked for (recorded in the reproduce command).
      command: the command that reproduces this run, if not `xformers-jax bench ...`.

    Returns:
      The JSON-able results.
    """
    import torch

    torch.set_num_threads(TORCH_THREADS.get(suite) or os.cpu_count() or 1)
    res = _header(suite, n, dtype, device)
    if command:
        res["command"] = command
    res.update(RUNNERS[suite](n, dtype))
    markdown, plot = WRITERS[suite]
    table = markdown(res)
    print(table, flush=True)
    out_dir = out_dir or "bench_out"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{suite}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, f"{suite}.md"), "w") as f:
        f.write(table)
    plot(res, os.path.join(out_dir, f"{suite}.png"))
    return res


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
    """`xformers-jax bench`: the train suite (`bench.main`) and/or the scaling suites.

    Args:
      suite: `'train'`, one of `SUITES`, or `'all'` (train, then every scaling suite).
      families: train-suite families (default all); only with `suite` train or all.
      out_dir: output directory (default `bench_out`).
      n: timed rounds per case (default 10 for train, `DEFAULT_N` otherwise).
      device: `'cpu'`, `'gpu'` or `'tpu'`: the jax backend to run on (default: jax's default).
      dtype: compute dtype, float32 or bfloat16 (float32 params and optimizer state).
      config / overrides: the train suite's named bench config (`bench.CONFIGS`) and field
        overrides, e.g. `("xlmr_xl_512", {"layers": 36})`.

    Returns:
      `{suite: results}` for every suite run.

    Raises:
      config_lib.UserError: unknown suite, dtype, bench config or field, `--family` or a bench
        config with a scaling suite only, a device this machine lacks.
    """
    from xformers_jax.config_lib import UserError

    names = ["train", *SUITES] if suite == "all" else [suite]
    unknown = [s for s in names if s != "train" and s not in SUITES]
    if unknown:
        raise UserError(
            f"unknown bench suite {unknown[0]!r}; known: train, {', '.join(SUITES)}, all"
        )
    if families and "train" not in names:
        raise UserError(f"--family selects train-suite families; suite {suite!r} has none")
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if "train" not in names and (config != "default" or overrides):
        raise UserError(f"--bench-config / --bench-set configure the train suite; suite {suite!r} "
                        "has none")  # fmt: skip
    train_suite = importlib.import_module("xformers_jax.bench") if "train" in names else None
    if train_suite is not None:
        train_suite.bench_config(config, overrides)  # a bad name or field fails before any work
    # Ours and the torch reference share an accelerator: jax must not claim 75% of its memory
    # up front (no effect on a CPU, or once jax's backends are up).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    select_device(device)
    results = {}
    for name in names:
        if name == "train":
            kw = dict(config=config, dtype=dtype, overrides=overrides)
            if n is not None:
                kw["n"] = n
            results[name] = train_suite.main(list(families) if families else None, out_dir, **kw)
        else:
            results[name] = run_suite(name, out_dir, n or DEFAULT_N, dtype, device)
    return results
