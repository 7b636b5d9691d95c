"""The Pallas kernels lower for GPU (Triton IR) and TPU (Mosaic) even on a CPU-only machine.

``jit(...).trace(...).lower(lowering_platforms=...)`` runs the Pallas -> Triton / Mosaic lowering
in Python, which rejects unsupported primitives, block shapes and dtypes. It does not run the
final Triton -> PTX or Mosaic -> TPU compilation (that needs the device), so this complements,
not replaces, the compiled variants of the other kernel tests.
"""

import jax
import jax.numpy as jnp
import pytest

from xformers_jax.kernels.yoso import _common, cumulation, hadamard, ops

PLATFORMS = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


@pytest.fixture(params=sorted(PLATFORMS))
def target(request, monkeypatch):
    """Pretends the default backend is ``request.param`` while tracing (compiler params and
    the reduction structure are picked from it); caches are cleared so no trace leaks."""
    monkeypatch.setattr(_common, "backend", lambda: request.param)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


def _lower(target, fn, *args):
    platform, marker = PLATFORMS[target]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
    return text


def test_kernels_lower_for_accelerators(target):
    batch, length, dim, num_hash, tau = 2, 300, 48, 37, 6
    spec = jax.ShapeDtypeStruct
    x = spec((batch, length, dim), jnp.float32)
    params = spec((batch, 3, hadamard.num_rounds(num_hash, dim, tau), 64), jnp.float32)
    _lower(
        target,
        lambda x, p: hadamard.fast_hash(x, p, num_hash=num_hash, hash_code_len=tau),
        x,
        params,
    )

    codes, mask = spec((batch, num_hash, length), jnp.int32), spec((batch, length), jnp.float32)
    weight = spec((batch, length, 4), jnp.float32)
    for reduce_in_grid in (None, False) if target == "gpu" else (None, True, False):
        kwargs = dict(
            impl="pallas", block_sizes=cumulation.BlockSizes(reduce_in_grid=reduce_in_grid)
        )
        _lower(
            target,
            lambda m, c, v: cumulation.lsh_cumulation(m, c, m, c, v, tau, **kwargs),
            mask,
            codes,
            x,
        )
        _lower(
            target,
            lambda m, c, w, v: cumulation.lsh_weighted_cumulation(
                m, c, w, m, c, w, v, tau, **kwargs
            ),
            mask,
            codes,
            weight,
            x,
        )


def test_grid_reduction_is_refused_on_gpu(target):
    if target != "gpu":
        pytest.skip("reduce_in_grid=True is the TPU structure")
    mask = jnp.ones((1, 8))
    codes = jnp.zeros((1, 2, 8), jnp.int32)
    with pytest.raises(ValueError, match="reduce_in_grid"):
        cumulation.lsh_cumulation(
            mask,
            codes,
            mask,
            codes,
            jnp.ones((1, 8, 4)),
            3,
            impl="pallas",
            block_sizes=cumulation.BlockSizes(reduce_in_grid=True),
        )


def test_attention_gradients_lower_for_accelerators(target):
    q = jax.ShapeDtypeStruct((2, 4, 130, 64), jnp.bfloat16)

    def loss(q):
        out = ops.yoso_lsh_attention(
            q, q, q, None, None, jax.random.key(0), num_hash=8, hash_code_len=5, impl="pallas"
        )
        return jnp.sum(out.astype(jnp.float32))

    _lower(target, jax.grad(loss), q)
