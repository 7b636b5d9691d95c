"""The Pallas kernels compiled, not only lowered, for a TPU target: forward and backward.

With libtpu installed, `jax.experimental.topologies` describes a v5p slice this machine does not
have and XLA:TPU compiles for one of its chips (deviceless AOT): Mosaic then runs its own
compiler passes on each kernel, which reject what lowering lets through (block shapes a TPU
tile does not hold, unsupported dtypes or vector layouts). Skipped without libtpu.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from xformers_jax.kernels.yoso import _common, cumulation, hadamard, ops

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed"
)


@pytest.fixture(scope="module")
def chip():
    """One chip of a described (not attached) v5p-8 slice."""
    from xformers_jax import compile as aot

    _, devices = aot.topology_devices("v5p-8")
    return devices[0]


@pytest.fixture
def tpu(monkeypatch, chip):
    """Kernels built for TPU (Mosaic compiler params, grid reduction) while tracing."""
    monkeypatch.setattr(_common, "backend", lambda: "tpu")
    jax.clear_caches()
    yield lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
        shape, dtype, sharding=SingleDeviceSharding(chip)
    )
    jax.clear_caches()


def _compile(fn, *args) -> str:
    compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernels are in the TPU executable
    return text


# Odd sizes on purpose: lengths and head dims that no tile divides, padded by the wrappers.
BATCH, LENGTH, DIM, NUM_HASH, TAU = 2, 300, 48, 37, 6


def test_fast_hash_compiles_for_tpu(tpu):
    x = tpu((BATCH, LENGTH, DIM))
    params = tpu((BATCH, 3, hadamard.num_rounds(NUM_HASH, DIM, TAU), 64))
    _compile(lambda x, p: hadamard.fast_hash(x, p, num_hash=NUM_HASH, hash_code_len=TAU), x,
             params)  # fmt: skip


@pytest.mark.parametrize("reduce_in_grid", [None, True, False])
def test_cumulation_kernels_compile_for_tpu(tpu, reduce_in_grid):
    codes, mask = tpu((BATCH, NUM_HASH, LENGTH), jnp.int32), tpu((BATCH, LENGTH))
    value, weight = tpu((BATCH, LENGTH, DIM)), tpu((BATCH, LENGTH, 4))
    kw = dict(impl="pallas", block_sizes=cumulation.BlockSizes(reduce_in_grid=reduce_in_grid))
    _compile(lambda m, c, v: cumulation.lsh_cumulation(m, c, m, c, v, TAU, **kw), mask, codes,
             value)  # fmt: skip
    _compile(
        lambda m, c, w, v: cumulation.lsh_weighted_cumulation(m, c, w, m, c, w, v, TAU, **kw),
        mask, codes, weight, value,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_lsh_attention_forward_and_backward_compile_for_tpu(tpu, dtype):
    """The model's path: fast hash + cumulation forward, the LSH backward's weighted
    cumulations, with padding masks."""
    q, mask = tpu((2, 4, 130, 64), dtype), tpu((2, 1, 130))

    def loss(q, mask):
        out = ops.yoso_lsh_attention(q, q, q, mask, mask, jax.random.key(0), num_hash=8,
                                     hash_code_len=5, impl="pallas")  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    _compile(loss, q, mask)
    text = _compile(jax.grad(loss), q, mask)
    # Forward hash + cumulation and the backward's cumulations: several kernels in one program.
    assert text.count("tpu_custom_call") >= 3
