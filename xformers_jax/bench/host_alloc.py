"""glibc malloc settings for XLA:CPU runs (the CLI applies them before jax starts).

XLA:CPU allocates an executable's temporaries as one buffer per call, on its own threads: about
450 MB for the bench XLM-R train step. A thread arena cannot hold a request that large, so glibc
serves it from a fresh `mmap` and unmaps it on free, whatever `M_MMAP_MAX` says; every step then
faults in and zeroes every page again (~115k page faults, a quarter of the step on a 2-core VM).
One arena, no `mmap` and no trimming keep that memory in the process, and each step reuses it
(0 page faults per step after the first). The costs: the process keeps its peak heap until it
exits, and its threads share one arena lock (XLA compiles ~10% slower: 5.1 s instead of 4.5 s for
the bench XLM-R step, repaid within a few steps).

Applied to CPU-only runs (no accelerator plugin installed, or `JAX_PLATFORMS=cpu`), on glibc,
unless `XFORMERS_JAX_HOST_MALLOC=system`. Scripts that call the trainer from Python can call
`tune_for_xla_cpu()` first thing (before jax computes anything: XLA's threads must not have
arenas yet).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_ENV = "XFORMERS_JAX_HOST_MALLOC"


def _cpu_only() -> bool:
    """True when jax will run on the host CPU: `JAX_PLATFORMS` names cpu first, or no GPU/TPU
    plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def tune_for_xla_cpu() -> bool:
    """Sets glibc's malloc to one arena, no mmap, no trimming, for a CPU-only run.

    Returns whether the settings were applied (False: not glibc, an accelerator run, or
    `XFORMERS_JAX_HOST_MALLOC=system`).
    """
    if os.environ.get(_ENV, "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    if not _cpu_only():
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt differs
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0)
    # -1 disables trimming (mallopt(3)); a positive threshold is an int, and steps whose
    # temporaries exceed 2 GiB were trimmed at INT_MAX and faulted back in every few calls.
    ok = ok and mallopt(M_TRIM_THRESHOLD, -1)
    return bool(ok)
