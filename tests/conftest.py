"""Test set-up: 8 fake CPU devices (set before jax is imported anywhere) and shared fixtures."""

import os

# Optimisation level 0 halves XLA:CPU compile times, which dominate this suite; numerics stay
# IEEE float32 (parity tolerances are unaffected).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with `make test-slow`")


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """Parity tests compare against float32 PyTorch: use full-precision matmuls."""
    import jax

    with jax.default_matmul_precision("float32"):
        yield
