"""Generation time per token, ours vs transformers: the `decoding` bench suite.

Run by `xformers-jax bench --suite decoding`, or with its own options by
`python -m xformers_jax.bench.decoding`. Greedy and 4-beam MT5ForConditionalGeneration and greedy
XLNetLMHeadModel generation (the train suite's default model sizes) vs transformers' `generate`
with the same settings (XLNet with its default `use_mems`): ms per token and tokens/s per output
length, our compile time apart. Each timed call follows an untimed one of the same side
(`timing.alternate(settle=True)`). Options pick the output lengths, the models and the rounds:

  python -m xformers_jax.bench.decoding [--new 16,32,64,128] [--models mt5,xlnet] [--n 5]
                                        [--out bench_out]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from xformers_jax.bench import harness, timing

DECODING = dict(
    new_tokens=(16, 32, 64, 128),
    batch=8,
    encoder_len=128,
    prompt_len=16,
    num_beams=4,
    hidden=256,
    layers=4,
    heads=4,
    ffn=1024,
    vocab=32000,
    models=("mt5", "xlnet"),
)
# transformers' intra-op threads. Generation runs many small ops per token, each an OpenMP
# fork/join: on a shared (oversubscribed) CPU extra threads made transformers' generate 5-20x
# slower, never faster, so it runs single-threaded -- a choice that favours transformers.
TORCH_THREADS = 1
# tokens/s targets vs transformers (ours / theirs) per model.
DECODING_TARGETS = {"xlnet": 5.0, "mt5": 2.0}


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
        dict(
            model="mt5",
            build=_mt5_hf,
            mode=f"beam{cfg['num_beams']}",
            num_beams=cfg["num_beams"],
            prompt=cfg["encoder_len"],
        ),
        dict(model="xlnet", build=_xlnet_hf, mode="greedy", num_beams=1, prompt=cfg["prompt_len"]),
    ]
    return [c for c in cases if c["model"] in cfg.get("models", ("mt5", "xlnet"))]


def run_decoding(
    n: int = harness.DEFAULT_N, dtype: str = "float32", cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `decoding` suite: ms/token and tokens/s per output length, ours vs transformers.

    Both sides generate exactly `new` tokens (`min_new_tokens = max_new_tokens`, so a random
    model's early EOS cannot shorten one side); transformers XLNet uses its default `use_mems`.
    """
    import torch

    import xformers_jax as xj

    cfg = cfg or DECODING
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

            first_s = timing.timed(mine)  # compiles this (shape, settings) once
            timers = [
                timing.Timer(name, fn, keep_result=True)
                for name, fn in (("ours", mine), ("hf", theirs))
            ]
            timing.alternate(timers, n, settle=True)
            ours_s, hf_s = (statistics.median(t.times) for t in timers)
            out_ours, out_hf = timers[0].result, timers[1].result.numpy()
            tokens = cfg["batch"] * new
            rows.append(
                dict(
                    model=case["model"],
                    mode=case["mode"],
                    new_tokens=new,
                    batch=cfg["batch"],
                    prompt_len=case["prompt"],
                    ours_ms_per_token=1e3 * ours_s / new,
                    hf_ms_per_token=1e3 * hf_s / new,
                    ours_tokens_per_s=tokens / ours_s,
                    hf_tokens_per_s=tokens / hf_s,
                    speedup=hf_s / ours_s,
                    ours_compile_s=max(0.0, first_s - ours_s),
                    reps=len(timers[0].times),
                    same_tokens=bool(np.array_equal(np.asarray(out_ours), out_hf)),
                )
            )
            r = rows[-1]
            print(
                f"decoding {r['model']} {r['mode']} {new:4d} tokens: ours "
                f"{r['ours_ms_per_token']:.2f} ms/token, transformers "
                f"{r['hf_ms_per_token']:.2f}, x{r['speedup']:.1f}, compile "
                f"{r['ours_compile_s']:.1f} s",
                flush=True,
            )
    return {"config": cfg, "rows": rows, "summary": _decoding_summary(rows)}


def _decoding_summary(rows: list[dict]) -> list[dict[str, Any]]:
    out = []
    for key in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["mode"]) == key]
        per_token = [r["ours_ms_per_token"] for r in mine]
        speedups = [r["speedup"] for r in mine]
        out.append(
            dict(
                model=key[0],
                mode=key[1],
                min_speedup=min(speedups),
                max_speedup=max(speedups),
                target=DECODING_TARGETS.get(key[0]),
                target_met=min(speedups) >= DECODING_TARGETS.get(key[0], 0.0),
                # ms/token at the longest over the shortest output: 1.0 = flat in the output length.
                ours_flatness=per_token[-1] / per_token[0],
                hf_flatness=mine[-1]["hf_ms_per_token"] / mine[0]["hf_ms_per_token"],
            )
        )
    return out


def decoding_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        harness.device_line(res),
        f"Random-init models (hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} "
        f"heads, ffn {cfg['ffn']}, vocab {cfg['vocab']}), batch {cfg['batch']}; MT5 encoder "
        f"length {cfg['encoder_len']}, XLNet prompt {cfg['prompt_len']}; exactly N new tokens "
        "per row on both sides. transformers XLNet: default `generate` (use_mems); transformers "
        "single-threaded (`TORCH_THREADS`). Each timed call directly follows an untimed call of "
        "the same side. Compile time is ours, first call minus a steady call.",
        "",
        *harness.table(
            "model | mode | new tokens | ours ms/token | HF ms/token | ours tokens/s | "
            "HF tokens/s | speedup | same tokens | our compile s",
            (
                f"{r['model']} | {r['mode']} | {r['new_tokens']} | {r['ours_ms_per_token']:.2f} | "
                f"{r['hf_ms_per_token']:.2f} | {r['ours_tokens_per_s']:.0f} | "
                f"{r['hf_tokens_per_s']:.0f} | {r['speedup']:.1f}x | {r['same_tokens']} | "
                f"{r['ours_compile_s']:.1f}"
                for r in res["rows"]
            ),
        ),
        "",
        *harness.table(
            "model | mode | speedup (min-max) | target | met | "
            "ms/token flatness ours / HF (longest / shortest)",
            (
                f"{s['model']} | {s['mode']} | {s['min_speedup']:.1f}-{s['max_speedup']:.1f}x | "
                f">= {s['target']:.0f}x | {'yes' if s['target_met'] else 'no'} | "
                f"{s['ours_flatness']:.2f} / {s['hf_flatness']:.2f}"
                for s in res["summary"]
            ),
        ),
    ]
    return "\n".join(lines) + "\n"


def decoding_plot(res: dict[str, Any], path: str) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key in dict.fromkeys((r["model"], r["mode"]) for r in res["rows"]):
        mine = [r for r in res["rows"] if (r["model"], r["mode"]) == key]
        x = [r["new_tokens"] for r in mine]
        (line,) = ax.plot(
            x,
            [r["ours_ms_per_token"] for r in mine],
            "-o",
            markersize=3,
            label=f"{key[0]} {key[1]} ours",
        )
        ax.plot(
            x,
            [r["hf_ms_per_token"] for r in mine],
            "--s",
            color=line.get_color(),
            markersize=3,
            label=f"{key[0]} {key[1]} transformers",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("new tokens")
    ax.set_ylabel("ms per token (lower is better)")
    ax.legend(fontsize=6)
    harness.save(fig, path)


SUITE = harness.Suite(
    "decoding", run_decoding, decoding_markdown, decoding_plot, torch_threads=TORCH_THREADS
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the decoding suite with the command line's lengths / models; returns its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", default=None, help="comma-separated new-token counts")
    parser.add_argument("--models", default=None, help="comma-separated: mt5, xlnet")
    parser.add_argument("--n", type=int, default=harness.DEFAULT_N, help="timed rounds")
    parser.add_argument("--out", default=None, help="where decoding.{json,md,png} go")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_list)
    cfg = dict(DECODING)
    if args.new:
        cfg["new_tokens"] = tuple(int(x) for x in args.new.split(","))
    if args.models:
        cfg["models"] = tuple(args.models.split(","))
    suite = dataclasses.replace(SUITE, run=functools.partial(run_decoding, cfg=cfg))
    command = shlex.join(["python", "-m", "xformers_jax.bench.decoding", *argv_list])
    return harness.run_and_write(suite, args.out, args.n, command=command)


if __name__ == "__main__":
    from xformers_jax.bench import host_alloc

    host_alloc.tune_for_xla_cpu()  # as the CLI does, before jax starts its threads
    main()
