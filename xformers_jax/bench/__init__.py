"""Benchmarks, outside the library proper: `xformers-jax bench --suite train | yoso | decoding |
mlm_logits | all` (`suites`).

  train.py      every family's train step and forward vs transformers' PyTorch
  scaling.py    YOSO attention vs length (`yoso`), large-vocabulary MLM losses (`mlm_logits`)
  decoding.py   generation ms/token vs transformers (also `python -m xformers_jax.bench.decoding`)
  timing.py     how every suite times a case: warm-up, alternation, medians
  harness.py    devices, XLA memory, tables, plots and outputs the suites share
  host_alloc.py glibc malloc settings for XLA:CPU runs (the CLI applies them first thing)

Nothing is imported here: the CLI imports `host_alloc` before jax or numpy start any thread.
"""
