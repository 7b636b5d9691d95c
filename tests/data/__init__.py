"""Tests of `xformers_jax.data`."""
