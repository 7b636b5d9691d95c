"""Tests of the YOSO attention ops: forward values, custom-VJP gradients, and parity of the
expectation mode with transformers' ``YosoCumulation`` formula evaluated in PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax.kernels.yoso import cumulation, hadamard, ops


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(lead=(2,), q_len=33, k_len=33, dim=32, value_dim=None, seed=0):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(*lead, q_len, dim))).astype(np.float32)
    # Keys near the queries so that LSH codes collide often enough to matter.
    k = _unit(q[..., :1, :] + 0.6 * rng.normal(size=(*lead, k_len, dim))).astype(np.float32)
    v = rng.normal(size=(*lead, k_len, value_dim or dim)).astype(np.float32)
    q_mask = (rng.random((*lead, q_len)) > 0.2).astype(np.float32)
    k_mask = (rng.random((*lead, k_len)) > 0.2).astype(np.float32)
    grad = rng.normal(size=(*lead, q_len, value_dim or dim)).astype(np.float32)
    return q, k, v, q_mask, k_mask, grad


def _torch_yoso_cumulation(q, k, v, q_mask, k_mask, grad, tau):
    """transformers' ``YosoCumulation.forward`` / ``.backward``, in torch ops, on [B, L, D]."""
    import torch

    q, k, v, q_mask, k_mask, grad = map(torch.from_numpy, (q, k, v, q_mask, k_mask, grad))
    expectation = (1 - torch.acos(torch.matmul(q, k.transpose(-1, -2))) / math.pi) ** tau
    expectation = expectation * q_mask[:, :, None] * k_mask[:, None, :]
    out = torch.matmul(expectation, v)
    weighted_exp = torch.matmul(grad, v.transpose(-1, -2)) * expectation
    grad_q = torch.matmul(weighted_exp, (tau / 2) * k)
    grad_k = torch.matmul(weighted_exp.transpose(-1, -2), (tau / 2) * q)
    grad_v = torch.matmul(expectation.transpose(-1, -2), grad)
    return [t.numpy() for t in (out, grad_q, grad_k, grad_v)]


def _vjp(fn, q, k, v, grad):
    """``[out, grad_q, grad_k, grad_v]`` of ``fn`` at (q, k, v) for output cotangent ``grad``."""

    @jax.jit  # one compiled program instead of op-by-op dispatch
    def run(q, k, v, grad):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(grad))

    return [np.asarray(a) for a in run(q, k, v, grad)]


def _close(got, want, tol=1e-5):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def test_expectation_attention_matches_transformers_formula():
    q, k, v, q_mask, k_mask, grad = _inputs(q_len=33, k_len=47, value_dim=16)
    for tau in (4, 9):
        fn = lambda q, k, v: ops.yoso_expectation_attention(q, k, v, q_mask, k_mask, tau)
        _close(_vjp(fn, q, k, v, grad), _torch_yoso_cumulation(q, k, v, q_mask, k_mask, grad, tau))


def test_lsh_attention_dense_backward_matches_transformers_formula():
    """``lsh_backward=False``: transformers' ``YosoLSHCumulation`` uses YosoCumulation's grads."""
    q, k, v, q_mask, k_mask, grad = _inputs()
    fn = lambda q, k, v: ops.yoso_lsh_attention(
        q, k, v, q_mask, k_mask, jax.random.key(0), num_hash=8, hash_code_len=4, lsh_backward=False
    )
    _, *grads = _vjp(fn, q, k, v, grad)
    _, *want = _torch_yoso_cumulation(q, k, v, q_mask, k_mask, grad, 4)
    _close(grads, want)


def _lsh_brute_force(q, k, v, q_mask, k_mask, grad, key, num_hash, tau):
    """Output and LSH-backward grads from explicit [Lq, Lk] collision counts (float64)."""
    params = hadamard.make_hash_params(key, num_hash, q.shape[-1], tau, batch_size=q.shape[0])
    hash_ = lambda x: np.asarray(
        hadamard.fast_hash_reference(x, params, num_hash=num_hash, hash_code_len=tau)
    )
    q_code, k_code = hash_(q), hash_(k)
    p = (q_code[:, :, :, None] == k_code[:, :, None, :]).mean(1)
    p = p * q_mask[:, :, None] * k_mask[:, None, :]
    q, k, v, grad = (a.astype(np.float64) for a in (q, k, v, grad))
    w = np.einsum("bqd,bkd->bqk", grad, v) * p
    return [
        np.einsum("bqk,bkd->bqd", p, v),
        np.einsum("bqk,bkd->bqd", w, tau / 2 * k),
        np.einsum("bqk,bqd->bkd", w, tau / 2 * q),
        np.einsum("bqk,bqd->bkd", p, grad),
    ], p


@pytest.mark.parametrize("num_hash, tau, dim", [(5, 4, 32), (37, 6, 48)])
def test_lsh_attention_and_lsh_backward_match_collision_counts(num_hash, tau, dim):
    q, k, v, q_mask, k_mask, grad = _inputs(q_len=33, k_len=40, dim=dim)
    key = jax.random.key(7)
    fn = lambda q, k, v: ops.yoso_lsh_attention(
        q, k, v, q_mask, k_mask, key, num_hash=num_hash, hash_code_len=tau
    )
    got = _vjp(fn, q, k, v, grad)
    want, p = _lsh_brute_force(q, k, v, q_mask, k_mask, grad, key, num_hash, tau)
    assert 0.05 < (p > 0).mean() < 0.95  # collisions happen, but not everywhere
    _close(got, want, tol=1e-4)
    np.testing.assert_array_equal(got[0][q_mask == 0], 0.0)


def _directional_fd(fn, x, direction, eps=1.0):
    return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("mode", ["lsh", "expectation"])
def test_grad_v_matches_finite_differences(mode):
    """Both outputs are linear in v, so the custom grad_v is the true one (and a central
    difference with a large step is exact up to float32 rounding)."""
    q, k, v, q_mask, k_mask, grad = _inputs(dim=16)
    if mode == "lsh":
        attend = lambda v: ops.yoso_lsh_attention(
            q, k, v, q_mask, k_mask, jax.random.key(1), num_hash=16, hash_code_len=3
        )
    else:
        attend = lambda v: ops.yoso_expectation_attention(q, k, v, q_mask, k_mask, 5)
    loss = jax.jit(lambda v: jnp.sum(attend(v) * grad))
    direction = np.random.default_rng(1).normal(size=v.shape).astype(np.float32)
    analytic = float(jnp.sum(jax.jit(jax.grad(loss))(v) * direction))
    np.testing.assert_allclose(_directional_fd(loss, v, direction), analytic, rtol=1e-3, atol=1e-4)


def test_expectation_grad_q_is_yoso_surrogate_of_true_gradient():
    """The surrogate keeps the true gradient's direction well enough to train on: for
    near-parallel q, k the exact derivative of E is within a factor of the tau/2 * E one."""
    q, k, v, q_mask, k_mask, grad = _inputs(dim=16)
    loss = lambda q: jnp.sum(ops.yoso_expectation_attention(q, k, v, q_mask, k_mask, 4) * grad)
    true_loss = lambda q: jnp.sum(
        jnp.einsum("bqk,bkd->bqd", ops.expectation_matrix(q, k, q_mask, k_mask, 4), v) * grad
    )
    np.testing.assert_allclose(loss(q), true_loss(q), rtol=1e-5)
    surrogate = jax.jit(jax.grad(loss))(q).ravel()
    exact = jax.jit(jax.grad(true_loss))(q).ravel()
    cosine = float(surrogate @ exact / (jnp.linalg.norm(surrogate) * jnp.linalg.norm(exact)))
    assert cosine > 0.5


def test_pallas_impl_matches_xla_impl(interpret):
    q, k, v, q_mask, k_mask, grad = _inputs(lead=(1, 2), q_len=33, k_len=20, dim=16)
    key = jax.random.key(3)
    results = []
    for impl in ("xla", "pallas"):
        fn = lambda q, k, v, impl=impl: ops.yoso_lsh_attention(
            q,
            k,
            v,
            q_mask,
            k_mask,
            key,
            num_hash=5,
            hash_code_len=4,
            impl=impl,
            interpret=interpret,
            cumulation_block_sizes=cumulation.BlockSizes(block_k=16),
        )
        results.append(_vjp(fn, q, k, v, grad))
    _close(results[1], results[0], tol=1e-5)


def test_leading_axes_broadcast_masks_and_reproducibility():
    q, k, v, _, _, _ = _inputs(lead=(2, 3), q_len=17, k_len=17, dim=8)
    mask = np.ones((2, 1, 17), np.float32)
    mask[1, :, 10:] = 0
    run = lambda key, **kw: np.asarray(
        ops.yoso_lsh_attention(q, k, v, mask, mask, key, num_hash=16, hash_code_len=2, **kw)
    )
    out = run(jax.random.key(0))
    assert out.shape == (2, 3, 17, 8)
    np.testing.assert_array_equal(out, run(jax.random.key(0)))
    assert not np.allclose(out, run(jax.random.key(1)))
    np.testing.assert_array_equal(out[1, :, 10:], 0.0)
    flat = np.asarray(
        ops.yoso_lsh_attention(
            *(x.reshape(6, 17, 8) for x in (q, k, v)),
            np.repeat(mask, 3, 1).reshape(6, 17),
            None,
            jax.random.key(0),
            num_hash=16,
            hash_code_len=2,
        )
    )
    # Same key, same flattened rows -> same hash functions; batch 0 masks nothing, so its
    # output does not depend on k_mask=None here.
    np.testing.assert_array_equal(out[0], flat[:3])
    expectation = ops.yoso_expectation_attention(q, k, v, mask, None, 3)
    assert expectation.shape == (2, 3, 17, 8)
    bf16 = ops.yoso_lsh_attention(
        *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
        None,
        None,
        jax.random.key(0),
        num_hash=4,
        hash_code_len=2,
    )
    assert bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "name, edit",
    [
        ("q", lambda a: a.update(q=a["q"][0])),
        ("k", lambda a: a.update(k=a["k"][..., :8])),
        ("v", lambda a: a.update(v=a["v"][:, :5])),
        ("q_mask", lambda a: a.update(q_mask=a["q_mask"][:, :4])),
        ("k_mask", lambda a: a.update(k_mask=np.ones((3, 33)))),
        ("impl", lambda a: a.update(impl="cuda")),
        ("hash_code_len", lambda a: a.update(hash_code_len=40)),
        ("num_hash", lambda a: a.update(num_hash=0)),
    ],
)
def test_shape_errors_name_the_argument(name, edit):
    q, k, v, q_mask, k_mask, _ = _inputs()
    args = dict(q=q, k=k, v=v, q_mask=q_mask, k_mask=k_mask, num_hash=4, hash_code_len=4)
    edit(args)
    with pytest.raises(ValueError, match=name):
        ops.yoso_lsh_attention(key=jax.random.key(0), **args)
    if name not in ("impl", "num_hash"):
        del args["num_hash"]
        args.pop("impl", None)
        if name == "hash_code_len":
            args["hash_code_len"] = 0
        with pytest.raises(ValueError, match=name):
            ops.yoso_expectation_attention(**args)
