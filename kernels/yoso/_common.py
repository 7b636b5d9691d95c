"""Small helpers shared by the YOSO kernels: power-of-two arithmetic, validation, backends."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Every in-kernel matmul runs at full float32 precision: TF32 / single-pass bf16 would round the
# Hadamard butterflies (breaking bit-exact hash codes) and the one-hot table reads.
HIGHEST = lax.Precision.HIGHEST

# Triton's tl.dot needs every matmul dimension to be at least 16; padding to it costs nothing on
# the other backends.
MIN_DOT_DIM = 16

IMPLS = ("xla", "pallas")

# Codes are packed as float32 sums of powers of two in the hash kernel (exact below 2**24), and
# tables have 2**tau rows: far too many long before this bound.
MAX_HASH_CODE_LEN = 24


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_block_size(name: str, value: Any, minimum: int = MIN_DOT_DIM) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a power of two >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not is_power_of_2(value):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (Triton tl.dot minimum), got {value}")


def effective_block(block: int, length: int) -> int:
    """The block actually used along an axis of size ``length``.

    Short axes get one power-of-two block that covers them (at least ``MIN_DOT_DIM``), so a
    33-token sequence runs as one 64-row block instead of a mostly-empty 128-row one. The padded
    axis then equals the block, which also satisfies Mosaic's "divisible by (8, 128) or equal to
    the full dimension" rule.
    """
    return min(block, max(MIN_DOT_DIM, next_power_of_2(length)))


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def backend() -> str:
    """The platform kernels are built for: ``'tpu'``, ``'gpu'`` or ``'cpu'``.

    The one place that asks, so tests can lower for a platform this machine lacks.
    """
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Backend compiler params for ``pl.pallas_call``.

    TPU: Mosaic params marking the parallel grid axes (megacore sharding). GPU: Triton params:
    without them this jax lowers GPU kernels with Mosaic GPU, which these kernels do not target.
    Elsewhere (CPU, where only the interpreter runs): None.
    """
    platform = backend()
    if platform == "tpu":
        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
    if platform == "gpu":
        return pltriton.CompilerParams()
    return None
