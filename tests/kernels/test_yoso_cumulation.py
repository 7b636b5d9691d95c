"""Tests of the LSH cumulation: Pallas kernels and the XLA path vs the one-hot reference, and
the reference vs the O(L^2) collision-count definition."""

import dataclasses

import jax
import numpy as np
import pytest

from xformers_jax.kernels.yoso import cumulation

BS = cumulation.BlockSizes

# (batch, q_len, k_len, dim, num_hash, hash_code_len, block sizes). reduce_in_grid=True is the
# TPU structure, False (the default off TPU) the GPU one; the interpreter runs both.
CASES = [
    (2, 33, 33, 32, 5, 4, BS(reduce_in_grid=True)),
    (2, 127, 33, 48, 37, 5, BS(block_q=16, block_k=16, block_table=16, reduce_in_grid=False)),
    (1, 33, 127, 64, 37, 9, BS(block_q=128, block_k=32, block_table=128, reduce_in_grid=True)),
    (2, 127, 127, 128, 5, 3, BS(block_q=32, block_k=64)),  # 8-row table padded to 16
]
IDS = ["b{}_q{}_k{}_d{}_h{}_t{}".format(*c[:6]) + f"_grid{c[6].reduce_in_grid}" for c in CASES]


def _inputs(batch, q_len, k_len, dim, num_hash, tau, weight_dim=None, seed=0):
    rng = np.random.default_rng(seed)
    # Few distinct codes so that buckets really collect several keys.
    n_codes = min(2**tau, 6)
    codes = lambda n: rng.integers(0, n_codes, (batch, num_hash, n)) * (2**tau // n_codes)
    out = {
        "query_mask": rng.random((batch, q_len)) > 0.25,
        "query_code": codes(q_len).astype(np.int32),
        "key_mask": (rng.random((batch, k_len)) > 0.25).astype(np.int32),
        "key_code": codes(k_len).astype(np.int32),
        "value": rng.normal(size=(batch, k_len, dim)).astype(np.float32),
    }
    out["query_mask"][0, :5] = False
    if weight_dim is not None:
        out["query_weight"] = rng.normal(size=(batch, q_len, weight_dim)).astype(np.float32)
        out["key_weight"] = rng.normal(size=(batch, k_len, weight_dim)).astype(np.float32)
    return out


def _brute_force(
    query_mask, query_code, key_mask, key_code, value, query_weight=None, key_weight=None
):
    """``1/H * (C * masks [* <qw, kw>]) @ value`` with the explicit [Lq, Lk] collision counts."""
    collisions = (query_code[:, :, :, None] == key_code[:, :, None, :]).sum(1).astype(np.float64)
    collisions *= (query_mask != 0)[:, :, None] * (key_mask != 0)[:, None, :]
    if query_weight is not None:
        collisions *= np.einsum("bqw,bkw->bqk", query_weight, key_weight)
    return np.einsum("bqk,bkd->bqd", collisions, value) / query_code.shape[1]


def _for_backend(block_sizes, interpret):
    """Compiled on a GPU, the TPU (grid-reduction) structure is refused: skip those cases."""
    if block_sizes.reduce_in_grid and not interpret and jax.default_backend() == "gpu":
        pytest.skip("reduce_in_grid=True needs a sequential grid; GPU grids run in parallel")
    return block_sizes


def _weighted_args(x):
    keys = ["query_mask", "query_code", "query_weight", "key_mask", "key_code", "key_weight"]
    return [x[k] for k in keys] + [x["value"]]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lsh_cumulation_pallas_matches_reference(interpret, case):
    *shape, block_sizes = case
    block_sizes = _for_backend(block_sizes, interpret)
    x = _inputs(*shape)
    tau = shape[-1]
    got = cumulation.lsh_cumulation(
        *x.values(),
        tau,
        impl="pallas",
        block_sizes=block_sizes,
        interpret=interpret,
    )
    want = cumulation.lsh_cumulation_reference(*x.values(), tau)
    assert got.shape == x["query_mask"].shape + x["value"].shape[-1:]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[x["query_mask"] == 0], 0.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lsh_cumulation_xla_and_reference_match_definition(case):
    *shape, _ = case
    x = _inputs(*shape)
    tau = shape[-1]
    want = _brute_force(*x.values())
    ref = cumulation.lsh_cumulation_reference(*x.values(), tau)
    xla = cumulation.lsh_cumulation(*x.values(), tau, impl="xla")
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(xla), want, rtol=1e-5, atol=1e-5)


# Weighted: fewer/smaller cases -- the Pallas path runs both kernels once per weight column.
WEIGHTED_CASES = [
    (2, 33, 127, 32, 5, 4, 16, BS(block_q=16, block_k=32, block_table=16, reduce_in_grid=False)),
    (1, 127, 33, 48, 7, 6, 8, BS(block_q=32, reduce_in_grid=True)),
]


@pytest.mark.parametrize(
    "case", WEIGHTED_CASES, ids=lambda c: "q{}_k{}_d{}_w{}".format(*c[1:4], c[6])
)
def test_lsh_weighted_cumulation(interpret, case):
    *shape, weight_dim, block_sizes = case
    block_sizes = _for_backend(block_sizes, interpret)
    x = _inputs(*shape, weight_dim=weight_dim)
    tau = shape[-1]
    args = _weighted_args(x)
    want = _brute_force(*x.values())
    ref = cumulation.lsh_weighted_cumulation_reference(*args, tau)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-4, atol=1e-4)
    xla = cumulation.lsh_weighted_cumulation(*args, tau)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), rtol=1e-4, atol=1e-4)
    got = cumulation.lsh_weighted_cumulation(
        *args,
        tau,
        impl="pallas",
        block_sizes=block_sizes,
        interpret=interpret,
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("row_floats", [1, 2**20], ids=["one_column_per_step", "columns_batched"])
def test_xla_weighted_cumulation_column_batching(monkeypatch, row_floats):
    """The XLA path's columns-per-step choice (incl. a padded last step: weight_dim 5 runs as
    4 + 1 + 3 zero columns) changes speed, not results."""
    monkeypatch.setattr(cumulation, "XLA_ROW_FLOATS_PER_STEP", row_floats)
    jax.clear_caches()  # the setting is read while tracing: no cached trace of the other case
    x = _inputs(2, 33, 65, 16, 7, 4, weight_dim=5, seed=4)
    args = _weighted_args(x)
    want = _brute_force(*x.values())
    got = cumulation.lsh_weighted_cumulation(*args, 4, impl="xla")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_out_of_range_codes_match_nothing():
    x = _inputs(1, 20, 20, 16, 3, 2, seed=3)
    x["query_code"][0, 0, :4] = [-1, 4, 7, 100]
    x["key_code"][0, 0, :4] = [-5, 4, 9, 2**20]
    # tau = 2: codes outside [0, 4) must not collide, not even with an equal key code.
    valid = lambda c: (c >= 0) & (c < 4)
    qc, kc = x["query_code"], x["key_code"]
    collisions = ((qc[:, :, :, None] == kc[:, :, None, :]) & valid(qc)[..., None]).sum(1)
    collisions = collisions * x["query_mask"][:, :, None] * x["key_mask"][:, None, :]
    want = np.einsum("bqk,bkd->bqd", collisions, x["value"]) / qc.shape[1]
    for got in (
        cumulation.lsh_cumulation_reference(*x.values(), 2),
        cumulation.lsh_cumulation(*x.values(), 2),
        cumulation.lsh_cumulation(*x.values(), 2, impl="pallas", interpret=True),
    ):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_block_sizes_validation():
    for field in ("block_q", "block_k", "block_table"):
        for bad in (0, 48, 8, 16.0):
            with pytest.raises(ValueError, match=field):
                BS(**{field: bad})
    with pytest.raises(ValueError, match="reduce_in_grid"):
        BS(reduce_in_grid=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BS().block_q = 64


def _bad(name, fn):
    return pytest.param(name, fn, id=name)


@pytest.mark.parametrize(
    "name, edit",
    [
        _bad("query_code", lambda x: x.update(query_code=x["query_code"][0])),
        _bad("query_code", lambda x: x.update(query_code=x["query_code"].astype(np.float32))),
        _bad("key_code", lambda x: x.update(key_code=x["key_code"][:, :2])),
        _bad("query_mask", lambda x: x.update(query_mask=x["query_mask"][:, :3])),
        _bad("key_mask", lambda x: x.update(key_mask=x["key_mask"][None])),
        _bad("value", lambda x: x.update(value=x["value"][:, :4])),
        _bad("query_weight", lambda x: x.update(query_weight=x["query_weight"][:, :, 0])),
        _bad("key_weight", lambda x: x.update(key_weight=x["key_weight"][:, :, :2])),
    ],
)
def test_shape_errors_name_the_argument(name, edit):
    x = _inputs(2, 9, 11, 8, 3, 4, weight_dim=4)
    edit(x)
    with pytest.raises(ValueError, match=name):
        cumulation.lsh_weighted_cumulation(*_weighted_args(x), 4, impl="pallas", interpret=True)
    if "weight" not in name:
        del x["query_weight"], x["key_weight"]
        for impl in ("xla", "pallas"):
            with pytest.raises(ValueError, match=name):
                cumulation.lsh_cumulation(*x.values(), 4, impl=impl, interpret=True)


def test_bad_impl_and_hash_code_len():
    x = _inputs(1, 9, 9, 8, 3, 4)
    with pytest.raises(ValueError, match="impl"):
        cumulation.lsh_cumulation(*x.values(), 4, impl="cuda")
    with pytest.raises(ValueError, match="hash_code_len"):
        cumulation.lsh_cumulation(*x.values(), 0)
