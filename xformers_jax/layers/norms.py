"""Normalisation layers, computed in float32 whatever the compute dtype."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers.dense import param_init


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with `scale` and `bias` named `('embed',)`."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        x32 = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = self.param(
            "scale",
            param_init(nn.initializers.ones, (self.axis_name,)),
            (features,),
            self.param_dtype,
        )
        y = y * jnp.asarray(scale, jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                param_init(nn.initializers.zeros, (self.axis_name,)),
                (features,),
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, jnp.float32)
        return jnp.asarray(y, self.dtype)


class RMSNorm(nn.Module):
    """T5-style RMS norm: no mean subtraction, no bias, float32 variance."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        x32 = jnp.asarray(x, jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.epsilon)
        scale = self.param(
            "scale",
            param_init(nn.initializers.ones, (self.axis_name,)),
            (features,),
            self.param_dtype,
        )
        return jnp.asarray(y * jnp.asarray(scale, jnp.float32), self.dtype)
