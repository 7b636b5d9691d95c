"""Test set-up: 8 fake CPU devices (set before jax is imported anywhere) and shared fixtures.

`pytest --portable-backward` (or `XFORMERS_JAX_PORTABLE_BACKWARD=1`) runs every test with the
backward passes TPU and GPU runs take, `layers.cpu_backward` switched off; by default tests trace
the CPU ones, and `tests/test_dense_backward.py` checks that both paths agree.
"""

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

from tests import gcs  # noqa: E402

# The Google client libraries read these when their first client is made: point them at the
# emulator (tests/gcs.py) before anything can create one.
os.environ.update(gcs.ENV)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--portable-backward",
        action="store_true",
        help="trace with the portable backward passes (layers.cpu_backward off), in subprocesses "
        "too; same as XFORMERS_JAX_PORTABLE_BACKWARD=1",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with `make test-slow`")
    if not hasattr(config, "workerinput"):
        # The controlling process, before any worker or subprocess exists: every test then runs
        # where only 127.0.0.1 is reachable.
        config._network_not_isolated = gcs.isolate_network()
    if config.getoption("--portable-backward"):
        # Read at every trace, and inherited by the processes tests start.
        os.environ["XFORMERS_JAX_PORTABLE_BACKWARD"] = "1"


_CRASH_RESCHEDULED: set[str] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """A test whose xdist worker died of a native crash (a signal, not a failure or an error)
    runs once more on a fresh worker; the crash stays in the summary as a skip that names it.
    A second crash of the same test fails it."""
    if crashitem in _CRASH_RESCHEDULED:
        return
    _CRASH_RESCHEDULED.add(crashitem)
    sched.mark_test_pending(crashitem)
    report.outcome = "skipped"
    report.longrepr = (report.location[0], 0, f"{report.longrepr}; rescheduled once")


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """Parity tests compare against float32 PyTorch: use full-precision matmuls."""
    import jax

    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny multilingual text corpus (`helpers.tiny_corpus`), one per test module."""
    from tests.helpers import tiny_corpus

    return tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture
def config_file():
    """`tests/configs/presets.py`: base_config, presets `tiny` / `base` and two placeholders."""
    return os.path.join(os.path.dirname(__file__), "configs", "presets.py")


@pytest.fixture(scope="session")
def gcs_emulator():
    """A fake-gcs-server for this worker (tests/gcs.py); `gcs_emulator.bucket()` makes a bucket."""
    emulator = gcs.Emulator()
    yield emulator
    emulator.close()


@pytest.fixture
def bucket(gcs_emulator):
    """A fresh empty `gs://...` bucket on the emulator."""
    return gcs_emulator.bucket()
