"""The CPU-tuned backward passes (`layers.cpu_backward`, custom VJPs) give the plain autodiff
values, op by op and for a train step of every family."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_scan_unroll import CASES
from xformers_jax.layers import cpu_backward, dense
from xformers_jax.layers.mlp import gelu_tanh


@pytest.mark.parametrize(
    "x_shape, k_shape, n",
    [((2, 5, 8), (8, 3), 1), ((2, 5, 4, 6), (4, 6, 7), 2), ((3, 8), (8, 2, 5), 1)],
)
def test_contract_cpu_gradients(x_shape, k_shape, n):
    kx, kk = jax.random.split(jax.random.key(0))
    x, k = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, n)))  # noqa: E731
    got = jax.grad(loss(cpu_backward.contract), (0, 1))(x, k)
    want = jax.grad(loss(dense._contract), (0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(7,), (4, 7), (1, 4, 7), (3, 4, 7)])
def test_add_bias_gradients(bias_shape):
    ky, kb = jax.random.split(jax.random.key(1))
    y, b = jax.random.normal(ky, (3, 4, 7)), jax.random.normal(kb, bias_shape)
    loss = lambda f: lambda y, b: jnp.sum(jnp.sin(f(y, b)) * jnp.arange(7.0))  # noqa: E731
    got = jax.grad(loss(dense.add_bias), (0, 1))(y, b)
    want = jax.grad(loss(lambda y, b: y + b), (0, 1))(y, b)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _needs_cpu_backward():
    if not cpu_backward.enabled():
        pytest.skip(f"the CPU backward is switched off ({cpu_backward.ENV} / --portable-backward)")


def test_portable_backward_traces_plain_ops():
    _needs_cpu_backward()
    f = lambda x, k: jnp.sum(dense.DenseGeneral(3, ("embed", "mlp")).apply({"params": k}, x))  # noqa: E731
    x = jnp.ones((2, 4))
    params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((3,))}
    cpu = str(jax.make_jaxpr(jax.grad(f, 1))(x, params))
    with cpu_backward.portable_backward():
        portable = str(jax.make_jaxpr(jax.grad(f, 1))(x, params))
    # On CPU the bias gradient is a matrix-vector product; the portable one is a reduction.
    assert cpu.count("dot_general") > portable.count("dot_general")
    assert "reduce_sum[axes=(0,)" in portable and "reduce_sum[axes=(0,)" not in cpu


def test_gelu_tanh_matches_jax():
    x = jnp.linspace(-6.0, 6.0, 101)
    np.testing.assert_allclose(gelu_tanh(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(gelu_tanh))(x),
        jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x),
        rtol=1e-5,
        atol=1e-6,
    )


def _pre_ln_stack(cut: bool):
    def loss(ws, x):
        for w in ws:
            if cut:
                x = dense.residual(x)
            h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
            x = x + jnp.tanh(h @ w) * 0.5
        return jnp.sum(x * x)

    return loss


def _max_fusion_operands(fn, *args) -> int:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return max(m.group(1).count("%") for m in re.finditer(r"= \S+ fusion\((.*?)\), kind", hlo))


def test_residual_cuts_the_gradient_chain():
    _needs_cpu_backward()
    ws = jax.random.normal(jax.random.key(0), (8, 64, 64)) * 0.1
    x = jax.random.normal(jax.random.key(1), (32, 64))
    plain, cut = jax.grad(_pre_ln_stack(False), (0, 1)), jax.grad(_pre_ln_stack(True), (0, 1))
    for g, w in zip(cut(ws, x), plain(ws, x)):
        np.testing.assert_array_equal(g, w)
    # Without the cut, XLA's CPU fusion recomputes the residual gradient of every block above
    # in each block's fusions (operands grow with depth: 59 for these 8 blocks); with it a
    # fusion reads one block's values.
    assert _max_fusion_operands(plain, ws, x) > 4 * _max_fusion_operands(cut, ws, x)
    assert "cond" in str(jax.make_jaxpr(cut)(ws, x))
    with cpu_backward.portable_backward():
        assert "cond" not in str(jax.make_jaxpr(jax.grad(_pre_ln_stack(True)))(ws, x))


@pytest.mark.parametrize("family", sorted(CASES))
def test_train_step_equal_on_both_paths(family):
    """Every family's loss and gradients (3 scanned layers, float32) are the same traced with the
    CPU backward passes as with the portable ones that TPU and GPU runs take (that the switch
    changes the trace: `test_portable_backward_traces_plain_ops`)."""
    _needs_cpu_backward()
    module, batch = CASES[family](1)
    # Random params of the model's shapes: no init to compile.
    shapes = jax.eval_shape(lambda r: module.init(r, **batch)["params"], jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    loss_and_grads = jax.value_and_grad(lambda p: module.apply({"params": p}, **batch).loss)

    def both_paths(p):  # one program, one compile
        cpu = loss_and_grads(p)
        with cpu_backward.portable_backward():
            return cpu, loss_and_grads(p)

    (cpu_loss, cpu_grads), (loss, grads) = jax.jit(both_paths)(params)
    np.testing.assert_allclose(cpu_loss, loss, rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
