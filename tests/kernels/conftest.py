"""Kernel-test set-up: make ``xformers_jax.kernels`` importable and run each body two ways.

``kernels/`` is installed as ``xformers_jax.kernels`` (setuptools package-dir). Without the
editable install (a fresh checkout, or pytest not run from the repo root) that name does not
resolve, or resolves to another checkout's (an editable install elsewhere), so it is mapped here
onto this repo's ``kernels/`` directory; with this repo's install this is a no-op. The
``interpret`` fixture runs a test body with ``interpret=True`` (Pallas interpreter, any backend)
and compiled (skipped when the default backend is the CPU).
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _ensure_kernels_importable() -> None:
    try:
        kernels = importlib.import_module("xformers_jax.kernels")
        # An editable install of another checkout maps the name onto *its* kernels/: test this
        # repo's.
        if Path(kernels.__file__).resolve().parent == REPO / "kernels":
            return
        for name in [m for m in sys.modules if m.startswith("xformers_jax.kernels")]:
            del sys.modules[name]
    except ImportError:
        pass
    try:
        parent = importlib.import_module("xformers_jax")
    except ImportError:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        try:
            parent = importlib.import_module("xformers_jax")
        except ImportError:
            # Last resort: an empty package that still finds the real submodules on disk.
            parent = types.ModuleType("xformers_jax")
            parent.__path__ = [str(REPO / "xformers_jax")]
            sys.modules["xformers_jax"] = parent
    spec = importlib.util.spec_from_file_location(
        "xformers_jax.kernels",
        REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["xformers_jax.kernels"] = module
    spec.loader.exec_module(module)
    parent.kernels = module


_ensure_kernels_importable()


@pytest.fixture(params=[True, False], ids=["interpret", "compiled"])
def interpret(request):
    """``True``: the Pallas interpreter; ``False``: compiled, only on a GPU / TPU backend."""
    import jax

    if not request.param and jax.default_backend() == "cpu":
        pytest.skip("compiled Pallas needs a GPU (Triton) or TPU (Mosaic); backend is cpu")
    return request.param
