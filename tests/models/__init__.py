"""Tests of `xformers_jax.models`."""
