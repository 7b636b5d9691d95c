"""Scaled dot-product attention with boolean masks, additive biases and head masks.

Layouts: queries `[batch, q_len, heads, head_dim]`, keys/values `[batch, kv_len, heads, head_dim]`,
masks broadcastable to `[batch, heads, q_len, kv_len]` (True = attend), scores in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xformers_jax.layers.dense import add_bias

# Large negative instead of -inf so fully masked rows (padding queries) stay finite.
DEFAULT_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def padding_mask(query_mask: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """`[b, q]`, `[b, k]` 0/1 masks -> boolean `[b, 1, q, k]`; only the key side is required."""
    key_mask = query_mask if key_mask is None else key_mask
    return (key_mask[:, None, None, :] > 0) & jnp.ones((1, 1, query_mask.shape[-1], 1), dtype=bool)


def causal_mask(q_len: int, kv_len: int | None = None, offset: jax.Array | int = 0) -> jax.Array:
    """Boolean `[1, 1, q, k]`: query i (at absolute position offset+i) sees keys <= its position."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    head_mask: jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """softmax(scale * (q.k + bias), masked) . v.

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key: `[batch, kv_len, heads, head_dim]`.
      value: `[batch, kv_len, heads, head_dim]`.
      mask: boolean, broadcastable to `[batch, heads, q_len, kv_len]`; False entries are excluded.
      bias: additive score bias (relative positions), same broadcast shape, added before scaling
        when `scale` multiplies the whole score (as BERT-style relative_key does).
      head_mask: `[heads]` or `[batch, heads]` multiplier on the probabilities (HF's head_mask).
      scale: defaults to `head_dim ** -0.5`; pass 1.0 for T5.
      dropout_rate / dropout_rng / deterministic: dropout on the probabilities.

    Returns:
      `([batch, q_len, heads, head_dim] output, [batch, heads, q_len, kv_len] float32 probs)`.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = add_bias(scores, bias.astype(jnp.float32))
    scores = scores * scale
    if mask is not None:
        scores = jnp.where(mask, scores, DEFAULT_MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    if head_mask is not None:
        hm = head_mask.astype(jnp.float32)
        hm = hm[None, :, None, None] if hm.ndim == 1 else hm[:, :, None, None]
        probs = probs * hm
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), value.astype(dtype))
    return out, probs
