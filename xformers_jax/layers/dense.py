"""Dense projections over arbitrary input/output axes, with logical axis names on every param."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def param_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Wraps `init` so the created param is boxed with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def _contract(x: jax.Array, kernel: jax.Array, n_contract: int) -> jax.Array:
    """`x [..., *in] @ kernel [*in, *out] -> [..., *out]` over the trailing `n_contract` dims."""
    contract_x = tuple(range(x.ndim - n_contract, x.ndim))
    dims = ((contract_x, tuple(range(n_contract))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims)


_CPU_BACKWARD = [True]


@contextlib.contextmanager
def portable_backward():
    """Traces with the plain (backend-independent) backward of `DenseGeneral` and `add_bias`.

    The CPU variants below hide their dots from `jax.checkpoint` policies (a custom VJP is one
    opaque call); memory estimates made on CPU for an accelerator trace inside this context.
    """
    _CPU_BACKWARD.append(False)
    try:
        yield
    finally:
        _CPU_BACKWARD.pop()


def _cpu_backward() -> bool:
    return _CPU_BACKWARD[-1] and jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract_cpu(x: jax.Array, kernel: jax.Array, n_contract: int) -> jax.Array:
    """`_contract` with a backward pass laid out for XLA's CPU backend (same values)."""
    return _contract(x, kernel, n_contract)


def _contract_cpu_fwd(x, kernel, n_contract):
    return _contract(x, kernel, n_contract), (x, kernel)


def _contract_cpu_bwd(n_contract, res, dy):
    x, kernel = res
    # XLA's CPU dots want the weight gradient's token axis minor, so XLA fuses the producer of
    # `dy` (e.g. the activation's backward) into a transposing copy that reads every input with
    # a power-of-two stride; cache-set conflicts made that one fusion the slowest op of a train
    # step (2-3x the matmuls). Written as `x^T dy` (x on the left), XLA lays the weight gradient
    # out without that copy.
    n_batch = x.ndim - n_contract
    out_k = tuple(range(n_contract, kernel.ndim))
    dx = jax.lax.dot_general(dy, kernel, ((tuple(range(n_batch, dy.ndim)), out_k), ((), ())))
    batch = tuple(range(n_batch))
    if x.size <= dy.size:
        dk = jax.lax.dot_general(x, dy, ((batch, batch), ((), ())))
    else:
        # XLA's CPU dot copies the operand whose contracted (token) axis is not minor: transpose
        # the smaller one. For a projection down (an FFN's output) that is `dy`, then the
        # kernel-sized result, instead of the `[tokens, ffn]` activation (6 ms per BEiT layer).
        dk_t = jax.lax.dot_general(dy, x, ((batch, batch), ((), ())))
        n_out = kernel.ndim - n_contract
        dk = dk_t.transpose(*range(n_out, kernel.ndim), *range(n_out))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


contract_cpu.defvjp(_contract_cpu_fwd, _contract_cpu_bwd)


@jax.custom_vjp
def _add_bias_cpu(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias


def _add_bias_cpu_fwd(y, bias):
    return y + bias, bias.shape


def _add_bias_cpu_bwd(shape, dy):
    # The bias gradient sums `dy` over its leading dims. XLA's CPU reduction over a major axis
    # is up to ~40x slower than the same sum written as a matrix-vector product (182 ms vs 4.6 ms
    # for [1024, 32000] -> [32000]): an LM head's bias made it the slowest op of a train step.
    rows = dy.reshape(-1, math.prod(shape))
    dbias = jnp.ones((rows.shape[0],), rows.dtype) @ rows
    return dy, dbias.reshape(shape)


_add_bias_cpu.defvjp(_add_bias_cpu_fwd, _add_bias_cpu_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` with `bias` broadcast over leading dims of `y` (e.g. `[heads, q, k]` onto
    `[batch, heads, q, k]`). Same values; on CPU the bias gradient is a matrix-vector product."""
    suffix = lambda b: b.shape == y.shape[y.ndim - b.ndim :]  # noqa: E731
    while bias.ndim and bias.shape[0] == 1 and not suffix(bias):
        bias = bias[0]
    if not _cpu_backward() or bias.dtype != y.dtype or not suffix(bias):
        return y + bias
    return _add_bias_cpu(y, bias)


@jax.custom_vjp
def _residual_cpu(x: jax.Array) -> jax.Array:
    return x


def _residual_cpu_fwd(x):
    return x, None


def _residual_cpu_bwd(_, dx):
    # XLA's CPU pipeline drops optimization barriers before fusion, but does not fuse across a
    # conditional: its operand is materialised. Both branches return `dx` (the `+ 0` only keeps
    # the two branch computations distinct, or XLA folds the conditional away); the predicate
    # is data-dependent (is the first element NaN) so it cannot be constant-folded. Sharded over
    # several CPU devices, the predicate costs one scalar all-reduce.
    first = dx[(0,) * dx.ndim]
    return (jax.lax.cond(first != first, lambda d: d + 0, lambda d: d, dx),)


_residual_cpu.defvjp(_residual_cpu_fwd, _residual_cpu_bwd)


def residual(x: jax.Array) -> jax.Array:
    """Identity on a block's residual stream; on CPU its gradient is materialised here.

    Backward through a stack of blocks, the residual stream's gradient is a chain of adds (each
    layer adds its branches' input gradients). XLA's CPU fusion treats adds as cheap and
    duplicates the chain into every consumer, so a layer's fusions recompute the gradients of
    all the layers above it (fusions of up to 70 operands in a 4-layer BEiT train step, ~10% of
    the step). Called once or twice per block, this cuts the chain there. Same values.
    """
    return _residual_cpu(x) if _cpu_backward() else x


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
        contract = contract_cpu if _cpu_backward() else _contract
        y = contract(x, kernel, len(axis))
        if self.use_bias:
            bias_axes = self.kernel_axes[len(in_shape) :]
            bias = self.param(
                "bias", param_init(self.bias_init, bias_axes), features, self.param_dtype
            )
            y = add_bias(y, jnp.asarray(bias, self.dtype))
        return y
