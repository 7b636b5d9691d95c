"""XLNet greedy generation: our jitted loop vs transformers' `generate`, time per token.

Run: `python -m xformers_jax.bench_decoding [--new 25,50,100]`. A random-init tiny XLNet (the one
the tests use) generates from a `[2, 5]` prompt; for each number of new tokens we report the
median milliseconds per token (after a warm-up call, so our compile time is excluded and
printed apart) for ours and for transformers with `use_mems=False` (the same computation) and
`use_mems=True` (its default, re-using mems). A report, not an assertion.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

TINY = dict(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0,
            pad_token_id=5, bos_token_id=1, eos_token_id=2)  # fmt: skip


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_xlnet_generation(new_tokens=(25, 50, 100), reps: int = 3) -> list[dict]:
    """Times greedy XLNet generation; returns one row per length (ms per token, compile s)."""
    import torch
    import transformers

    import xformers_jax as xj

    torch.manual_seed(0)
    hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**TINY)).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = xj.from_pretrained(path)
    ids = np.random.RandomState(0).randint(6, 100, size=(2, 5))
    ids_t = torch.tensor(ids)
    rows = []
    for n in new_tokens:
        t0 = time.perf_counter()
        ours.generate(ids, max_new_tokens=n)  # compiles once for this length
        compile_s = time.perf_counter() - t0

        def theirs(use_mems, n=n):
            with torch.no_grad():
                hf.generate(ids_t, max_new_tokens=n, do_sample=False, use_mems=use_mems,
                            pad_token_id=5)  # fmt: skip

        row = dict(
            new_tokens=n,
            ours_ms=1e3 * _median_s(lambda n=n: ours.generate(ids, max_new_tokens=n), reps) / n,
            hf_no_mems_ms=1e3 * _median_s(lambda: theirs(False), reps) / n,
            hf_mems_ms=1e3 * _median_s(lambda: theirs(True), reps) / n,
            ours_compile_s=compile_s,
        )
        rows.append(row)
        print(
            f"{n:4d} tokens: ours {row['ours_ms']:.2f} ms/token | transformers use_mems=False "
            f"{row['hf_no_mems_ms']:.2f} | use_mems=True {row['hf_mems_ms']:.2f} | "
            f"our compile {compile_s:.1f} s",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", default="25,50,100", help="comma-separated new-token counts")
    args = parser.parse_args()
    bench_xlnet_generation(tuple(int(x) for x in args.new.split(",")))
