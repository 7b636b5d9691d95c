"""Fast Walsh-Hadamard LSH hash of YOSO attention: a Pallas kernel and its pure-jnp reference.

One hash round applies a structured pseudo-random rotation to each (zero-padded) vector,

    y = H D3 H D2 H D1 x,

where H is the unnormalised Sylvester-ordered Walsh-Hadamard matrix of size ``dim_p`` and D1, D2,
D3 are random +-1 diagonals (Andoni et al. 2015, as used by YOSO's ``fast_hash``). The signs of
``y`` are cut into consecutive groups of ``hash_code_len`` (tau) bits; each group is one hash code
in ``[0, 2**tau)``. A round yields ``dim_p // tau`` codes, so ``ceil(num_hash / (dim_p // tau))``
rounds give ``num_hash`` codes.

Conventions (shared by the kernel and the reference, and relied on by ``cumulation.py``):
  * layout: vectors are ``[batch, length, dim]`` with batch = batch * heads flattened (the layout
    of transformers' YOSO); codes are int32 ``[batch, num_hash, length]``.
  * padding: ``dim`` is zero-padded to ``dim_p = max(16, next_power_of_2(dim))`` (16 because
    Triton's tl.dot needs every matmul dimension >= 16).
  * code ``h`` comes from round ``h // (dim_p // tau)`` and group ``g = h % (dim_p // tau)``;
    bit ``j`` (value ``2**j``, least significant first) is ``y[g * tau + j] > 0``. This is the bit
    order of the YOSO CUDA kernel; coordinates past ``(dim_p // tau) * tau`` are unused.
  * ``params`` are the diagonals, float32 +-1, ``[3, rounds, dim_p]`` (shared over the batch) or
    ``[batch, 3, rounds, dim_p]`` (independent per batch row, as the CUDA kernel draws them).

``fast_hash_xla`` (the XLA path, the CPU default) runs the reference's butterflies on a
coordinate-major layout in cache-sized blocks of positions: bit-identical codes, several times
faster on CPU than the reference's layout.

Exactness: the kernel applies every butterfly stage of H as a matmul with a matrix that has two
+-1 entries per row (the diagonal folded into the first stage of each H). Products with +-1 and 0
are exact and adding zeros is exact, so each output is exactly ``fl(a + b)`` or ``fl(a - b)`` --
the same operations, in the same stage order (stride ``dim_p / 2`` down to 1), that the reference
does with reshapes. Codes therefore match bit for bit whatever order a backend sums a matmul in.
(A dense H matmul would not: its ``dim_p``-term sums round differently per backend.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _common
from ._common import (
    HIGHEST,
    MAX_HASH_CODE_LEN,
    MIN_DOT_DIM,
    check_block_size,
    compiler_params,
    effective_block,
    next_power_of_2,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the hash kernel; they change speed, never the codes.

    Attributes:
      block_l: sequence positions per program (the lane dimension of the codes). A power of two
        >= 16; on TPU keep it a multiple of 128 when sequences are longer than it.
    """

    block_l: int = 128

    def __post_init__(self):
        check_block_size("block_l", self.block_l)


def padded_dim(dim: int) -> int:
    """The power-of-two dimension the hash works in: ``max(16, next_power_of_2(dim))``."""
    return max(MIN_DOT_DIM, next_power_of_2(dim))


def codes_per_round(dim: int, hash_code_len: int) -> int:
    """Codes one Hadamard round yields for vectors of size ``dim``."""
    return padded_dim(dim) // hash_code_len


def num_rounds(num_hash: int, dim: int, hash_code_len: int) -> int:
    """Hadamard rounds needed for ``num_hash`` codes."""
    return -(-num_hash // codes_per_round(dim, hash_code_len))


def _check_config(num_hash: int, dim: int, hash_code_len: int) -> None:
    if isinstance(num_hash, bool) or not isinstance(num_hash, int) or num_hash < 1:
        raise ValueError(f"num_hash must be a positive int, got {num_hash!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    max_len = min(padded_dim(dim), MAX_HASH_CODE_LEN)
    if (
        isinstance(hash_code_len, bool)
        or not isinstance(hash_code_len, int)
        or not 1 <= hash_code_len <= max_len
    ):
        raise ValueError(
            f"hash_code_len must be an int in [1, {max_len}] for dim={dim} "
            f"(padded to {padded_dim(dim)}), got {hash_code_len!r}"
        )


def make_hash_params(
    key: jax.Array,
    num_hash: int,
    dim: int,
    hash_code_len: int,
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """Draws the random +-1 diagonals D1, D2, D3 of every hash round.

    Args:
      key: a PRNG key; the same key gives the same hash functions.
      num_hash: number of hash codes per vector.
      dim: vector size before padding (the head dim).
      hash_code_len: bits per code (tau).
      batch_size: if given, draw independent diagonals per batch row (heads hash independently,
        as in the YOSO CUDA kernel); if None, one set shared by the whole batch.

    Returns:
      float32 +-1 array ``[3, rounds, dim_p]``, or ``[batch_size, 3, rounds, dim_p]``.
    """
    _check_config(num_hash, dim, hash_code_len)
    shape = (3, num_rounds(num_hash, dim, hash_code_len), padded_dim(dim))
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        shape = (batch_size, *shape)
    return _rademacher(key, shape)


@functools.partial(jax.jit, static_argnums=1)
def _rademacher(key, shape):
    # One compiled program instead of several eagerly dispatched random ops.
    return jax.random.rademacher(key, shape, dtype=jnp.float32)


def _check_inputs(x, params, num_hash: int, hash_code_len: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, length, dim], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")
    batch, _, dim = x.shape
    _check_config(num_hash, dim, hash_code_len)
    rounds, dim_p = num_rounds(num_hash, dim, hash_code_len), padded_dim(dim)
    want = f"[3, >={rounds}, {dim_p}] or [{batch}, 3, >={rounds}, {dim_p}]"
    if params.ndim not in (3, 4):
        raise ValueError(f"params must be {want} (see make_hash_params), got {params.shape}")
    if params.ndim == 4 and params.shape[0] != batch:
        raise ValueError(f"params batch {params.shape[0]} != x batch {batch}; want {want}")
    if params.shape[-3] != 3 or params.shape[-2] < rounds or params.shape[-1] != dim_p:
        raise ValueError(
            f"params must be {want} for num_hash={num_hash}, dim={dim}, "
            f"hash_code_len={hash_code_len}; got {params.shape}"
        )


@jax.jit
def walsh_hadamard_transform(x: jax.Array) -> jax.Array:
    """Unnormalised Sylvester-ordered Walsh-Hadamard transform along the last axis.

    Butterfly stages run from stride ``n / 2`` down to 1, the order the kernel uses, so the two
    round identically.

    Args:
      x: ``[..., n]`` with ``n`` a power of two.

    Returns:
      ``x @ H_n`` (``H_n`` symmetric, entries +-1), shape ``[..., n]``.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"x last dim must be a power of two, got {n}")
    stride = n // 2
    while stride >= 1:
        pairs = x.reshape(*x.shape[:-1], n // (2 * stride), 2, stride)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape)
        stride //= 2
    return x


@functools.partial(jax.jit, static_argnames=("num_hash", "hash_code_len"))
def fast_hash_reference(
    x: jax.Array, params: jax.Array, *, num_hash: int, hash_code_len: int
) -> jax.Array:
    """Pure-jnp fast Hadamard hash; bit-identical to ``fast_hash``.

    Args:
      x: ``[batch, length, dim]`` floating point (q or k, L2-normalised for YOSO).
      params: diagonals from ``make_hash_params``, ``[3, R, dim_p]`` or ``[batch, 3, R, dim_p]``.
      num_hash: number of codes per vector.
      hash_code_len: bits per code (tau).

    Returns:
      int32 codes ``[batch, num_hash, length]`` in ``[0, 2**hash_code_len)``.
    """
    _check_inputs(x, params, num_hash, hash_code_len)
    batch, length, dim = x.shape
    dim_p, tau = padded_dim(dim), hash_code_len
    per_round, rounds = dim_p // tau, num_rounds(num_hash, dim, tau)
    diag = params.astype(jnp.float32)[..., :rounds, :]
    diag = diag if diag.ndim == 4 else diag[None]  # [batch or 1, 3, rounds, dim_p]
    y = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, dim_p - dim)))[:, None]
    for k in range(3):
        y = walsh_hadamard_transform(y * diag[:, k, :, None, :])  # [batch, rounds, length, dim_p]
    bits = (y[..., : per_round * tau] > 0).astype(jnp.int32)
    bits = bits.reshape(batch, rounds, length, per_round, tau)
    codes = jnp.sum(bits << jnp.arange(tau, dtype=jnp.int32), axis=-1)  # [b, rounds, len, per]
    codes = codes.transpose(0, 1, 3, 2).reshape(batch, rounds * per_round, length)
    return codes[:, :num_hash]


# Vectors hashed per step of the XLA path's scan on CPU: ~2 MiB of float32 working set across
# all rounds, so the 3 * log2(dim_p) butterfly passes run out of cache instead of streaming the
# whole [batch, rounds, length, dim_p] tensor through memory once per pass.
XLA_CPU_BLOCK_VECTORS = 8192


def _wht_leading(y: jax.Array) -> jax.Array:
    """``walsh_hadamard_transform`` along the leading axis (``[n, ...]``).

    The same butterflies in the same stage order, so the two agree bit for bit; with the
    coordinates leading, each add runs over long contiguous rows.
    """
    n = y.shape[0]
    stride = n // 2
    while stride >= 1:
        pairs = y.reshape(n // (2 * stride), 2, stride, *y.shape[1:])
        a, b = pairs[:, 0], pairs[:, 1]
        y = jnp.stack([a + b, a - b], axis=1).reshape(y.shape)
        stride //= 2
    return y


def _block_codes(xt, diag, *, num_hash: int, hash_code_len: int, per_round: int) -> jax.Array:
    """Codes of one block of positions, coordinate-major.

    Args:
      xt: ``[dim_p, batch, block]`` float32 zero-padded vectors.
      diag: ``[3, dim_p, batch or 1, rounds, 1]`` the +-1 diagonals.

    Returns:
      int32 ``[batch, num_hash, block]``.
    """
    tau = hash_code_len
    y = xt[:, :, None, :]  # [dim_p, batch, 1, block]: broadcasts over rounds at the first D1
    for k in range(3):
        y = _wht_leading(y * diag[k])  # [dim_p, batch, rounds, block]
    _, batch, rounds, block = y.shape
    bits = (y[: per_round * tau] > 0).astype(jnp.int32)
    bits = bits.reshape(per_round, tau, batch, rounds, block)
    weights = jnp.arange(tau, dtype=jnp.int32)[None, :, None, None, None]
    codes = jnp.sum(bits << weights, axis=1)  # [per_round, batch, rounds, block]
    codes = codes.transpose(1, 2, 0, 3).reshape(batch, rounds * per_round, block)
    return codes[:, :num_hash]


@functools.partial(jax.jit, static_argnames=("num_hash", "hash_code_len", "block"))
def fast_hash_xla(
    x: jax.Array,
    params: jax.Array,
    *,
    num_hash: int,
    hash_code_len: int,
    block: int | None = None,
) -> jax.Array:
    """The XLA path's fast Hadamard hash: bit-identical to ``fast_hash_reference``, faster.

    Same butterflies as the reference, laid out coordinate-major (``[dim_p, batch, rounds,
    positions]``) and, on CPU, run under a ``lax.scan`` over blocks of positions so the working
    set stays in cache (see ``XLA_CPU_BLOCK_VECTORS``). Elsewhere the whole length is one block.

    Args:
      x: ``[batch, length, dim]`` floating point.
      params: diagonals from ``make_hash_params``, ``[3, R, dim_p]`` or ``[batch, 3, R, dim_p]``.
      num_hash: number of codes per vector.
      hash_code_len: bits per code (tau).
      block: positions per scan step (a power of two); None picks it from the backend.

    Returns:
      int32 codes ``[batch, num_hash, length]`` in ``[0, 2**hash_code_len)``.
    """
    _check_inputs(x, params, num_hash, hash_code_len)
    batch, length, dim = x.shape
    dim_p, tau = padded_dim(dim), hash_code_len
    per_round, rounds = dim_p // tau, num_rounds(num_hash, dim, tau)
    if block is None:
        if _common.backend() == "cpu":
            block = next_power_of_2(max(1, XLA_CPU_BLOCK_VECTORS // (batch * rounds)))
        else:
            block = next_power_of_2(length)
    block = max(1, min(int(block), next_power_of_2(length)))
    num_blocks = -(-length // block)
    diag = params.astype(jnp.float32)[..., :rounds, :]
    diag = diag if diag.ndim == 4 else diag[None]  # [batch or 1, 3, rounds, dim_p]
    diag = diag.transpose(1, 3, 0, 2)[..., None]  # [3, dim_p, batch or 1, rounds, 1]
    xp = jnp.pad(
        x.astype(jnp.float32), ((0, 0), (0, num_blocks * block - length), (0, dim_p - dim))
    )
    blocks = xp.reshape(batch, num_blocks, block, dim_p).transpose(1, 3, 0, 2)
    codes_of = functools.partial(
        _block_codes, diag=diag, num_hash=num_hash, hash_code_len=tau, per_round=per_round
    )
    if num_blocks == 1:
        codes = codes_of(blocks[0])
    else:
        _, codes = lax.scan(lambda carry, xt: (carry, codes_of(xt)), None, blocks)
        codes = codes.transpose(1, 2, 0, 3).reshape(batch, num_hash, num_blocks * block)
    return codes[:, :, :length]


def _butterfly_matrix(dim_p: int, stride: int) -> jax.Array:
    """One Hadamard butterfly stage as a ``[dim_p, dim_p]`` matrix ``S`` with ``y = S @ x``.

    Row ``i`` with bit ``stride`` clear gives ``x[i] + x[i ^ stride]``; with it set,
    ``x[i ^ stride] - x[i]`` -- the reference's ``(a + b, a - b)`` pairs.
    """
    row = lax.broadcasted_iota(jnp.int32, (dim_p, dim_p), 0)
    col = lax.broadcasted_iota(jnp.int32, (dim_p, dim_p), 1)
    self_sign = jnp.where((row & stride) == 0, 1.0, -1.0)
    return jnp.where(col == (row ^ stride), 1.0, jnp.where(col == row, self_sign, 0.0))


def _bit_weights(num_rows: int, dim_p: int, hash_code_len: int, per_round: int) -> jax.Array:
    """``[num_rows, dim_p]`` matrix that packs sign bits into codes: row g has 2**j at g*tau+j."""
    group = lax.broadcasted_iota(jnp.int32, (num_rows, dim_p), 0)
    pos = lax.broadcasted_iota(jnp.int32, (num_rows, dim_p), 1) - group * hash_code_len
    used = (pos >= 0) & (pos < hash_code_len) & (group < per_round)
    power = jnp.left_shift(jnp.int32(1), jnp.clip(pos, 0, hash_code_len - 1))
    return jnp.where(used, power.astype(jnp.float32), 0.0)


def _fast_hash_kernel(x_ref, diag_ref, codes_ref, *, hash_code_len: int, per_round: int):
    """One (batch row, length block, round) program.

    Refs:
      x_ref: ``[1, block_l, dim_p]`` input vectors.
      diag_ref: ``[1, 1, 4, dim_p]`` the round's D1, D2, D3 (row 3 is padding: Triton blocks
        must have power-of-two sizes).
      codes_ref: ``[1, 1, code_rows, block_l]`` int32; rows >= per_round are written as 0.
    """
    x = x_ref[0].astype(jnp.float32)  # [block_l, dim_p]
    dim_p = x.shape[-1]
    # Stride dim_p / 2 first, down to 1: the reference's stage order (rounding depends on it).
    strides = [dim_p >> (n + 1) for n in range(dim_p.bit_length() - 1)]
    stages = [_butterfly_matrix(dim_p, stride) for stride in strides]  # shared by the 3 H's
    y = None  # [dim_p, block_l]: coordinates on sublanes, positions on lanes
    for k in range(3):
        diag = diag_ref[0, 0, pl.ds(k, 1), :]  # [1, dim_p]
        for n, stage in enumerate(stages):
            if n == 0:
                # Scaling columns by D_k applies D_k before this H: still two +-1 per row, exact.
                stage = stage * diag
            if y is None:
                # Contracting x's minor dim transposes it for free inside the matmul.
                y = lax.dot_general(stage, x, (((1,), (1,)), ((), ())), precision=HIGHEST)
            else:
                y = jnp.dot(stage, y, precision=HIGHEST)
    bits = (y > 0).astype(jnp.float32)
    weights = _bit_weights(codes_ref.shape[2], dim_p, hash_code_len, per_round)
    codes_ref[0, 0] = jnp.dot(weights, bits, precision=HIGHEST).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("num_hash", "hash_code_len", "block_sizes", "interpret")
)
def fast_hash(
    x: jax.Array,
    params: jax.Array,
    *,
    num_hash: int,
    hash_code_len: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Fast Hadamard LSH hash as a Pallas kernel (Triton on GPU, Mosaic on TPU).

    Args:
      x: ``[batch, length, dim]`` floating point (q or k, L2-normalised for YOSO).
      params: diagonals from ``make_hash_params``, ``[3, R, dim_p]`` or ``[batch, 3, R, dim_p]``.
      num_hash: number of codes per vector.
      hash_code_len: bits per code (tau).
      block_sizes: tiling; defaults to ``BlockSizes()``.
      interpret: run the kernel body with the Pallas interpreter (any backend, e.g. CPU).

    Returns:
      int32 codes ``[batch, num_hash, length]`` in ``[0, 2**hash_code_len)``, bit-identical to
      ``fast_hash_reference``.

    Raises:
      ValueError: on a bad shape or config, naming the argument.
    """
    _check_inputs(x, params, num_hash, hash_code_len)
    block_sizes = block_sizes or BlockSizes()
    batch, length, dim = x.shape
    dim_p, tau = padded_dim(dim), hash_code_len
    per_round, rounds = dim_p // tau, num_rounds(num_hash, dim, tau)
    code_rows = max(MIN_DOT_DIM, next_power_of_2(per_round))
    block_l = effective_block(block_sizes.block_l, length)
    length_p = round_up(length, block_l)

    x = jnp.pad(x, ((0, 0), (0, length_p - length), (0, dim_p - dim)))
    diag = jnp.swapaxes(params.astype(jnp.float32)[..., :rounds, :], -3, -2)  # [.., R, 3, dim_p]
    diag = diag if diag.ndim == 4 else diag[None]
    diag = jnp.pad(diag, ((0, 0), (0, 0), (0, 1), (0, 0)))  # [batch or 1, R, 4, dim_p]
    shared = diag.shape[0] == 1 and batch != 1

    kernel = functools.partial(_fast_hash_kernel, hash_code_len=tau, per_round=per_round)
    codes = pl.pallas_call(
        kernel,
        grid=(batch, length_p // block_l, rounds),
        in_specs=[
            pl.BlockSpec((1, block_l, dim_p), lambda b, i, r: (b, i, 0)),
            pl.BlockSpec((1, 1, 4, dim_p), lambda b, i, r: (0 if shared else b, r, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, code_rows, block_l), lambda b, i, r: (b, r, 0, i)),
        out_shape=jax.ShapeDtypeStruct((batch, rounds, code_rows, length_p), jnp.int32),
        compiler_params=compiler_params(("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="yoso_fast_hash",
    )(x, diag)
    codes = codes[:, :, :per_round, :length].reshape(batch, rounds * per_round, length)
    return codes[:, :num_hash]
