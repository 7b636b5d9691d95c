"""Tests of `xformers_jax.kernels` (the Pallas kernels under `kernels/`)."""
