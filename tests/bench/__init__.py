"""Tests of `xformers_jax.bench`."""
