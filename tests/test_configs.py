"""Every config file and every preset builds, validates, and names a model the registry builds."""

import glob
import importlib.util
import os

import pytest

from xformers_jax import config_lib, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.py")))


def _presets(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return sorted(getattr(mod, "RUNS", None) or getattr(mod, "PRESETS", None) or [""])


CASES = [(f, p) for f in FILES for p in _presets(f)]


def test_every_family_has_configs():
    families = {os.path.basename(os.path.dirname(f)) for f in FILES}
    assert {"xlm_roberta", "xlnet", "beit", "mt5"} <= families


@pytest.mark.parametrize(
    "path,preset", CASES, ids=[f"{os.path.relpath(f, ROOT)}:{p}" for f, p in CASES]
)
def test_config_builds(path, preset):
    c = config_lib.load_config(f"{path}:{preset}" if preset else path)
    config_lib.validate(c)
    module, cfg, arch = models.build_model(c.model, task=c.task)
    assert arch and module is not None
    # The module docstring holds the launch command.
    doc = open(path).read().split('"""')[1]
    assert "xformers-jax train --config configs/" in doc, path
