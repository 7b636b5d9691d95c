"""Multi-host start-up: `jax.distributed.initialize` from the environment, before any jax use.

Set by `launch/*` scripts:
  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
      explicit (local processes, SLURM)
  XFJ_DISTRIBUTED=auto
      jax's own cluster detection (Cloud TPU pods, SLURM)
Nothing set: a single process (the default). CPU processes talk over gloo.
"""

from __future__ import annotations

import os

_initialized = False


def initialize_from_env() -> bool:
    """Initialises jax.distributed when the environment asks for it; returns whether it did."""
    global _initialized
    if _initialized:
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    auto = os.environ.get("XFJ_DISTRIBUTED", "").lower() in ("1", "auto", "true")
    if not address and not auto:
        return False
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
        # Cross-process collectives on CPU need an explicit implementation.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    _initialized = True
    return True


def _has_accelerator() -> bool:
    """Whether a TPU or GPU runtime is installed (checked without starting a backend)."""
    import importlib.util

    return any(
        importlib.util.find_spec(m) is not None
        for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")
    )
