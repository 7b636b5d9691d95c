"""Tests of `xformers_jax.tasks`."""
