"""YOSO attention ops with their custom VJPs (Zeng et al. 2021, "You Only Sample (Almost) Once").

YOSO replaces softmax attention by the Bernoulli "collision" kernel of LSH with ``tau``-bit
sign-random-projection codes, whose expectation for unit vectors is

    E[i, j] = (1 - acos(q_i . k_j) / pi) ** tau.

Two ops, matching transformers' ``YosoCumulation`` / ``YosoLSHCumulation`` autograd functions:

``yoso_expectation_attention``: ``out = (E * masks) @ v``, dense O(Lq * Lk). Its backward is
  YOSO's surrogate, not the exact derivative of E: with ``W = (grad_out @ v^T) * E``,
  ``grad_q = W @ (tau / 2 * k)``, ``grad_k = W^T @ (tau / 2 * q)``, ``grad_v = E^T @ grad_out``
  (the paper approximates dE/d(q.k) by ``tau / 2 * E``).
``yoso_lsh_attention``: the sampled estimate ``out = (C / num_hash) @ v``, where ``C[i, j]``
  counts the hash functions under which q_i and k_j collide, in O(num_hash * L) with the fast
  Hadamard hash and the LSH cumulation. Its backward is the same surrogate with ``E`` replaced by
  the LSH estimate (``lsh_backward=True``, via the weighted cumulation, linear cost) or by the
  exact dense ``E`` (``lsh_backward=False``). ``grad_v`` under ``lsh_backward=True`` is the true
  gradient of the sampled output.

Layout: ``q, k`` ``[*batch, length, dim]`` and ``v`` ``[*batch, key_length, value_dim]`` with any
leading batch axes (e.g. ``[batch, heads]``); masks ``[*batch, length]`` or anything
broadcastable to it (nonzero keeps), or None for no masking. ``q`` and ``k`` are assumed
L2-normalised (YOSO normalises them before attention); nothing here renormalises.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from . import cumulation, hadamard
from ._common import HIGHEST, check_impl


def _prepare(q, k, v, q_mask, k_mask):
    """Validates ``[*batch, L, D]`` inputs and flattens them to ``[batch, L, D]`` float32 masks.

    Returns:
      ``(q, k, v, q_mask, k_mask)`` flattened, and the leading batch shape.
    """
    if q.ndim < 3:
        raise ValueError(f"q must be [*batch, length, dim] with a batch axis, got {q.shape}")
    lead, dim = q.shape[:-2], q.shape[-1]
    if k.ndim != q.ndim or k.shape[:-2] != lead or k.shape[-1] != dim:
        want = ", ".join(map(str, (*lead, "key_length", dim)))
        raise ValueError(f"k must be [{want}] like q, got {k.shape}")
    if v.ndim != q.ndim or v.shape[:-1] != k.shape[:-1]:
        want = ", ".join(map(str, (*k.shape[:-1], "value_dim")))
        raise ValueError(f"v must be [{want}] like k, got {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")

    def flat_mask(name, mask, shape):
        if mask is None:
            return jnp.ones((math.prod(lead), shape[-1]), jnp.float32)
        mask = jnp.asarray(mask)
        try:
            if jnp.broadcast_shapes(mask.shape, shape) != shape:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{name} must be broadcastable to {list(shape)}, got {list(mask.shape)}"
            ) from None
        return (jnp.broadcast_to(mask, shape) != 0).astype(jnp.float32).reshape(-1, shape[-1])

    q_mask = flat_mask("q_mask", q_mask, q.shape[:-1])
    k_mask = flat_mask("k_mask", k_mask, k.shape[:-1])
    flat = lambda x: x.reshape(-1, *x.shape[-2:])
    return flat(q), flat(k), flat(v), q_mask, k_mask, lead


def expectation_matrix(q, k, q_mask, k_mask, hash_code_len: int) -> jax.Array:
    """Masked YOSO expectation ``(1 - acos(q . k) / pi) ** tau``.

    Args:
      q: ``[batch, query_length, dim]`` unit vectors.
      k: ``[batch, key_length, dim]`` unit vectors.
      q_mask: ``[batch, query_length]`` float 0/1.
      k_mask: ``[batch, key_length]`` float 0/1.
      hash_code_len: tau.

    Returns:
      float32 ``[batch, query_length, key_length]``.
    """
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    cos = jnp.einsum("bqd,bkd->bqk", q, k, precision=HIGHEST)
    # Rounding can push |q . k| of unit vectors just past 1, where acos is NaN (transformers
    # returns NaN there); clipping changes nothing else.
    expectation = (1.0 - jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / math.pi) ** hash_code_len
    return expectation * q_mask[:, :, None] * k_mask[:, None, :]


def _expectation_grads(q, k, v, expectation, grad, hash_code_len):
    """YOSO's surrogate backward of ``expectation @ v`` (transformers' ``YosoCumulation``)."""
    f32 = lambda x: x.astype(jnp.float32)
    grad, scale = f32(grad), hash_code_len / 2
    weighted = jnp.einsum("bqd,bkd->bqk", grad, f32(v), precision=HIGHEST) * expectation
    grad_q = jnp.einsum("bqk,bkd->bqd", weighted, scale * f32(k), precision=HIGHEST)
    grad_k = jnp.einsum("bqk,bqd->bkd", weighted, scale * f32(q), precision=HIGHEST)
    grad_v = jnp.einsum("bqk,bqd->bkd", expectation, grad, precision=HIGHEST)
    return grad_q.astype(q.dtype), grad_k.astype(k.dtype), grad_v.astype(v.dtype)


# ------------------------------------------------------------------------------------------------
# Expectation attention
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expectation_attention(q, k, v, q_mask, k_mask, hash_code_len):
    expectation = expectation_matrix(q, k, q_mask, k_mask, hash_code_len)
    out = jnp.einsum("bqk,bkd->bqd", expectation, v.astype(jnp.float32), precision=HIGHEST)
    return out.astype(v.dtype)


def _expectation_fwd(q, k, v, q_mask, k_mask, hash_code_len):
    out = _expectation_attention(q, k, v, q_mask, k_mask, hash_code_len)
    # Recompute the [Lq, Lk] expectation in the backward instead of storing it.
    return out, (q, k, v, q_mask, k_mask)


def _expectation_bwd(hash_code_len, residuals, grad):
    q, k, v, q_mask, k_mask = residuals
    expectation = expectation_matrix(q, k, q_mask, k_mask, hash_code_len)
    grads = _expectation_grads(q, k, v, expectation, grad, hash_code_len)
    return (*grads, jnp.zeros_like(q_mask), jnp.zeros_like(k_mask))


_expectation_attention.defvjp(_expectation_fwd, _expectation_bwd)


def yoso_expectation_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_mask: jax.Array | None,
    k_mask: jax.Array | None,
    hash_code_len: int,
) -> jax.Array:
    """YOSO-E: dense expectation attention with YOSO's surrogate gradient.

    Args:
      q: ``[*batch, query_length, dim]``, L2-normalised.
      k: ``[*batch, key_length, dim]``, L2-normalised.
      v: ``[*batch, key_length, value_dim]``.
      q_mask: ``[*batch, query_length]`` (or broadcastable; nonzero keeps) or None.
      k_mask: ``[*batch, key_length]`` (or broadcastable) or None.
      hash_code_len: tau, the exponent of the collision probability.

    Returns:
      ``[*batch, query_length, value_dim]`` in ``v.dtype``; masked queries give 0.
    """
    if isinstance(hash_code_len, bool) or not isinstance(hash_code_len, int) or hash_code_len < 1:
        raise ValueError(f"hash_code_len must be a positive int, got {hash_code_len!r}")
    q, k, v, q_mask, k_mask, lead = _prepare(q, k, v, q_mask, k_mask)
    out = _expectation_attention(q, k, v, q_mask, k_mask, hash_code_len)
    return out.reshape(*lead, *out.shape[1:])


# ------------------------------------------------------------------------------------------------
# LSH attention
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LshConfig:
    """Static (hashable) configuration of one ``yoso_lsh_attention`` call."""

    num_hash: int
    hash_code_len: int
    lsh_backward: bool
    impl: str
    interpret: bool
    hash_block_sizes: hadamard.BlockSizes | None
    cumulation_block_sizes: cumulation.BlockSizes | None

    def cumulate(self, fn, *args):
        return fn(
            *args,
            self.hash_code_len,
            impl=self.impl,
            block_sizes=self.cumulation_block_sizes,
            interpret=self.interpret,
        )

    def hash(self, q, k, params):
        """Codes of q and k, ``[batch, num_hash, q_len]`` and ``[batch, num_hash, k_len]``.

        One call over the positions of both (the hash is per vector): one pass, one kernel
        launch. Both hashes are bit-identical to ``fast_hash_reference``, so impls agree exactly.
        """
        x = jnp.concatenate([q.astype(jnp.float32), k.astype(jnp.float32)], axis=1)
        kwargs = dict(num_hash=self.num_hash, hash_code_len=self.hash_code_len)
        if self.impl == "xla":
            codes = hadamard.fast_hash_xla(x, params, **kwargs)
        else:
            codes = hadamard.fast_hash(
                x, params, block_sizes=self.hash_block_sizes, interpret=self.interpret, **kwargs
            )
        return codes[:, :, : q.shape[1]], codes[:, :, q.shape[1] :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsh_attention(config: _LshConfig, q, k, v, q_mask, k_mask, params):
    return _lsh_fwd(config, q, k, v, q_mask, k_mask, params)[0]


def _lsh_fwd(config, q, k, v, q_mask, k_mask, params):
    # The same diagonals hash q and k: collisions are only meaningful under one hash function.
    q_code, k_code = config.hash(q, k, params)
    out = config.cumulate(cumulation.lsh_cumulation, q_mask, q_code, k_mask, k_code, v)
    return out, (q, k, v, q_mask, k_mask, q_code, k_code, params)


def _lsh_bwd(config, residuals, grad):
    q, k, v, q_mask, k_mask, q_code, k_code, params = residuals
    tau = config.hash_code_len
    if config.lsh_backward:
        weighted = cumulation.lsh_weighted_cumulation
        grad_v = config.cumulate(cumulation.lsh_cumulation, k_mask, k_code, q_mask, q_code, grad)
        scaled_k, scaled_q = (tau / 2) * k.astype(jnp.float32), (tau / 2) * q.astype(jnp.float32)
        grad_q = config.cumulate(weighted, q_mask, q_code, grad, k_mask, k_code, v, scaled_k)
        grad_k = config.cumulate(weighted, k_mask, k_code, v, q_mask, q_code, grad, scaled_q)
        grad_q, grad_k = grad_q.astype(q.dtype), grad_k.astype(k.dtype)
        grad_v = grad_v.astype(v.dtype)
    else:
        expectation = expectation_matrix(q, k, q_mask, k_mask, tau)
        grad_q, grad_k, grad_v = _expectation_grads(q, k, v, expectation, grad, tau)
    zeros = jnp.zeros_like
    return grad_q, grad_k, grad_v, zeros(q_mask), zeros(k_mask), zeros(params)


_lsh_attention.defvjp(_lsh_fwd, _lsh_bwd)


def yoso_lsh_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_mask: jax.Array | None,
    k_mask: jax.Array | None,
    key: jax.Array,
    *,
    num_hash: int,
    hash_code_len: int,
    lsh_backward: bool = True,
    impl: str = "xla",
    interpret: bool = False,
    hash_block_sizes: hadamard.BlockSizes | None = None,
    cumulation_block_sizes: cumulation.BlockSizes | None = None,
) -> jax.Array:
    """YOSO LSH attention: the sampled collision estimate, with YOSO's surrogate gradient.

    Each flattened batch row (e.g. each (batch, head) pair) draws its own Hadamard hash functions,
    ``hadamard.make_hash_params(key, num_hash, dim, hash_code_len, batch_size=prod(batch))``,
    shared by q and k; the same ``key`` reproduces the same output.

    Args:
      q: ``[*batch, query_length, dim]``, L2-normalised.
      k: ``[*batch, key_length, dim]``, L2-normalised.
      v: ``[*batch, key_length, value_dim]``.
      q_mask: ``[*batch, query_length]`` (or broadcastable; nonzero keeps) or None.
      k_mask: ``[*batch, key_length]`` (or broadcastable) or None.
      key: PRNG key of the hash functions.
      num_hash: hash functions averaged over.
      hash_code_len: bits per code (tau); tables have ``2**tau`` rows.
      lsh_backward: backward via the LSH (weighted) cumulation, linear cost; else the dense
        expectation backward, O(Lq * Lk).
      impl: ``'xla'`` (default; segment_sum cumulation, ``fast_hash_xla``) or ``'pallas'``
        (the kernels).
      interpret: run the Pallas kernels with the interpreter.
      hash_block_sizes: tiling of the Pallas hash kernel.
      cumulation_block_sizes: tiling of the Pallas cumulation kernels.

    Returns:
      ``[*batch, query_length, value_dim]`` in ``v.dtype``; masked queries give 0.

    Raises:
      ValueError: on a bad shape or argument, naming it.
    """
    check_impl(impl)
    q, k, v, q_mask, k_mask, lead = _prepare(q, k, v, q_mask, k_mask)
    params = hadamard.make_hash_params(
        key, num_hash, q.shape[-1], hash_code_len, batch_size=q.shape[0]
    )
    config = _LshConfig(
        num_hash=num_hash,
        hash_code_len=hash_code_len,
        lsh_backward=bool(lsh_backward),
        impl=impl,
        interpret=bool(interpret),
        hash_block_sizes=hash_block_sizes,
        cumulation_block_sizes=cumulation_block_sizes,
    )
    out = _lsh_attention(config, q, k, v, q_mask, k_mask, params)
    return out.reshape(*lead, *out.shape[1:])
