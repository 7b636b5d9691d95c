"""LSH cumulation of YOSO attention: Pallas kernels, an XLA path and pure-jnp references.

For hash function ``h`` every unmasked key scatters (adds) its value row into a table of
``2**hash_code_len`` rows at its code; each unmasked query reads the row at its own code; the
result is the mean over the ``num_hash`` hash functions::

    out[b, i] = q_mask[b, i] / H * sum_h table[b, h, q_code[b, h, i]]
    table[b, h, c] = sum_{j : k_code[b, h, j] == c} k_mask[b, j] * value[b, j]

i.e. ``out = (C / H) @ value`` with ``C[i, j]`` the number of hash functions under which query
``i`` and key ``j`` collide, computed in O(H * L) instead of O(L^2). The weighted cumulation of
YOSO's LSH backward replaces ``value[j]`` by the outer product ``key_weight[j] (x) value[j]`` and
contracts the row read back with ``query_weight[i]``, giving
``out[i] = 1/H sum_j C[i, j] <query_weight[i], key_weight[j]> value[j]``.

Layouts (transformers' YOSO layout, batch = batch * heads flattened):
  masks ``[batch, length]`` (nonzero keeps); codes int32 ``[batch, num_hash, length]`` in
  ``[0, 2**hash_code_len)`` (``hadamard.fast_hash``; codes outside it match nothing); value
  ``[batch, key_length, dim]``; weights ``[batch, length, weight_dim]``; outputs
  ``[batch, query_length, dim]`` in ``value.dtype``, accumulated in float32.

Implementations (``impl``):
  ``'xla'`` (default; the right choice on CPU): a ``lax.scan`` over hash functions of a
    ``segment_sum`` scatter-add into the table and a gather; memory O(batch * (2**tau + L) * dim).
    Short sequences scatter several weight columns at once (``XLA_ROW_FLOATS_PER_STEP``).
  ``'pallas'``: two kernels. ``_table_kernel`` builds every table as a one-hot matmul
    ``onehot(k_code)^T @ value`` (a scatter the MXU / tensor cores can run); ``_lookup_kernel``
    reads the tables back with ``onehot(q_code) @ table`` and sums over hash functions. Tables
    are float32 ``[batch, num_hash, 2**tau, dim]`` in HBM. Reductions run over sequential grid
    axes on TPU and in in-kernel loops on GPU (``BlockSizes.reduce_in_grid``).
The weighted cumulation loops over the ``weight_dim`` columns (as the YOSO CUDA kernel does),
folding one column of each weight into the masks, so no ``weight_dim x dim`` table is ever
materialised. The references build one-hot einsums and are meant for tests.
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
    check_impl,
    compiler_params,
    effective_block,
    next_power_of_2,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas cumulation kernels; they change speed, not results.

    All are powers of two >= 16 (Triton's tl.dot minimum). On TPU keep ``block_q`` and
    ``block_k`` multiples of 128 when sequences are longer than them.

    Attributes:
      block_q: queries per program of the lookup kernel.
      block_k: keys per step of the table kernel's reduction.
      block_table: table rows per block (both kernels); bounds the VMEM / SRAM a table tile
        takes when ``2**hash_code_len`` is large.
      reduce_in_grid: how reductions run (see "Pallas path" below): over sequential grid axes
        with a resident output block (True; needs a sequential grid: TPU, interpreter) or in a
        fori_loop inside each program (False; GPU). None picks True on TPU, False elsewhere.
    """

    block_q: int = 128
    block_k: int = 128
    block_table: int = 512
    reduce_in_grid: bool | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_table"):
            check_block_size(name, getattr(self, name))
        if self.reduce_in_grid is not None and not isinstance(self.reduce_in_grid, bool):
            raise ValueError(f"reduce_in_grid must be None or a bool, got {self.reduce_in_grid!r}")


def _check_inputs(
    query_mask,
    query_code,
    key_mask,
    key_code,
    value,
    hash_code_len,
    query_weight=None,
    key_weight=None,
) -> None:
    """Raises ValueError naming the first argument whose shape or dtype is wrong."""
    if query_code.ndim != 3 or not jnp.issubdtype(query_code.dtype, jnp.integer):
        raise ValueError(
            f"query_code must be integer [batch, num_hash, query_length], got "
            f"{query_code.dtype}{list(query_code.shape)}"
        )
    batch, num_hash, q_len = query_code.shape
    if num_hash < 1:
        raise ValueError(f"query_code needs at least one hash function, got {query_code.shape}")
    if (
        key_code.ndim != 3
        or key_code.shape[:2] != (batch, num_hash)
        or not jnp.issubdtype(key_code.dtype, jnp.integer)
    ):
        raise ValueError(
            f"key_code must be integer [{batch}, {num_hash}, key_length] like query_code, got "
            f"{key_code.dtype}{list(key_code.shape)}"
        )
    k_len = key_code.shape[2]
    if query_mask.shape != (batch, q_len):
        raise ValueError(f"query_mask must be [{batch}, {q_len}], got {query_mask.shape}")
    if key_mask.shape != (batch, k_len):
        raise ValueError(f"key_mask must be [{batch}, {k_len}], got {key_mask.shape}")
    if value.ndim != 3 or value.shape[:2] != (batch, k_len):
        raise ValueError(f"value must be [{batch}, {k_len}, dim], got {value.shape}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(f"value must be floating point, got {value.dtype}")
    if (
        isinstance(hash_code_len, bool)
        or not isinstance(hash_code_len, int)
        or not 1 <= hash_code_len <= MAX_HASH_CODE_LEN
    ):
        raise ValueError(
            f"hash_code_len must be an int in [1, {MAX_HASH_CODE_LEN}], got {hash_code_len!r}"
        )
    if query_weight is None:
        return
    if query_weight.ndim != 3 or query_weight.shape[:2] != (batch, q_len):
        raise ValueError(
            f"query_weight must be [{batch}, {q_len}, weight_dim], got {query_weight.shape}"
        )
    if key_weight.shape != (batch, k_len, query_weight.shape[2]):
        raise ValueError(
            f"key_weight must be [{batch}, {k_len}, {query_weight.shape[2]}], got "
            f"{key_weight.shape}"
        )


def _as_weight(mask: jax.Array) -> jax.Array:
    return (mask != 0).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# References (pure jnp, one-hot einsums: O(num_hash * L * 2**tau * dim), for tests)
# ------------------------------------------------------------------------------------------------


def _one_hot_codes(code, mask, hash_code_len):
    """``[batch, num_hash, length, 2**tau]`` float32 one-hot rows, zero for masked positions."""
    hot = jax.nn.one_hot(code, 2**hash_code_len, dtype=jnp.float32)
    return hot * _as_weight(mask)[:, None, :, None]


@functools.partial(jax.jit, static_argnames=("hash_code_len",))
def lsh_cumulation_reference(
    query_mask, query_code, key_mask, key_code, value, hash_code_len: int
) -> jax.Array:
    """Pure-jnp LSH cumulation (see the module docstring for shapes and meaning).

    Returns:
      ``[batch, query_length, dim]`` in ``value.dtype``.
    """
    _check_inputs(query_mask, query_code, key_mask, key_code, value, hash_code_len)
    q_hot = _one_hot_codes(query_code, query_mask, hash_code_len)
    k_hot = _one_hot_codes(key_code, key_mask, hash_code_len)
    tables = jnp.einsum("bhkt,bkd->bhtd", k_hot, value.astype(jnp.float32), precision=HIGHEST)
    out = jnp.einsum("bhqt,bhtd->bqd", q_hot, tables, precision=HIGHEST)
    return (out / query_code.shape[1]).astype(value.dtype)


@functools.partial(jax.jit, static_argnames=("hash_code_len",))
def lsh_weighted_cumulation_reference(
    query_mask,
    query_code,
    query_weight,
    key_mask,
    key_code,
    key_weight,
    value,
    hash_code_len: int,
) -> jax.Array:
    """Pure-jnp weighted LSH cumulation; tables of ``key_weight (x) value`` outer products.

    Returns:
      ``[batch, query_length, dim]`` in ``value.dtype``.
    """
    _check_inputs(
        query_mask, query_code, key_mask, key_code, value, hash_code_len, query_weight, key_weight
    )
    q_hot = _one_hot_codes(query_code, query_mask, hash_code_len)
    k_hot = _one_hot_codes(key_code, key_mask, hash_code_len)
    f32 = jnp.float32
    tables = jnp.einsum(
        "bhkt,bkw,bkd->bhtwd", k_hot, key_weight.astype(f32), value.astype(f32), precision=HIGHEST
    )
    out = jnp.einsum("bhqt,bqw,bhtwd->bqd", q_hot, query_weight.astype(f32), tables)
    return (out / query_code.shape[1]).astype(value.dtype)


# ------------------------------------------------------------------------------------------------
# XLA path: scan over hash functions of segment_sum (scatter-add) + gather
# ------------------------------------------------------------------------------------------------


# Floats of key rows the XLA path scatters per step. Short sequences take several weight columns
# per step (rows ``[keys, columns * dim]``): the weighted cumulation's num_hash * weight_dim
# scan steps are then fewer, and each stays cheap. Long sequences take one column per step; wider
# rows would only stream more memory through each scatter.
XLA_ROW_FLOATS_PER_STEP = 2**20


def _xla_cumulation(q_code, q_weights, k_code, k_weights, value, table_size):
    """Sum over weight columns ``w`` of ``q_weights[w] * cumulation(k_weights[w] * value)``.

    Args:
      q_code, k_code: ``[batch, num_hash, length]`` codes.
      q_weights, k_weights: ``[columns, batch, length]`` float32 (masks, 1/H and weight columns
        already folded in).
      value: ``[batch, key_length, dim]`` float32.

    Returns:
      ``[batch, query_length, dim]`` float32.
    """
    batch, k_len, dim = value.shape
    q_len = q_code.shape[2]
    columns = q_weights.shape[0]
    per_step = max(1, min(columns, XLA_ROW_FLOATS_PER_STEP // (batch * k_len * dim)))
    per_step = 1 << (per_step.bit_length() - 1)  # a power of two: weight_dim usually is one
    steps = -(-columns // per_step)
    pad = ((0, steps * per_step - columns), (0, 0), (0, 0))  # zero weights add nothing
    q_weights = jnp.pad(q_weights, pad).reshape(steps, per_step, batch, q_len)
    k_weights = jnp.pad(k_weights, pad).reshape(steps, per_step, batch, k_len)
    # Tables of all batch rows live in one segment_sum: row b * table_size + code. A code out of
    # [0, table_size) must not land in the next row's table: it goes to row num_rows, which
    # segment_sum drops and the gather fills with 0 (as the reference and kernels ignore it).
    num_rows = batch * table_size
    offsets = jnp.arange(batch, dtype=jnp.int32)[:, None] * table_size

    def row_ids(code):  # [num_hash, batch, length]
        code = jnp.swapaxes(code.astype(jnp.int32), 0, 1)
        return jnp.where((code >= 0) & (code < table_size), code + offsets, num_rows)

    q_ids, k_ids = row_ids(q_code), row_ids(k_code)

    def some_columns(acc, weights):
        q_weight, k_weight = weights  # [per_step, batch, length]
        rows = value[None] * k_weight[..., None]  # [per_step, batch, k_len, dim]
        rows = rows.transpose(1, 2, 0, 3).reshape(batch * k_len, per_step * dim)

        def one_hash(out, ids):
            q_id, k_id = ids
            table = jax.ops.segment_sum(rows, k_id.reshape(-1), num_segments=num_rows)
            return out + table.at[q_id].get(mode="fill", fill_value=0.0), None

        out = jnp.zeros((batch, q_len, per_step * dim), jnp.float32)
        out, _ = lax.scan(one_hash, out, (q_ids, k_ids))
        out = out.reshape(batch, q_len, per_step, dim)
        return acc + jnp.einsum("cbq,bqcd->bqd", q_weight, out, precision=HIGHEST), None

    acc = jnp.zeros((batch, q_len, dim), jnp.float32)
    acc, _ = lax.scan(some_columns, acc, (q_weights, k_weights))
    return acc


# ------------------------------------------------------------------------------------------------
# Pallas path
# ------------------------------------------------------------------------------------------------
#
# Two ways to run a reduction (over key blocks when building tables; over hash functions and
# table blocks when reading them back), chosen by ``BlockSizes.reduce_in_grid``:
#   grid (TPU default): the reduction is the innermost grid axes and the output block stays
#     resident across them -- valid because a TPU runs the grid sequentially, and Pallas then
#     pipelines the HBM->VMEM copies of the reduced operands.
#   loop (default elsewhere): a lax.fori_loop inside one program over blocks sliced from refs
#     that span the whole reduced axis -- required on GPU, where Triton launches every grid
#     point concurrently, so grid points must never share an output block.


def _scatter_block(code, weight, value, row_offset, block_t):
    """Rows ``[row_offset, row_offset + block_t)`` of the table of one block of keys.

    Args:
      code: ``[1, block_k]`` int32 key codes; weight: ``[1, block_k]``; value:
        ``[block_k, dim_p]``.

    Returns:
      ``[block_t, dim_p]`` float32: ``sum_j weight[j] * value[j] * (code[j] == row)``.
    """
    rows = row_offset + lax.broadcasted_iota(jnp.int32, (block_t, code.shape[1]), 0)
    # The scatter-add as a matmul: column j of `scatter` is weight[j] at row code[j].
    scatter = jnp.where(rows == code, weight, 0.0)
    return jnp.dot(scatter, value.astype(jnp.float32), precision=HIGHEST)


def _gather_block(code, weight, table, row_offset):
    """``weight[i] * table[code[i] - row_offset]`` for the codes that fall in this table block.

    Args:
      code: ``[1, block_q]`` int32 query codes; weight: ``[1, block_q]``; table:
        ``[block_t, dim_p]`` float32.

    Returns:
      ``[block_q, dim_p]`` float32.
    """
    rows = row_offset + lax.broadcasted_iota(jnp.int32, (table.shape[0], code.shape[1]), 0)
    # Transposed one-hot (table rows on sublanes, queries on lanes) so codes and weights
    # broadcast as loaded; the matmul contracts dim 0, no in-kernel transpose needed.
    gather_t = jnp.where(rows == code, weight, 0.0)  # [block_t, block_q]
    return lax.dot_general(gather_t, table, (((0,), (0,)), ((), ())), precision=HIGHEST)


def _table_kernel(code_ref, weight_ref, value_ref, table_ref, *, block_k, reduce_in_grid):
    """Builds one ``[block_t, dim_p]`` table block of one (batch row, hash function).

    Grid ``(batch, hash, table block[, key block])``. Refs (``n`` = ``block_k`` when
    ``reduce_in_grid``, else the padded key length):
      code_ref: ``[1, 1, 1, n]`` int32 key codes of the hash function.
      weight_ref: ``[1, 1, n]`` float32 key weights (mask, times a weight column).
      value_ref: ``[1, n, dim_p]`` values.
      table_ref: ``[1, 1, block_t, dim_p]`` float32 output.
    """
    block_t = table_ref.shape[2]
    row_offset = pl.program_id(2) * block_t
    if reduce_in_grid:

        @pl.when(pl.program_id(3) == 0)
        def _init():
            table_ref[...] = jnp.zeros(table_ref.shape, table_ref.dtype)

        code, weight, value = code_ref[0, 0], weight_ref[0], value_ref[0]
        table_ref[0, 0] += _scatter_block(code, weight, value, row_offset, block_t)
        return

    def add_key_block(i, table):
        keys = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        code, weight = code_ref[0, 0, :, keys], weight_ref[0, :, keys]
        return table + _scatter_block(code, weight, value_ref[0, keys, :], row_offset, block_t)

    num_blocks = value_ref.shape[1] // block_k
    init = jnp.zeros(table_ref.shape[2:], jnp.float32)
    table_ref[0, 0] = lax.fori_loop(0, num_blocks, add_key_block, init)


def _lookup_kernel(code_ref, weight_ref, table_ref, out_ref, *, block_t, reduce_in_grid):
    """Sums table reads over hash functions for one block of queries.

    Grid ``(batch, query block[, hash, table block])``. Refs (``H, T`` = ``1, block_t`` when
    ``reduce_in_grid``, else ``num_hash`` and the padded table size):
      code_ref: ``[1, H, 1, block_q]`` int32 query codes.
      weight_ref: ``[1, 1, block_q]`` float32 query weights (mask / num_hash, times a column).
      table_ref: ``[1, H, T, dim_p]`` float32 tables.
      out_ref: ``[1, block_q, dim_p]`` float32 output.
    """
    weight = weight_ref[0]  # [1, block_q]
    if reduce_in_grid:
        h_idx, t_idx = pl.program_id(2), pl.program_id(3)

        @pl.when((h_idx == 0) & (t_idx == 0))
        def _init():
            out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

        out_ref[0] += _gather_block(code_ref[0, 0], weight, table_ref[0, 0], t_idx * block_t)
        return

    num_t = table_ref.shape[2] // block_t

    def add_table_block(i, out):
        # lax.div / lax.rem: jnp's floor-division wrappers do not lower to Triton.
        h, t = lax.div(i, num_t), lax.rem(i, num_t)
        rows = pl.ds(pl.multiple_of(t * block_t, block_t), block_t)
        return out + _gather_block(code_ref[0, h], weight, table_ref[0, h, rows, :], t * block_t)

    init = jnp.zeros(out_ref.shape[1:], jnp.float32)
    out_ref[0] = lax.fori_loop(0, code_ref.shape[1] * num_t, add_table_block, init)


def _pallas_cumulation(
    q_code, q_weights, k_code, k_weights, value, table_size, block_sizes, interpret
):
    """Same contract as ``_xla_cumulation``, with the two Pallas kernels."""
    batch, num_hash, q_len = q_code.shape
    k_len, dim = value.shape[1:]
    block_q = effective_block(block_sizes.block_q, q_len)
    block_k = effective_block(block_sizes.block_k, k_len)
    q_len_p, k_len_p = round_up(q_len, block_q), round_up(k_len, block_k)
    dim_p = max(MIN_DOT_DIM, next_power_of_2(dim))
    table_p = max(MIN_DOT_DIM, table_size)  # codes never reach the padding rows
    block_t = min(block_sizes.block_table, table_p)
    in_grid = block_sizes.reduce_in_grid
    if in_grid is None:
        in_grid = _common.backend() == "tpu"
    elif in_grid and not interpret and _common.backend() == "gpu":
        raise ValueError(
            "block_sizes.reduce_in_grid=True needs a sequential grid (TPU or interpret=True); "
            "a GPU runs grid points concurrently"
        )

    # Padded keys get weight 0 and padded queries are sliced off, so code 0 there is harmless.
    # Out-of-range codes become -1, which matches no row (not even the padding rows).
    # Codes get a unit axis so their blocks are [1, block]: Mosaic wants the last two block
    # dims to be (8, 128)-aligned or full, and 1 is full.
    def prepare_codes(code, pad):
        code = code.astype(jnp.int32)
        code = jnp.where((code >= 0) & (code < table_size), code, -1)
        return jnp.pad(code, ((0, 0), (0, 0), (0, pad)))[:, :, None]

    q_code, k_code = prepare_codes(q_code, q_len_p - q_len), prepare_codes(k_code, k_len_p - k_len)
    q_weights = jnp.pad(q_weights, ((0, 0), (0, 0), (0, q_len_p - q_len)))[:, :, None]
    k_weights = jnp.pad(k_weights, ((0, 0), (0, 0), (0, k_len_p - k_len)))[:, :, None]
    value = jnp.pad(value, ((0, 0), (0, k_len_p - k_len), (0, dim_p - dim)))

    table_shape = jax.ShapeDtypeStruct((batch, num_hash, table_p, dim_p), jnp.float32)
    out_shape = jax.ShapeDtypeStruct((batch, q_len_p, dim_p), jnp.float32)
    table_grid = (batch, num_hash, table_p // block_t)
    lookup_grid = (batch, q_len_p // block_q)
    if in_grid:
        table_grid += (k_len_p // block_k,)
        table_in_specs = [
            pl.BlockSpec((1, 1, 1, block_k), lambda b, h, t, k: (b, h, 0, k)),
            pl.BlockSpec((1, 1, block_k), lambda b, h, t, k: (b, 0, k)),
            pl.BlockSpec((1, block_k, dim_p), lambda b, h, t, k: (b, k, 0)),
        ]
        table_out_spec = pl.BlockSpec((1, 1, block_t, dim_p), lambda b, h, t, k: (b, h, t, 0))
        lookup_grid += (num_hash, table_p // block_t)
        lookup_in_specs = [
            pl.BlockSpec((1, 1, 1, block_q), lambda b, q, h, t: (b, h, 0, q)),
            pl.BlockSpec((1, 1, block_q), lambda b, q, h, t: (b, 0, q)),
            pl.BlockSpec((1, 1, block_t, dim_p), lambda b, q, h, t: (b, h, t, 0)),
        ]
        lookup_out_spec = pl.BlockSpec((1, block_q, dim_p), lambda b, q, h, t: (b, q, 0))
    else:
        table_in_specs = [
            pl.BlockSpec((1, 1, 1, k_len_p), lambda b, h, t: (b, h, 0, 0)),
            pl.BlockSpec((1, 1, k_len_p), lambda b, h, t: (b, 0, 0)),
            pl.BlockSpec((1, k_len_p, dim_p), lambda b, h, t: (b, 0, 0)),
        ]
        table_out_spec = pl.BlockSpec((1, 1, block_t, dim_p), lambda b, h, t: (b, h, t, 0))
        lookup_in_specs = [
            pl.BlockSpec((1, num_hash, 1, block_q), lambda b, q: (b, 0, 0, q)),
            pl.BlockSpec((1, 1, block_q), lambda b, q: (b, 0, q)),
            pl.BlockSpec((1, num_hash, table_p, dim_p), lambda b, q: (b, 0, 0, 0)),
        ]
        lookup_out_spec = pl.BlockSpec((1, block_q, dim_p), lambda b, q: (b, q, 0))

    reduction = ("arbitrary", "arbitrary") if in_grid else ()
    build_tables = pl.pallas_call(
        functools.partial(_table_kernel, block_k=block_k, reduce_in_grid=in_grid),
        grid=table_grid,
        in_specs=table_in_specs,
        out_specs=table_out_spec,
        out_shape=table_shape,
        compiler_params=compiler_params(("parallel",) * 3 + reduction[:1]),
        interpret=interpret,
        name="yoso_lsh_tables",
    )
    lookup = pl.pallas_call(
        functools.partial(_lookup_kernel, block_t=block_t, reduce_in_grid=in_grid),
        grid=lookup_grid,
        in_specs=lookup_in_specs,
        out_specs=lookup_out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params(("parallel",) * 2 + reduction),
        interpret=interpret,
        name="yoso_lsh_lookup",
    )

    def one_column(acc, weights):
        q_weight, k_weight = weights
        return acc + lookup(q_code, q_weight, build_tables(k_code, k_weight, value)), None

    if q_weights.shape[0] == 1:
        out = lookup(q_code, q_weights[0], build_tables(k_code, k_weights[0], value))
    else:
        out = jnp.zeros((batch, q_len_p, dim_p), jnp.float32)
        out, _ = lax.scan(one_column, out, (q_weights, k_weights))
    return out[:, :q_len, :dim]


def _cumulation(q_code, q_weights, k_code, k_weights, value, hash_code_len, impl, bs, interp):
    value32 = value.astype(jnp.float32)
    if impl == "xla":
        out = _xla_cumulation(q_code, q_weights, k_code, k_weights, value32, 2**hash_code_len)
    else:
        out = _pallas_cumulation(
            q_code, q_weights, k_code, k_weights, value32, 2**hash_code_len, bs, interp
        )
    return out.astype(value.dtype)


_STATIC = ("hash_code_len", "impl", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def lsh_cumulation(
    query_mask: jax.Array,
    query_code: jax.Array,
    key_mask: jax.Array,
    key_code: jax.Array,
    value: jax.Array,
    hash_code_len: int,
    *,
    impl: str = "xla",
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """LSH cumulation: ``out = q_mask * (C / num_hash) @ (k_mask * value)`` in O(num_hash * L).

    Args:
      query_mask: ``[batch, query_length]``; nonzero keeps the query, masked queries give 0.
      query_code: int ``[batch, num_hash, query_length]`` in ``[0, 2**hash_code_len)``.
      key_mask: ``[batch, key_length]``; masked keys are not added to the tables.
      key_code: int ``[batch, num_hash, key_length]``.
      value: ``[batch, key_length, dim]`` floating point.
      hash_code_len: bits per code (tau); tables have ``2**tau`` rows.
      impl: ``'xla'`` (segment_sum; default, best on CPU) or ``'pallas'`` (the kernels).
      block_sizes: Pallas tiling; defaults to ``BlockSizes()``.
      interpret: run the Pallas kernels with the interpreter (any backend).

    Returns:
      ``[batch, query_length, dim]`` in ``value.dtype``.

    Raises:
      ValueError: on a bad shape or argument, naming it.
    """
    _check_inputs(query_mask, query_code, key_mask, key_code, value, hash_code_len)
    check_impl(impl)
    q_weights = (_as_weight(query_mask) / query_code.shape[1])[None]
    k_weights = _as_weight(key_mask)[None]
    return _cumulation(
        query_code,
        q_weights,
        key_code,
        k_weights,
        value,
        hash_code_len,
        impl,
        block_sizes or BlockSizes(),
        interpret,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def lsh_weighted_cumulation(
    query_mask: jax.Array,
    query_code: jax.Array,
    query_weight: jax.Array,
    key_mask: jax.Array,
    key_code: jax.Array,
    key_weight: jax.Array,
    value: jax.Array,
    hash_code_len: int,
    *,
    impl: str = "xla",
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Weighted LSH cumulation of YOSO's LSH backward.

    ``out[i] = q_mask[i] / H * sum_j C[i, j] k_mask[j] <query_weight[i], key_weight[j]> value[j]``
    with ``C[i, j]`` the number of colliding hash functions. YOSO computes
    ``grad_q = lsh_weighted_cumulation(q_mask, q_code, grad_out, k_mask, k_code, v, tau/2 * k)``
    (and symmetrically ``grad_k``): the expectation-attention gradient with the collision
    estimate ``C / H`` in place of ``(1 - acos(q.k) / pi)**tau``.

    Args:
      query_mask: ``[batch, query_length]``.
      query_code: int ``[batch, num_hash, query_length]``.
      query_weight: ``[batch, query_length, weight_dim]``.
      key_mask: ``[batch, key_length]``.
      key_code: int ``[batch, num_hash, key_length]``.
      key_weight: ``[batch, key_length, weight_dim]``.
      value: ``[batch, key_length, dim]``.
      hash_code_len: bits per code (tau).
      impl: ``'xla'`` or ``'pallas'``; both loop over the ``weight_dim`` columns.
      block_sizes: Pallas tiling; defaults to ``BlockSizes()``.
      interpret: run the Pallas kernels with the interpreter.

    Returns:
      ``[batch, query_length, dim]`` in ``value.dtype``.

    Raises:
      ValueError: on a bad shape or argument, naming it.
    """
    _check_inputs(
        query_mask, query_code, key_mask, key_code, value, hash_code_len, query_weight, key_weight
    )
    check_impl(impl)
    # One weight column per loop step: [weight_dim, batch, length], masks and 1/H folded in.
    q_scale = _as_weight(query_mask) / query_code.shape[1]
    q_weights = jnp.moveaxis(query_weight.astype(jnp.float32) * q_scale[..., None], -1, 0)
    k_scale = _as_weight(key_mask)
    k_weights = jnp.moveaxis(key_weight.astype(jnp.float32) * k_scale[..., None], -1, 0)
    return _cumulation(
        query_code,
        q_weights,
        key_code,
        k_weights,
        value,
        hash_code_len,
        impl,
        block_sizes or BlockSizes(),
        interpret,
    )
