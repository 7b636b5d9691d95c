"""Dense projections over arbitrary input/output axes, with logical axis names on every param.

The plain autodiff backward everywhere; on the CPU backend the one of `cpu_backward` (same values,
XLA:CPU-friendly layouts), switched off for a trace by `cpu_backward.portable_backward()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers import cpu_backward

Initializer = Callable[..., jax.Array]


def param_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Wraps `init` so the created param is boxed with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def _contract(x: jax.Array, kernel: jax.Array, n_contract: int) -> jax.Array:
    """`x [..., *in] @ kernel [*in, *out] -> [..., *out]` over the trailing `n_contract` dims."""
    contract_x = tuple(range(x.ndim - n_contract, x.ndim))
    dims = ((contract_x, tuple(range(n_contract))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` with `bias` broadcast over leading dims of `y` (e.g. `[heads, q, k]` onto
    `[batch, heads, q, k]`). Same values; on CPU the bias gradient is a matrix-vector product
    (`cpu_backward.add_bias`)."""
    suffix = lambda b: b.shape == y.shape[y.ndim - b.ndim :]  # noqa: E731
    while bias.ndim and bias.shape[0] == 1 and not suffix(bias):
        bias = bias[0]
    if cpu_backward.enabled() and bias.dtype == y.dtype and suffix(bias):
        return cpu_backward.add_bias(y, bias)
    return y + bias


def residual(x: jax.Array) -> jax.Array:
    """Identity on a block's residual stream; on CPU its gradient is materialised here.

    Backward through a stack of blocks, the residual stream's gradient is a chain of adds (each
    layer adds its branches' input gradients). XLA's CPU fusion treats adds as cheap and
    duplicates the chain into every consumer, so a layer's fusions recompute the gradients of
    all the layers above it (fusions of up to 70 operands in a 4-layer BEiT train step, ~10% of
    the step). Called once or twice per block, this cuts the chain there (`cpu_backward.residual`,
    a `lax.cond` in the backward). Same values.
    """
    return cpu_backward.residual(x) if cpu_backward.enabled() else x


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
        if axis != tuple(range(-len(axis), 0)):
            x = jnp.moveaxis(x, axis, tuple(range(-len(axis), 0)))
        contract = cpu_backward.contract if cpu_backward.enabled() else _contract
        y = contract(x, kernel, len(axis))
        if self.use_bias:
            bias_axes = self.kernel_axes[len(in_shape) :]
            bias = self.param(
                "bias", param_init(self.bias_init, bias_axes), features, self.param_dtype
            )
            y = add_bias(y, jnp.asarray(bias, self.dtype))
        return y
