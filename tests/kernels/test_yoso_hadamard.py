"""Tests of the fast Hadamard LSH hash: Pallas kernel == jnp reference, bit for bit."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax.kernels.yoso import hadamard

# (batch, length, dim, num_hash, hash_code_len, per-batch params, block_l)
CASES = [
    (2, 33, 32, 5, 4, True, 128),
    (2, 127, 48, 37, 6, False, 32),  # dim padded to 64; 4 length blocks
    (1, 33, 64, 37, 9, True, 128),  # 7 codes a round, 6 bits of every round unused
    (2, 127, 128, 5, 8, True, 16),
]


def _inputs(batch, length, dim, num_hash, tau, per_batch, seed=0):
    # numpy inputs: eager jax.random ops would each compile, for nothing.
    x = np.random.default_rng(seed).normal(size=(batch, length, dim)).astype(np.float32)
    params = hadamard.make_hash_params(
        jax.random.key(seed), num_hash, dim, tau, batch_size=batch if per_batch else None
    )
    return x, params


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_l{}_d{}_h{}_t{}_pb{}_bl{}".format(*c))
def test_fast_hash_matches_reference_exactly(interpret, case):
    batch, length, dim, num_hash, tau, per_batch, block_l = case
    x, params = _inputs(batch, length, dim, num_hash, tau, per_batch)
    # Exact zero rows (padding / masked tokens) must hash alike too.
    x[0, -3:] = 0.0
    codes = hadamard.fast_hash(
        x,
        params,
        num_hash=num_hash,
        hash_code_len=tau,
        block_sizes=hadamard.BlockSizes(block_l=block_l),
        interpret=interpret,
    )
    expected = hadamard.fast_hash_reference(x, params, num_hash=num_hash, hash_code_len=tau)
    assert codes.shape == (batch, num_hash, length) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected))
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**tau
    # Many distinct codes: the bits are not stuck.
    assert len(np.unique(np.asarray(codes))) > min(2**tau, 8) // 2


@pytest.mark.parametrize("block", [None, 16, 1024])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_l{}_d{}_h{}_t{}_pb{}_bl{}".format(*c))
def test_fast_hash_xla_matches_reference_exactly(case, block):
    """The XLA path's layout / blocking changes speed only: codes equal the reference's."""
    batch, length, dim, num_hash, tau, per_batch, _ = case
    x, params = _inputs(batch, length, dim, num_hash, tau, per_batch)
    x[0, -3:] = 0.0
    x[-1, :2] *= 1e-30  # tiny magnitudes hash alike too
    kwargs = dict(num_hash=num_hash, hash_code_len=tau)
    codes = hadamard.fast_hash_xla(x, params, block=block, **kwargs)
    expected = hadamard.fast_hash_reference(x, params, **kwargs)
    assert codes.shape == (batch, num_hash, length) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected))


def _sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_walsh_hadamard_transform_is_sylvester(n):
    np.testing.assert_array_equal(
        np.asarray(hadamard.walsh_hadamard_transform(jnp.eye(n))), _sylvester(n)
    )
    x = np.random.default_rng(0).normal(size=(3, n)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(hadamard.walsh_hadamard_transform(jnp.asarray(x))),
        x @ _sylvester(n),
        rtol=1e-5,
        atol=1e-5,
    )


def test_reference_is_sign_bits_of_hd3hd2hd1x():
    """Codes are the LSB-first packing of sign(H D3 H D2 H D1 x) in groups of tau."""
    batch, length, dim, num_hash, tau = 1, 5, 16, 5, 3
    x, params = _inputs(batch, length, dim, num_hash, tau, per_batch=False)
    codes = np.asarray(
        hadamard.fast_hash_reference(x, params, num_hash=num_hash, hash_code_len=tau)
    )
    h, d = _sylvester(16), np.asarray(params, np.float64)  # [3, rounds, 16]
    per_round = 16 // tau
    for r in range(d.shape[1]):
        y = np.asarray(x[0], np.float64)
        for k in range(3):
            y = (y * d[k, r]) @ h
        for g in range(per_round):
            if r * per_round + g < num_hash:
                bits = (y[:, g * tau : (g + 1) * tau] > 0).astype(int)
                want = bits @ (1 << np.arange(tau))
                np.testing.assert_array_equal(codes[0, r * per_round + g], want)


def test_hash_reproducible_scale_invariant_and_key_dependent():
    x, params = _inputs(2, 33, 32, 8, 4, per_batch=True)
    run = lambda x, p: np.asarray(hadamard.fast_hash_reference(x, p, num_hash=8, hash_code_len=4))
    make = lambda seed: hadamard.make_hash_params(jax.random.key(seed), 8, 32, 4, batch_size=2)
    np.testing.assert_array_equal(np.asarray(make(5)), np.asarray(make(5)))
    np.testing.assert_array_equal(run(x, make(5)), run(x, make(5)))
    # Powers of two scale every butterfly exactly: codes depend on the direction only.
    np.testing.assert_array_equal(run(4.0 * x, params), run(x, params))
    assert np.mean(run(x, make(6)) != run(x, make(5))) > 0.5
    assert set(np.unique(np.asarray(params))) == {-1.0, 1.0}
    assert params.shape == (2, 3, 1, 32)  # 32 // 4 = 8 codes a round: one round
    assert hadamard.make_hash_params(jax.random.key(0), 9, 48, 4).shape == (3, 1, 64)
    assert hadamard.make_hash_params(jax.random.key(0), 37, 64, 9).shape == (3, 6, 64)


def test_collision_probability_is_yoso_kernel():
    """P[codes collide] ~ (1 - angle / pi) ** tau, the expectation YOSO-E computes exactly."""
    batch, dim, num_hash, tau = 64, 64, 256, 2
    angles = np.array([0.3, 1.0, 2.0])
    rng = np.random.default_rng(0)
    u = rng.normal(size=(batch, dim))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    w = rng.normal(size=(batch, dim))
    w -= (w * u).sum(-1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    rows = [u] + [np.cos(a) * u + np.sin(a) * w for a in angles]
    x = jnp.asarray(np.stack(rows, axis=1), jnp.float32)  # [batch, 1 + len(angles), dim]
    params = hadamard.make_hash_params(jax.random.key(3), num_hash, dim, tau, batch_size=batch)
    codes = np.asarray(
        hadamard.fast_hash_reference(x, params, num_hash=num_hash, hash_code_len=tau)
    )
    rate = (codes[:, :, 1:] == codes[:, :, :1]).mean(axis=(0, 1))
    np.testing.assert_allclose(rate, (1 - angles / math.pi) ** tau, atol=0.03)


def test_block_sizes_validation():
    for bad in (0, 100, 8, 2.0):
        with pytest.raises(ValueError, match="block_l"):
            hadamard.BlockSizes(block_l=bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hadamard.BlockSizes().block_l = 256


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, p: (x[0], p, 5, 4), "x must be"),
        (lambda x, p: (x.astype(jnp.int32), p, 5, 4), "x must be floating"),
        (lambda x, p: (x, p[:, :, :, :16], 5, 4), "params"),
        (lambda x, p: (x, p[:1], 5, 4), "params batch"),
        (lambda x, p: (x, p[0, :2], 5, 4), "params"),
        (lambda x, p: (x, p, 5, 33), "hash_code_len"),
        (lambda x, p: (x, p, 5, 0), "hash_code_len"),
        (lambda x, p: (x, p, 0, 4), "num_hash"),
        (lambda x, p: (x, p, 400, 4), "params"),  # more codes than the params' rounds give
    ],
)
def test_shape_errors_name_the_argument(make, match):
    x, params = _inputs(2, 9, 32, 5, 4, per_batch=True)
    x, params, num_hash, tau = make(x, params)
    for fn in (hadamard.fast_hash, hadamard.fast_hash_reference):
        with pytest.raises(ValueError, match=match):
            kwargs = {"interpret": True} if fn is hadamard.fast_hash else {}
            fn(x, params, num_hash=num_hash, hash_code_len=tau, **kwargs)
    with pytest.raises(ValueError, match="hash_code_len"):
        hadamard.make_hash_params(jax.random.key(0), 4, 8, 17)
    with pytest.raises(ValueError, match="batch_size"):
        hadamard.make_hash_params(jax.random.key(0), 4, 8, 4, batch_size=0)
