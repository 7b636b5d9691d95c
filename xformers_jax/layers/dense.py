"""Dense projections over arbitrary input/output axes, with logical axis names on every param."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def param_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Wraps `init` so the created param is boxed with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class DenseGeneral(nn.Module):
    """A linear map from the trailing `axis` dims of the input to `features` dims.

    Attributes:
      features: output shape, an int or a tuple (e.g. `(heads, head_dim)`).
      kernel_axes: logical names of the kernel, `len(axis) + len(features)` of them.
      axis: input axes contracted (negative indices, trailing).
      use_bias: adds a bias of shape `features` named by the trailing kernel axes.
      dtype: compute dtype; the inputs and params are cast to it.
      param_dtype: storage dtype of the params.
      kernel_init: initializer of the kernel, called with the flattened 2-D shape semantics of HF
        (normal with the config's `initializer_range` by default).

    Input `[..., *in_shape]` -> output `[..., *features]`.
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _as_tuple(self.features)
        axis = tuple(a if a < 0 else a - x.ndim for a in _as_tuple(self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        if len(self.kernel_axes) != len(in_shape) + len(features):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} must name {len(in_shape)} input and "
                f"{len(features)} output dims"
            )
        kernel = self.param(
            "kernel",
            param_init(self.kernel_init, self.kernel_axes),
            in_shape + features,
            self.param_dtype,
        )
        kernel = jnp.asarray(kernel, self.dtype)
        x = jnp.asarray(x, self.dtype)
        contract_x = tuple(x.ndim + a for a in axis)
        y = jax.lax.dot_general(
            x,
            kernel,
            ((contract_x, tuple(range(len(axis)))), ((), ())),
            preferred_element_type=None,
        )
        if self.use_bias:
            bias_axes = self.kernel_axes[len(in_shape) :]
            bias = self.param(
                "bias", param_init(self.bias_init, bias_axes), features, self.param_dtype
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y
