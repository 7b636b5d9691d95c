"""Tests of `xformers_jax.layers`."""
