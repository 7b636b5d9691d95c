"""Scaled dot-product attention with boolean masks, additive biases and head masks.

Layouts: queries `[batch, q_len, heads, head_dim]`, keys/values `[batch, kv_len, heads, head_dim]`,
masks broadcastable to `[batch, heads, q_len, kv_len]` (True = attend), scores in float32.

`attention` picks the kernel (a model config's `attention_kernel`):
  einsum  `dot_product_attention`: the scores and probabilities as `[batch, heads, q, k]`
          float32 arrays (the reference; on CPU the fastest path, with its CPU custom VJPs).
  flash   a fused kernel that never materialises them (`layers.flash`): the Pallas TPU
          flash-attention kernel on TPU (interpreted on CPU, for tests), cuDNN on GPU.
  auto    flash on TPU, and on GPU for bfloat16 / float16 models; einsum otherwise.
A call that needs what a fused kernel cannot give takes einsum whatever the choice: the
probabilities (`output_attentions`), a `head_mask`, or dropout on the probabilities (training
with `attention_probs_dropout_prob` / `dropout_rate` > 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from xformers_jax.layers import flash
from xformers_jax.layers.dense import add_bias

KERNELS = ("einsum", "flash", "auto")

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


@struct.dataclass
class Mask:
    """A structured attention mask: `[batch, kv_len]` key mask (1 = attend; None = all keys)
    and a causal flag (query i sees keys <= i; needs q_len == kv_len). The fused kernels take it
    as segment ids and their causal mode; `dense` is the boolean mask `dot_product_attention`
    takes, the same one the models built before."""

    key: jax.Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)

    def dense(self, q_len: int, kv_len: int) -> jax.Array | None:
        """Boolean `[batch or 1, 1, q_len, kv_len]` (True = attend), or None (no mask)."""
        mask = None
        if self.key is not None:
            mask = padding_mask(jnp.ones((self.key.shape[0], q_len), jnp.int32), self.key)
        if self.causal:
            causal = causal_mask(q_len, kv_len)
            mask = causal if mask is None else mask & causal
        return mask


def check_kernel(kernel: str) -> str:
    """A config's `attention_kernel`, validated (a clear error naming the choices)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention_kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def target_platform() -> str:
    """The platform the traced computation is for: that of the current mesh's devices (a TPU
    topology's, when compiling ahead of time on a CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_kernel(
    kernel: str, *, need_probs: bool = False, head_mask: Any = None, dropout: bool = False,
    dtype: Any = jnp.float32,
) -> str:  # fmt: skip
    """`einsum` or `flash`: what `attention` runs for `kernel` on the target platform."""
    check_kernel(kernel)
    if kernel == "einsum" or need_probs or head_mask is not None or dropout:
        return "einsum"
    if kernel == "flash":
        return "flash"
    platform = target_platform()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "flash" if platform == "tpu" or (platform == "gpu" and half) else "einsum"


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    kernel: str = "einsum",
    mask: Mask | jax.Array | None = None,
    bias: jax.Array | None = None,
    head_mask: jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    need_probs: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array | None]:
    """softmax(scale * (q.k + bias), masked) . v with the kernel `kernel` (see the module doc).

    Args: as `dot_product_attention`, plus
      kernel: `einsum` | `flash` | `auto`.
      mask: a `Mask` (what the fused kernels take as is) or a boolean array broadcastable to
        `[batch, heads, q_len, kv_len]` (folded into the bias by a fused kernel).
      need_probs: the probabilities are returned (only einsum computes them).

    Returns:
      (`[batch, q_len, heads, head_dim]` output, `[batch, heads, q_len, kv_len]` float32 probs
      from einsum, None from a fused kernel).
    """
    dropout = not deterministic and dropout_rate > 0.0
    chosen = resolve_kernel(
        kernel, need_probs=need_probs, head_mask=head_mask, dropout=dropout, dtype=dtype
    )
    q_len, kv_len = query.shape[1], key.shape[1]
    if chosen == "einsum":
        if isinstance(mask, Mask):
            mask = mask.dense(q_len, kv_len)
        return dot_product_attention(
            query, key, value, mask=mask, bias=bias, head_mask=head_mask, scale=scale,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic,
            dtype=dtype,
        )  # fmt: skip
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    key_mask, causal = None, False
    if isinstance(mask, Mask):
        key_mask, causal = mask.key, mask.causal
    elif mask is not None:  # any other mask: an additive bias
        masked = jnp.where(mask, 0.0, flash.MASKED).astype(jnp.float32)
        bias = masked if bias is None else bias.astype(jnp.float32) + masked
    query, key, value = (t.astype(dtype) for t in (query, key, value))
    if target_platform() == "gpu":
        out = flash.gpu_flash_attention(
            query, key, value, key_mask=key_mask, causal=causal, bias=bias, scale=scale
        )
    else:
        out = flash.tpu_flash_attention(
            query, key, value, key_mask=key_mask, causal=causal, bias=bias, scale=scale,
            interpret=target_platform() != "tpu",
        )  # fmt: skip
    return out.astype(dtype), None
