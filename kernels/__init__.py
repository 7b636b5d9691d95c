"""Pallas kernels of xformers_jax, installed as the package ``xformers_jax.kernels``.

This directory is never importable as a top-level ``kernels`` (a different PyPI package has that
name), so every module in it imports its siblings relatively. Models reach the kernels only
through a config switch (``attention_impl: 'xla' | 'pallas'``).

Subpackages:
  yoso: YOSO attention (fast Hadamard LSH hash, LSH cumulation, custom-VJP attention ops).
"""
