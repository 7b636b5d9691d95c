"""Generation time per token: `python -m xformers_jax.bench_decoding`, the `decoding` bench suite.

Same as `xformers-jax bench --suite decoding` (see `bench_scaling`): MT5ForConditionalGeneration
greedy and beam search and XLNetLMHeadModel greedy, ours vs transformers' `generate` (XLNet with
its default `use_mems`), ms per token and tokens/s per output length, our compile time apart.
Options pick the output lengths, the models and the rounds:

  python -m xformers_jax.bench_decoding [--new 16,32,64,128] [--models mt5,xlnet] [--n 5]
                                        [--out bench_out]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from xformers_jax import bench_scaling, host_alloc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the decoding suite with the command line's lengths / models; returns its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", default=None, help="comma-separated new-token counts")
    parser.add_argument("--models", default=None, help="comma-separated: mt5, xlnet")
    parser.add_argument("--n", type=int, default=bench_scaling.DEFAULT_N, help="timed rounds")
    parser.add_argument("--out", default=None, help="where decoding.{json,md,png} go")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_list)
    cfg = dict(bench_scaling.DECODING)
    if args.new:
        cfg["new_tokens"] = tuple(int(x) for x in args.new.split(","))
    if args.models:
        cfg["models"] = tuple(args.models.split(","))
    saved = bench_scaling.DECODING
    bench_scaling.DECODING = cfg
    try:
        command = shlex.join(["python", "-m", "xformers_jax.bench_decoding", *argv_list])
        return bench_scaling.run_suite("decoding", args.out, args.n, command=command)
    finally:
        bench_scaling.DECODING = saved


if __name__ == "__main__":
    host_alloc.tune_for_xla_cpu()  # as the CLI does, before jax starts its threads
    main()
