"""`xformers-jax bench`: our jitted train step and forward vs transformers' PyTorch, in one run.

For each family, the bench config (hidden 256, 4 layers, 4 heads, ffn 1024, vocab 32000, batch 8,
seq 128 unless the family says otherwise) is built twice -- our Flax module and the transformers
PyTorch model with the same config and batch -- and timed alternately (ours, theirs, ours, ...),
median of N after warm-up; each timed call directly follows an untimed call of the same side
(steps back to back, as in a training loop). Our models run their layer scan unrolled
(`scan_unroll` = the layer count: 3-10% faster steps on CPU; transformers' models are Python
loops anyway). Reported: ms per train step (AdamW, float32) and per forward, the ratio ours /
reference, model FLOPs per step (analytic, cross-checked with XLA's cost analysis), MFU against
the matmul peak measured in the same run, and our compile time. Results go to
`<out>/bench.json`, `<out>/bench.md` and `<out>/bench.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

BENCH = dict(hidden=256, layers=4, heads=4, ffn=1024, vocab=32000, batch=8, seq=128)


@dataclasses.dataclass
class Case:
    """One family's bench: builders for both sides and the analytic FLOPs of a train step."""

    family: str
    build_ours: Callable[[], tuple[Any, Any, dict, Callable]]  # module, params, batch, loss_fn
    build_torch: Callable[[], tuple[Any, dict]]  # model, batch (loss from model(**batch).loss)
    flops_per_step: Callable[[], float]


# --------------------------------------------------------------------------------- families


def _xlmr_config():
    from xformers_jax.models.xlm_roberta import XLMRobertaConfig

    b = BENCH
    return XLMRobertaConfig(
        model_type="xlm-roberta-xl", vocab_size=b["vocab"], hidden_size=b["hidden"],
        num_hidden_layers=b["layers"], num_attention_heads=b["heads"],
        intermediate_size=b["ffn"], max_position_embeddings=b["seq"] + 2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, scan_unroll=b["layers"],
    )  # fmt: skip


def _mlm_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = BENCH
    ids = rng.integers(4, b["vocab"], (b["batch"], b["seq"])).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.15, ids, -100).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _xlmr_ours():
    from xformers_jax.models.xlm_roberta import XLMRobertaForMaskedLM

    module = XLMRobertaForMaskedLM(_xlmr_config())
    batch = _mlm_batch()
    params = jax.jit(lambda r: module.init(r, batch["input_ids"][:1])["params"])(jax.random.key(0))

    def loss_fn(p, b):
        return module.apply({"params": p}, b["input_ids"], b["attention_mask"],
                            labels=b["labels"]).loss  # fmt: skip

    return module, params, batch, loss_fn


def _xlmr_torch():
    import torch
    import transformers

    cfg = _xlmr_config().to_hf_config()
    model = transformers.XLMRobertaXLForMaskedLM(transformers.XLMRobertaXLConfig(**cfg))
    batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in _mlm_batch().items()}
    return model, batch


def _encoder_flops(layers, hidden, ffn, seq, tokens, vocab) -> float:
    """6 x multiply-adds per token (2 flops each, forward + 2x backward): projections, FFN,
    attention scores and values, the LM head."""
    per_token = layers * (4 * hidden * hidden + 2 * hidden * ffn) + hidden * hidden + hidden * vocab
    attn = layers * 2 * seq * hidden  # multiply-adds of q.k and p.v per token
    return 3 * 2 * tokens * (per_token + attn)


def _text_case(family: str, make_cfg, ours_cls: str, torch_cls: str, torch_cfg_cls: str,
               batch_fn, extra_flops: float = 0.0) -> Case:  # fmt: skip
    """A text family's case: same config, same batch, HF's loss on both sides."""

    def ours():
        import importlib

        module = getattr(importlib.import_module(f"xformers_jax.models.{family}"), ours_cls)(
            make_cfg()
        )
        batch = batch_fn()
        init_kw = {k: v[:1] for k, v in batch.items()}  # labels too: MT5 derives decoder inputs
        params = jax.jit(lambda r: module.init(r, **init_kw)["params"])(jax.random.key(0))
        return module, params, batch, lambda p, b: module.apply({"params": p}, **b).loss

    def reference():
        import torch
        import transformers

        cfg = getattr(transformers, torch_cfg_cls)(**make_cfg().to_hf_config())
        model = getattr(transformers, torch_cls)(cfg)
        tb = {}
        for k, v in batch_fn().items():
            t = torch.from_numpy(v)
            tb[k] = t.long() if v.dtype.kind in "iu" else t
        return model, tb

    b = BENCH
    tokens = b["batch"] * b["seq"]
    return Case(
        family, ours, reference,
        lambda: _encoder_flops(b["layers"], b["hidden"], b["ffn"], b["seq"], tokens,
                               b["vocab"]) + extra_flops,
    )  # fmt: skip


def _xlnet_config():
    from xformers_jax.models.xlnet import XLNetConfig

    b = BENCH
    return XLNetConfig(vocab_size=b["vocab"], d_model=b["hidden"], n_layer=b["layers"],
                       n_head=b["heads"], d_inner=b["ffn"], dropout=0.0, mem_len=None,
                       scan_unroll=b["layers"])  # fmt: skip


def _xlnet_position_flops() -> float:
    """XLNet's position term on top of `_encoder_flops`: every query against the `2 x seq`
    relative-position keys, and those keys' projection (once per step, batch-free)."""
    b = BENCH
    rel = 2 * b["seq"]
    per_layer = b["batch"] * b["seq"] * rel * b["hidden"] + rel * b["hidden"] ** 2
    return 3 * 2 * b["layers"] * per_layer


def _lm_batch() -> dict[str, np.ndarray]:
    """Causal/permutation LM style: labels are the inputs (XLNet's plain LM loss)."""
    ids = _mlm_batch()["input_ids"]
    return {"input_ids": ids, "labels": ids.copy()}


def _yoso_config():
    from xformers_jax.models.yoso import YosoConfig

    b = BENCH
    return YosoConfig(
        vocab_size=b["vocab"], hidden_size=b["hidden"], num_hidden_layers=b["layers"],
        num_attention_heads=b["heads"], intermediate_size=b["ffn"],
        max_position_embeddings=b["seq"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, use_expectation=True, scan_unroll=b["layers"],
    )  # fmt: skip


def _mt5_config():
    from xformers_jax.models.mt5 import MT5Config

    b = BENCH
    return MT5Config(vocab_size=b["vocab"], d_model=b["hidden"], d_kv=b["hidden"] // b["heads"],
                     d_ff=b["ffn"], num_layers=b["layers"], num_heads=b["heads"],
                     dropout_rate=0.0, scan_unroll=b["layers"])  # fmt: skip


def _seq2seq_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b = BENCH
    ids = rng.integers(2, b["vocab"], (b["batch"], b["seq"])).astype(np.int32)
    labels = rng.integers(2, b["vocab"], (b["batch"], BENCH_DECODER_LEN)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


BENCH_DECODER_LEN = 32
BEIT = dict(image_size=224, patch_size=16, num_labels=10)


def _beit_config():
    from xformers_jax.models.beit import BeitConfig

    b = BENCH
    return BeitConfig(
        image_size=BEIT["image_size"], patch_size=BEIT["patch_size"], hidden_size=b["hidden"],
        num_hidden_layers=b["layers"], num_attention_heads=b["heads"],
        intermediate_size=b["ffn"], num_labels=BEIT["num_labels"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, use_relative_position_bias=True,
        scan_unroll=b["layers"],
    )  # fmt: skip


def _image_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n, size = BENCH["batch"], BEIT["image_size"]
    return {
        "pixel_values": rng.standard_normal((n, 3, size, size)).astype(np.float32),
        "labels": rng.integers(0, BEIT["num_labels"], (n,)).astype(np.int32),
    }


def _mt5_flops() -> float:
    b = BENCH
    h, f, L = b["hidden"], b["ffn"], b["layers"]
    enc_t, dec_t = b["batch"] * b["seq"], b["batch"] * BENCH_DECODER_LEN
    gated = 3 * h * f  # wi_0, wi_1, wo
    enc = enc_t * (L * (4 * h * h + gated) + L * 2 * b["seq"] * h)
    dec = dec_t * (L * (8 * h * h + gated) + L * 2 * (BENCH_DECODER_LEN + b["seq"]) * h)
    return 3 * 2 * (enc + dec + dec_t * h * b["vocab"])


def _beit_flops() -> float:
    b = BENCH
    n_tok = (BEIT["image_size"] // BEIT["patch_size"]) ** 2 + 1
    h = b["hidden"]
    patch = 3 * BEIT["patch_size"] ** 2 * h
    per_token = b["layers"] * (4 * h * h + 2 * h * b["ffn"] + 2 * n_tok * h) + patch
    return 3 * 2 * b["batch"] * n_tok * per_token


CASES: dict[str, Case] = {
    "xlm_roberta": Case(
        "xlm_roberta",
        _xlmr_ours,
        _xlmr_torch,
        lambda: _encoder_flops(
            BENCH["layers"],
            BENCH["hidden"],
            BENCH["ffn"],
            BENCH["seq"],
            BENCH["batch"] * BENCH["seq"],
            BENCH["vocab"],
        ),  # fmt: skip
    ),
    "xlnet": _text_case(
        "xlnet",
        _xlnet_config,
        "XLNetLMHeadModel",
        "XLNetLMHeadModel",
        "XLNetConfig",
        _lm_batch,
        extra_flops=_xlnet_position_flops(),
    ),  # fmt: skip
    "yoso": _text_case(
        "yoso", _yoso_config, "YosoForMaskedLM", "YosoForMaskedLM", "YosoConfig", _mlm_batch
    ),  # fmt: skip
    "mt5": dataclasses.replace(
        _text_case(
            "mt5",
            _mt5_config,
            "MT5ForConditionalGeneration",
            "MT5ForConditionalGeneration",
            "MT5Config",
            _seq2seq_batch,
        ),
        flops_per_step=_mt5_flops,
    ),  # fmt: skip
    "beit": dataclasses.replace(
        _text_case(
            "beit",
            _beit_config,
            "BeitForImageClassification",
            "BeitForImageClassification",
            "BeitConfig",
            _image_batch,
        ),
        flops_per_step=_beit_flops,
    ),  # fmt: skip
}


# ------------------------------------------------------------------------------ measuring


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """Measured float32 matmul FLOP/s of this machine, for jax and torch (the MFU denominator):
    the median of `reps` calls (`run` measures it before and after the families and keeps the
    higher, so a slow spell of a shared VM does not inflate every MFU)."""
    import torch

    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    jax_ms = _median_ms(lambda: mm(a).block_until_ready(), reps)
    t = torch.ones((n, n))
    torch.mm(t, t)
    torch_ms = _median_ms(lambda: torch.mm(t, t), reps)
    flops = 2.0 * n**3
    return {"jax_flops": flops / (jax_ms / 1e3), "torch_flops": flops / (torch_ms / 1e3)}


def _bench_case(case: Case, n: int) -> dict[str, Any]:
    import torch

    module, params, batch, loss_fn = case.build_ours()
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
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

    def ours_step():
        state["p"], state["o"], loss = compiled(state["p"], state["o"], batch)
        loss.block_until_ready()

    ours_step()
    tmodel, tbatch = case.build_torch()
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        tmodel(**tbatch).loss.backward()
        topt.step()

    def torch_fwd():
        with torch.no_grad():
            tmodel(**tbatch).loss.item()

    torch_step()

    def ours_fwd_call():
        fwd(state["p"], batch).block_until_ready()

    def settled_ms(fn):
        # Untimed call first: every timed call runs back to back with one of its own side, as
        # steps run in a training loop. Straight after the other library's step, our first
        # call measured up to ~40% slower on the 2-core VM (the other side's threads still
        # holding a core, ours waking up), which would count against whichever side is timed
        # second.
        fn()
        return _median_ms(fn, 1)

    ours_train, ref_train, ours_fwd, ref_fwd = [], [], [], []
    for _ in range(n):  # alternate so machine noise hits both sides alike
        ours_train.append(settled_ms(ours_step))
        ref_train.append(settled_ms(torch_step))
        ours_fwd.append(settled_ms(ours_fwd_call))
        ref_fwd.append(settled_ms(torch_fwd))
    med = statistics.median
    return {
        "family": case.family,
        "train_ms": med(ours_train),
        "ref_train_ms": med(ref_train),
        "train_ratio": med(ours_train) / med(ref_train),
        "forward_ms": med(ours_fwd),
        "ref_forward_ms": med(ref_fwd),
        "forward_ratio": med(ours_fwd) / med(ref_fwd),
        "flops_per_step": case.flops_per_step(),
        "xla_flops_per_step": xla_flops,
        "compile_s": compile_s,
    }


def run(families: list[str] | None = None, n: int = 10) -> dict[str, Any]:
    """Benchmarks `families` (default: all); returns the JSON-able results."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    names = families or list(CASES)
    unknown = [f for f in names if f not in CASES]
    if unknown:
        from xformers_jax.config_lib import UserError

        raise UserError(f"unknown bench family {unknown[0]!r}; known: {sorted(CASES)}")
    first = matmul_peak()
    rows = [_bench_case(CASES[name], n) for name in names]
    last = matmul_peak()  # measured again after the families: the higher of the two counts
    peak = {k: max(first[k], last[k]) for k in first}
    for r in rows:
        r["mfu"] = r["flops_per_step"] / (r["train_ms"] / 1e3) / peak["jax_flops"]
        r["ref_mfu"] = r["flops_per_step"] / (r["ref_train_ms"] / 1e3) / peak["torch_flops"]
    return {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "threads": torch.get_num_threads(),
        "bench_config": BENCH,
        "peak": peak,
        "results": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    peak = res["peak"]["jax_flops"] / 1e9
    lines = [
        f"Device: {res['device']} ({res['backend']}), {res['threads']} threads; measured matmul "
        f"peak {peak:.1f} GFLOP/s (jax), {res['peak']['torch_flops'] / 1e9:.1f} (torch): a "
        "2048^3 float32 matmul, median of 10, the higher of before and after the families. "
        "Median of the timed calls, ours and transformers alternated; each timed call directly "
        "follows an untimed call of the same side.",
        "",
        "| family | train ms (ours) | train ms (HF torch) | ratio | fwd ms (ours) | fwd ms (HF) "
        "| ratio | GFLOP/step (analytic / XLA count) | MFU ours | MFU HF | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['family']} | {r['train_ms']:.1f} | {r['ref_train_ms']:.1f} | "
            f"{r['train_ratio']:.2f} | {r['forward_ms']:.1f} | {r['ref_forward_ms']:.1f} | "
            f"{r['forward_ratio']:.2f} | {r['flops_per_step'] / 1e9:.1f} / "
            f"{r['xla_flops_per_step'] / 1e9:.1f} | {r['mfu']:.0%} | {r['ref_mfu']:.0%} | "
            f"{r['compile_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [r["family"] for r in res["results"]]
    x = np.arange(len(fams))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(fams)), 3.5), dpi=110)
    ax.bar(x - 0.2, [r["train_ms"] for r in res["results"]], 0.4, label="ours (jax)")
    ax.bar(x + 0.2, [r["ref_train_ms"] for r in res["results"]], 0.4, label="transformers (torch)")
    ax.set_xticks(x, fams)
    ax.set_ylabel("train step ms (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(families: list[str] | None = None, out_dir: str | None = None, n: int = 10) -> dict:
    """Runs the bench, prints the table and writes JSON / Markdown / PNG into `out_dir`."""
    res = run(families, n)
    table = markdown(res)
    print(table)
    out_dir = out_dir or "bench_out"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(table)
    plot(res, os.path.join(out_dir, "bench.png"))
    return res
