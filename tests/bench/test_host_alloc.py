"""The CLI's glibc malloc settings: when they apply, and that they stop per-step page faults."""

import os
import subprocess
import sys
import textwrap

import pytest

from xformers_jax.bench import host_alloc

# Allocates and frees a 256 MB buffer 5 times and prints the minor page faults of the last 4:
# with glibc's defaults each one is a fresh mmap (~65k faults), tuned it is reused (~0). numpy's
# own transparent-huge-page advice is turned off: XLA's buffers get none.
_PROBE = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from xformers_jax.bench import host_alloc
    applied = host_alloc.tune_for_xla_cpu() if sys.argv[1] == "tuned" else False
    core = np._core if hasattr(np, "_core") else np.core
    core.multiarray._set_madvise_hugepage(False)  # 4 KiB pages, as XLA's buffers get
    np.ones(2**26, np.float32)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        np.ones(2**26, np.float32)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """
)


def _probe(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_reuses_large_buffers():
    applied, tuned = _probe("tuned", JAX_PLATFORMS="cpu")
    _, default = _probe("default", JAX_PLATFORMS="cpu")
    assert applied == "True"
    assert default > 4 * 60_000  # 4 x 256 MB faulted in page by page
    assert tuned < 1_000, tuned


def test_not_applied_off_cpu_or_when_disabled(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_alloc._cpu_only()
    assert host_alloc.tune_for_xla_cpu() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_alloc._cpu_only()
    monkeypatch.setenv("XFORMERS_JAX_HOST_MALLOC", "system")
    assert host_alloc.tune_for_xla_cpu() is False
