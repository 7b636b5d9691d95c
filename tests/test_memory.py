"""The memory planner: exact per-device param/optimizer bytes for a mesh, no memory used."""

import math

import pytest

from tests.helpers import TINY_CONFIG
from xformers_jax import config_lib, memory


def test_xl_on_a_pod_mesh():
    cfg = config_lib.load_config("configs/xlm_roberta/pretrain_mlm.py:xl")
    r = memory.estimate(cfg, 256)
    assert r["mesh"] == {"data": 4, "fsdp": 16, "tensor": 4}
    assert abs(r["params"] - 3.483e9) / 3.483e9 < 0.01
    # Every big matrix splits over fsdp x tensor (64): params ~ 4 bytes * N / 64.
    assert r["param_bytes"] == pytest.approx(4 * r["params"] / 64, rel=0.02)
    assert r["opt_bytes"] == pytest.approx(2 * r["param_bytes"], rel=0.01)  # AdamW mu + nu
    assert "XLMRobertaXLForMaskedLM" in memory.report(r)


def test_compile_gives_activation_bytes():
    cfg = config_lib.load_config(TINY_CONFIG, ["mesh.fsdp=2", "mesh.tensor=2"])
    r = memory.estimate(cfg, 8, compile=True)
    assert r["temp_bytes"] > 0 and r["total_bytes"] >= r["temp_bytes"]
    one = memory.estimate(config_lib.load_config(TINY_CONFIG, ["mesh.data=1"]), 1)
    assert math.isclose(one["param_bytes"], 4 * one["params"])


def test_compile_without_devices_is_a_clear_error():
    cfg = config_lib.load_config(TINY_CONFIG)
    with pytest.raises(config_lib.UserError, match="XLA_FLAGS"):
        memory.estimate(cfg, 64, compile=True)


@pytest.mark.parametrize(
    "spec,devices",
    [
        ("configs/xlm_roberta/pretrain_mlm.py:xxl", 256),
        ("configs/mt5/pretrain_span.py:xxl", 256),
        ("configs/xlnet/pretrain_plm.py:large", 8),
        ("configs/beit/pretrain_mim.py:large", 8),
        ("configs/yoso/pretrain_mlm.py:base", 8),
    ],
)
def test_largest_preset_of_every_family(spec, devices):
    cfg = config_lib.load_config(spec)
    r = memory.estimate(cfg, devices)
    assert r["params"] > 1e8 and 0 < r["param_bytes"] <= 4 * r["params"]
    assert r["per_device_state_bytes"] == r["param_bytes"] + r["opt_bytes"]
