"""The scaling suites: `xformers-jax bench --suite yoso | mlm_logits`.

Each suite is one process run that writes `<out>/<suite>.json`, `<out>/<suite>.md` and
`<out>/<suite>.png` (`harness.run_and_write`); every number in them is reproduced by the command
stored under `"command"`. Cases are timed as `timing` says: after a warm-up call (compile time is
reported apart), ours and transformers' alternated round by round, the median of N rounds (a case
whose single run takes longer than `timing.SLOW_S` seconds is timed once).

* `yoso`: one attention op (batch 1, 4 heads, head_dim 64) at lengths 512 ... 16384. YOSO sampled
  mode (the XLA path, `num_hash` / `hash_code_len` / `lsh_backward` of the YOSO base config),
  YOSO expectation mode, plain softmax attention, and transformers' `YosoCumulation` (the
  expectation op of `YosoSelfAttention`; its sampled op needs CUDA). Forward and forward+backward
  time and memory; O(L^2) cases that need more than the memory budget are skipped with the figure
  they would need. Reports the growth exponent (slope of log time vs log L) per method and the
  first length where sampled beats softmax.
* `mlm_logits`: an XLM-V-vocabulary (901629) masked LM: forward+backward of the trainer's MLM loss
  (`tasks.mlm.make_loss_fn`) with full logits, at the masked positions only
  (`data.max_predictions`), vocabulary-chunked (`loss.vocab_chunk_size`) and both; XLA memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax.bench import harness, timing
from xformers_jax.bench.harness import fmt, gib

YOSO_METHODS = ("yoso_sampled", "yoso_expectation", "softmax", "hf_yoso_expectation")
YOSO = dict(lengths=(512, 1024, 2048, 4096, 8192, 16384), batch=1, heads=4, head_dim=64)
YOSO["methods"] = YOSO_METHODS
# max_predictions_fraction: the xlm-v-base config's 80 masked positions per 512 tokens.
MLM = dict(vocab=901629, hidden=256, layers=4, heads=4, ffn=1024, shapes=((8, 512), (2, 128)))
MLM.update(max_predictions_fraction=80 / 512, vocab_chunk_size=32768)


# ================================================================================== yoso


def _device_peak() -> int | None:
    dev = harness.device()
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def growth_exponent(lengths: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope of log(time) vs log(length); None with fewer than two points."""
    pts = [(math.log(x), math.log(t)) for x, t in zip(lengths, times) if t]
    if len(pts) < 2:
        return None
    return float(np.polyfit(*zip(*pts), 1)[0])


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
            _l2n(q),
            _l2n(k),
            v,
            None,
            None,
            key,
            num_hash=base.num_hash,
            hash_code_len=base.hash_code_len,
            lsh_backward=base.lsh_backward,
            impl="xla",
        )
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
    fb = jax.jit(
        jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), g), argnums=(0, 1, 2))
    )
    t0 = time.perf_counter()
    c_fwd = fwd.lower(q, k, v).compile()
    c_fb = fb.lower(q, k, v).compile()
    return dict(
        fwd=c_fwd,
        fb=c_fb,
        compile_s=time.perf_counter() - t0,
        fwd_bytes=harness.xla_bytes(c_fwd),
        fb_bytes=harness.xla_bytes(c_fb),
    )


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


def run_yoso(n: int = harness.DEFAULT_N, dtype: str = "float32") -> dict[str, Any]:
    """The `yoso` suite; returns its JSON-able results (rows per length and method)."""
    cfg = YOSO
    wanted = cfg.get("methods", YOSO_METHODS)
    methods = {k: v for k, v in yoso_methods(dtype).items() if k in wanted}
    budget = harness.MAX_GIB * harness.GIB
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
            hf_row = dict(
                length=length,
                method="hf_yoso_expectation",
                impl="transformers (torch)",
                fwd_bytes=hf["fwd_bytes"],
                fb_bytes=hf["fb_bytes"],
                estimated_memory=True,
            )
            entries.append((hf_row, hf, "torch"))
        for row, c, kind in entries:
            rows.append(row)
            for mode in ("fwd", "fb"):
                if row[f"{mode}_bytes"] > budget:
                    row[f"{mode}_skipped"] = harness.skip_note(row[f"{mode}_bytes"])
                    continue
                if kind == "jax":
                    compiled = c[mode]
                    run = lambda compiled=compiled: jax.block_until_ready(compiled(q, k, v))  # noqa: E731
                else:
                    run = c[mode]
                timers.append((row, mode, timing.Timer(f"{row['method']}/{mode}", run)))
        timing.alternate([t for _, _, t in timers], n)
        for row, mode, t in timers:
            row[f"{mode}_ms"] = timing.median_ms(t.times)
            row[f"{mode}_reps"] = len(t.times)
        peak = _device_peak()
        if peak is not None:
            for row, _, _ in entries:
                row["device_peak_bytes_so_far"] = peak
        print(
            f"yoso L={length}: "
            + ", ".join(
                f"{r['method']} {fmt(r.get('fwd_ms'))}/{fmt(r.get('fb_ms'))} ms"
                for r, _, _ in entries
            ),
            flush=True,
        )
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
            mode: growth_exponent(
                [r["length"] for r in mine if r.get(f"{mode}_ms")],
                [r[f"{mode}_ms"] for r in mine if r.get(f"{mode}_ms")],
            )
            for mode in ("fwd", "fb")
        }
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
    cfg, exponents = res["config"], res["growth_exponent"]
    lines = [
        harness.device_line(res),
        f"One attention op, batch {cfg['batch']}, {cfg['heads']} heads, head_dim "
        f"{cfg['head_dim']}; YOSO sampled: num_hash {cfg['num_hash']}, hash_code_len "
        f"{cfg['hash_code_len']}, lsh_backward {cfg['lsh_backward']} (the YOSO base config), "
        "XLA path. Time: median ms. Memory: GiB, XLA `memory_analysis()` (arguments + outputs + "
        "temporaries) for ours; a tensor-size estimate for transformers (marked ~).",
        "",
        *harness.table(
            "L | method | fwd ms | fwd+bwd ms | fwd GiB | fwd+bwd GiB | compile s",
            map(_yoso_row, res["rows"]),
        ),
        "",
        *harness.table(
            "method | growth exponent fwd | growth exponent fwd+bwd",
            (f"{m} | {fmt(e['fwd'], '.2f')} | {fmt(e['fb'], '.2f')}" for m, e in exponents.items()),
        ),
        "",
        "YOSO sampled beats softmax attention from "
        + " and ".join(
            _crossover_text(res["sampled_beats_softmax_from"][m]) + f" ({label})"
            for m, label in (("fwd", "forward"), ("fb", "forward+backward"))
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _yoso_row(r: dict[str, Any]) -> str:
    est = "~" if r.get("estimated_memory") else ""
    return (
        f"{r['length']} | {r['method']} | {r.get('fwd_skipped') or fmt(r.get('fwd_ms'))} | "
        f"{r.get('fb_skipped') or fmt(r.get('fb_ms'))} | {est}{gib(r['fwd_bytes'])} | "
        f"{est}{gib(r['fb_bytes'])} | {fmt(r.get('compile_s'))}"
    )


def _crossover_text(c: dict[str, Any]) -> str:
    if c["length"] is not None:
        return f"L = {c['length']}" + (
            " (softmax does not fit there)" if c.get("softmax_skipped") else ""
        )
    if c.get("projected"):
        return f"L ~ {c['projected']} (projected from the two longest measured lengths)"
    return "no measured length"


def yoso_plot(res: dict[str, Any], path: str) -> None:
    plt = harness.pyplot()
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
    harness.save(fig, path)


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
        model_type="xlm-roberta",
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        intermediate_size=cfg["ffn"],
        max_position_embeddings=seq + 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        dtype=dtype,
    )
    return config, XLMRobertaForMaskedLM(config)


def _mlm_loss(max_predictions: int, vocab_chunk_size: int):
    """The trainer's MLM loss for these two config keys (`tasks.mlm.make_loss_fn`)."""
    import ml_collections

    from xformers_jax.tasks import mlm

    config = ml_collections.ConfigDict(
        {
            "data": {"max_predictions": max_predictions},
            "loss": {"vocab_chunk_size": vocab_chunk_size},
        }
    )
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


def run_mlm_logits(n: int = harness.DEFAULT_N, dtype: str = "float32") -> dict[str, Any]:
    """The `mlm_logits` suite: loss forward+backward time and XLA memory per variant and shape."""
    cfg = MLM
    config, module = _mlm_model(cfg, dtype)
    budget = harness.MAX_GIB * harness.GIB
    rows = []
    params = hf_model = None
    for batch_size, seq in cfg["shapes"]:
        batch = harness.mlm_batch(batch_size, seq, cfg["vocab"])
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
            row = dict(
                batch=batch_size,
                seq=seq,
                variant=name,
                impl="ours (jax)",
                max_predictions=max_pred if masked else 0,
                vocab_chunk_size=cfg["vocab_chunk_size"] if chunked else 0,
                compile_s=time.perf_counter() - t0,
                bytes=harness.xla_bytes(compiled),
            )
            shape_rows.append(row)
            if row["bytes"] > budget:
                row["skipped"] = harness.skip_note(row["bytes"])
                continue
            run = lambda c=compiled: jax.block_until_ready(c(params, jbatch, rng))  # noqa: E731
            timers.append((row, timing.Timer(name, run)))
        hf_bytes = _hf_mlm_bytes(batch_size * seq, cfg["vocab"], n_params)
        hf_row = dict(
            batch=batch_size,
            seq=seq,
            variant="hf_full_logits",
            impl="transformers (torch)",
            bytes=hf_bytes,
            estimated_memory=True,
        )
        shape_rows.append(hf_row)
        if hf_bytes > budget:
            hf_row["skipped"] = harness.skip_note(hf_bytes)
        else:
            hf_model = hf_model or _hf_mlm_model(config, dtype)
            timers.append((hf_row, timing.Timer("hf", _hf_mlm_step(hf_model, batch))))
        timing.alternate([t for _, t in timers], n)
        for row, t in timers:
            row["ms"] = timing.median_ms(t.times)
            row["reps"] = len(t.times)
        rows += shape_rows
        print(
            f"mlm_logits {batch_size}x{seq}: "
            + ", ".join(
                f"{r['variant']} {r.get('skipped') or fmt(r.get('ms'))}" for r in shape_rows
            ),
            flush=True,
        )
    return {"config": dict(cfg, params=n_params), "rows": rows}


def mlm_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        harness.device_line(res),
        f"XLM-R MLM with the XLM-V vocabulary ({cfg['vocab']}), hidden {cfg['hidden']}, "
        f"{cfg['layers']} layers ({cfg['params'] / 1e6:.0f}M params): forward+backward of the "
        "trainer's MLM loss (`tasks.mlm.make_loss_fn`, no optimizer). Memory: GiB, XLA "
        "`memory_analysis()` (params, batch, grads, temporaries); transformers: estimate (~).",
        "",
        *harness.table(
            "batch x seq | variant | max_predictions | vocab_chunk_size | fwd+bwd ms | GiB | "
            "compile s",
            (
                f"{r['batch']}x{r['seq']} | {r['variant']} | {r.get('max_predictions', '—')} | "
                f"{r.get('vocab_chunk_size', '—')} | {r.get('skipped') or fmt(r.get('ms'))} | "
                f"{'~' if r.get('estimated_memory') else ''}{gib(r['bytes'])} | "
                f"{fmt(r.get('compile_s'))}"
                for r in res["rows"]
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


def mlm_plot(res: dict[str, Any], path: str) -> None:
    plt = harness.pyplot()
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in res["rows"]))
    variants = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        mine = {(r["batch"], r["seq"]): r for r in res["rows"] if r["variant"] == v}
        x = np.arange(len(shapes)) + i * width
        axes[0].bar(x, [mine[s].get("ms") or 0 for s in shapes], width, label=v)
        axes[1].bar(x, [mine[s]["bytes"] / harness.GIB for s in shapes], width, label=v)
    for ax, label in zip(axes, ("fwd+bwd ms (0 = skipped)", "GiB")):
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, [f"{b}x{s}" for b, s in shapes])
        ax.set_ylabel(label)
    axes[1].axhline(harness.MAX_GIB, color="k", lw=0.8, ls=":")
    axes[0].legend(fontsize=6)
    harness.save(fig, path)


YOSO_SUITE = harness.Suite("yoso", run_yoso, yoso_markdown, yoso_plot)
MLM_SUITE = harness.Suite("mlm_logits", run_mlm_logits, mlm_markdown, mlm_plot)
