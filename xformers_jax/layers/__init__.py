"""Family-agnostic building blocks; every param carries logical axis names."""

from xformers_jax.layers.attention import (
    DEFAULT_MASK_VALUE,
    Mask,
    causal_mask,
    dot_product_attention,
    padding_mask,
)
from xformers_jax.layers.cpu_backward import portable_backward
from xformers_jax.layers.dense import DenseGeneral, param_init, residual
from xformers_jax.layers.embeddings import Embed
from xformers_jax.layers.mlp import MLP, get_activation
from xformers_jax.layers.norms import LayerNorm, RMSNorm

__all__ = [
    "DEFAULT_MASK_VALUE",
    "MLP",
    "DenseGeneral",
    "Embed",
    "LayerNorm",
    "Mask",
    "RMSNorm",
    "causal_mask",
    "dot_product_attention",
    "get_activation",
    "padding_mask",
    "param_init",
    "portable_backward",
    "residual",
]
