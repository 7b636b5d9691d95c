"""Token / position embedding tables that can also project back onto the vocabulary (tied heads)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers.dense import Initializer, param_init


class Embed(nn.Module):
    """A `[num_embeddings, features]` lookup table.

    Attributes:
      num_embeddings: table rows (vocabulary or position count).
      features: width of an embedding.
      axes: logical names of the table, e.g. `('vocab', 'embed')`.
    """

    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(0.02)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            param_init(self.embedding_init, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """`[...]` int ids -> `[..., features]`."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{self.name}: ids must be integers, got {ids.dtype}")
        return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """`[..., features]` -> `[..., num_embeddings]`: the transposed table (tied outputs)."""
        x = jnp.asarray(x, self.dtype)
        return jnp.einsum("...d,vd->...v", x, jnp.asarray(self.embedding, self.dtype))
