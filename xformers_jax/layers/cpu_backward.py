"""Backward passes laid out for XLA's CPU backend, behind one switch.

XLA:CPU turns a few plain autodiff patterns into its slowest ops (transposing copies before
weight-gradient dots, bias gradients as major-axis reductions, the residual stream's gradient
chain duplicated into every fusion). The custom VJPs here compute the same values with layouts
XLA:CPU handles well. `layers.dense` (`DenseGeneral`, `add_bias`, `residual`) takes them only
when `enabled()`: on the CPU backend, outside `portable_backward()`, and unless the environment
sets `XFORMERS_JAX_PORTABLE_BACKWARD=1`. On TPU and GPU the backward is always the plain one.

A custom VJP is one opaque call to `jax.checkpoint` policies, and its layout choices are CPU
ones: memory estimates and AOT compiles for an accelerator made from a CPU host trace inside
`portable_backward()` (as `memory.estimate` does). The test suite runs both paths: by default the
CPU one, under `--portable-backward` (or the environment variable) the portable one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp

ENV = "XFORMERS_JAX_PORTABLE_BACKWARD"
_PORTABLE: list[bool] = []  # one entry per open portable_backward()


@contextlib.contextmanager
def portable_backward():
    """Traces inside take the plain (backend-independent) backward, whatever the backend."""
    _PORTABLE.append(True)
    try:
        yield
    finally:
        _PORTABLE.pop()


def enabled() -> bool:
    """Whether what is traced now takes the CPU backward passes of this module."""
    if _PORTABLE or os.environ.get(ENV, "").strip() not in ("", "0"):
        return False
    return jax.default_backend() == "cpu"


def _dot(x: jax.Array, kernel: jax.Array, n_contract: int) -> jax.Array:
    """`x [..., *in] @ kernel [*in, *out] -> [..., *out]` over the trailing `n_contract` dims."""
    contract_x = tuple(range(x.ndim - n_contract, x.ndim))
    return jax.lax.dot_general(x, kernel, ((contract_x, tuple(range(n_contract))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x: jax.Array, kernel: jax.Array, n_contract: int) -> jax.Array:
    """`_dot` (`DenseGeneral`'s contraction, same values) with a backward pass laid out for
    XLA's CPU backend."""
    return _dot(x, kernel, n_contract)


def _contract_fwd(x, kernel, n_contract):
    return _dot(x, kernel, n_contract), (x, kernel)


def _contract_bwd(n_contract, res, dy):
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


contract.defvjp(_contract_fwd, _contract_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` for a `bias` of `y`'s trailing shape and dtype; the bias gradient is a
    matrix-vector product."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, bias.shape


def _add_bias_bwd(shape, dy):
    # The bias gradient sums `dy` over its leading dims. XLA's CPU reduction over a major axis
    # is up to ~40x slower than the same sum written as a matrix-vector product (182 ms vs 4.6 ms
    # for [1024, 32000] -> [32000]): an LM head's bias made it the slowest op of a train step.
    rows = dy.reshape(-1, math.prod(shape))
    dbias = jnp.ones((rows.shape[0],), rows.dtype) @ rows
    return dy, dbias.reshape(shape)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def residual(x: jax.Array) -> jax.Array:
    """Identity whose gradient is materialised (see `dense.residual`)."""
    return x


def _residual_fwd(x):
    return x, None


def _residual_bwd(_, dx):
    # XLA's CPU pipeline drops optimization barriers before fusion, but does not fuse across a
    # conditional: its operand is materialised. Both branches return `dx` (the `+ 0` only keeps
    # the two branch computations distinct, or XLA folds the conditional away); the predicate
    # is data-dependent (is the first element NaN) so it cannot be constant-folded. Sharded over
    # several CPU devices, the predicate costs one scalar all-reduce.
    first = dx[(0,) * dx.ndim]
    return (jax.lax.cond(first != first, lambda d: d + 0, lambda d: d, dx),)


residual.defvjp(_residual_fwd, _residual_bwd)
