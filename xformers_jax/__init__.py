"""xformers_jax: JAX/Flax pretraining and fine-tuning of XLM-R(-XL), XLNet, YOSO, BEiT and MT5.

The public API, imported lazily so `import xformers_jax` stays cheap (no jax until it is used):

    import xformers_jax as xj
    model = xj.from_pretrained("path/to/hf_dir")
    xj.save_pretrained(model, "path/to/out")
    config = xj.load_config("configs/xlm_roberta/pretrain_mlm.py:tiny")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "from_pretrained": "xformers_jax.hub",
    "save_pretrained": "xformers_jax.hub",
    "PretrainedModel": "xformers_jax.hub",
    "load_config": "xformers_jax.config_lib",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'xformers_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
