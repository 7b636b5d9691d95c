"""`xformers-jax compile`: the train step compiled for a Cloud TPU topology on this CPU machine.

Needs libtpu (the `test` extra installs it); without it the compiles are skipped.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from xformers_jax import cli
from xformers_jax import compile as aot

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed"
)

# One pretraining preset of every family (the CPU-sized ones: a compile takes tens of seconds).
PRETRAINING = [
    "configs/xlm_roberta/pretrain_mlm.py:tiny",
    "configs/xlnet/pretrain_plm.py:tiny",
    "configs/mt5/pretrain_span.py:tiny",
    "configs/beit/pretrain_mim.py:tiny",
    "configs/yoso/pretrain_mlm.py:tiny",
]


def _error_line(capsys) -> str:
    """Our one error line (libtpu writes its own start-up warnings to stderr too)."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("xformers-jax:")]
    assert len(ours) == 1, err
    return ours[0]


@pytest.mark.parametrize(
    "name,desc,chips",
    [
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-256", "v5p:4x4x8", 128),
        ("v5p-512", "v5p:4x8x8", 256),
        ("v4-128", "v4:4x4x4", 64),
        ("v5e-256", "v5e:16x16", 256),
        ("v5litepod-8", "v5e:2x4", 8),
        ("v6e-1", "v6e:1x1", 1),
        ("v6e-32", "v6e:4x8", 32),
    ],
)
def test_topology_names(name, desc, chips):
    assert aot.topology(name)[1:] == (desc, chips)


@pytest.mark.parametrize("name", ["v3-8", "v5p-4", "v5p-12", "v5e-2", "tpu", "v5p-"])
def test_unknown_topology_is_one_line_exit_2(name, capsys):
    argv = ["compile", "--config", PRETRAINING[0], "--topology", name]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert f"unknown topology {name!r}" in line and "v5p-N" in line and "v6e-N" in line


@needs_libtpu
def test_mesh_the_topology_cannot_hold(capsys):
    argv = ["compile", "--config", PRETRAINING[0], "--topology", "v5p-8", "--config.mesh.tensor=8"]
    assert cli.main(argv) == 2
    assert "4-device slice cannot hold the config's mesh" in _error_line(capsys)


@needs_libtpu
@pytest.mark.parametrize("spec", PRETRAINING)
@pytest.mark.slow
def test_every_family_compiles_for_v5p_8(spec, tmp_path, capsys):
    out = tmp_path / "compile.json"
    argv = ["compile", "--config", spec, "--topology", "v5p-8", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "total / device" in printed and "FLOPs / step" in printed
    r = json.loads(out.read_text())
    for key in (
        "temp_bytes",
        "argument_bytes",
        "output_bytes",
        "total_bytes",
        "hbm_bytes",
        "flops",
        "compile_seconds",
        "analytic_flops",
    ):
        assert r[key] > 0, key
    assert r["devices"] == 4 and r["topology_desc"] == "v5p:2x2x1"
    assert r["mesh"]["data"] * r["mesh"]["fsdp"] * r["mesh"]["tensor"] == 4
    assert r["total_bytes"] == (
        r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    )
    assert r["total_bytes"] < r["hbm_bytes"] == 95 * 2**30
    # The state is donated: its outputs reuse the argument buffers.
    assert 0 < r["alias_bytes"] <= min(r["argument_bytes"], r["output_bytes"])
    assert r["flops"] == pytest.approx(4 * r["flops_per_device"])
    # XLA counts a scanned layer stack's loop body once (and what the analytic count leaves out:
    # remat recompute, the optimizer): the same order for these 2-4 layer models.
    assert 0.2 < r["flops"] / r["analytic_flops"] < 5
    # The cost-only unrolled lowering counts every layer: more than the compiled step's one
    # layer body, no loop left, and (XLM-R, the dense path) within a few percent of analytic.
    assert r["xla_flops"] > r["flops"]
    # YOSO's LSH kernels (Pallas) loop inside themselves; every other step unrolls completely.
    assert r["loops_left"] is ("yoso" in spec)
    if spec == PRETRAINING[0]:
        assert 1.0 < r["xla_flops"] / r["analytic_flops"] < 1.08
    assert r["step_seconds_estimate"] > 0
    assert "XLA's estimate, not measured" in printed and "layers unrolled" in printed


@needs_libtpu
@pytest.mark.slow
def test_step_that_does_not_fit_exits_2_with_one_line(capsys):
    argv = [
        "compile",
        "--config",
        PRETRAINING[0],
        "--topology",
        "v5p-8",
        "--config.train.batch_size=4194304",
    ]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("xformers-jax: error: the step does not fit v5p-8: it needs ")
    assert "GiB per device" in line and "v5p chip has 95.7 GiB of HBM" in line


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "topology,slices,devices,data",
    [("v5p-8", 2, 8, 8), ("v4-8", 1, 4, 4), ("v5e-8", 1, 8, 8)],
)
def test_other_generations_and_multislice(topology, slices, devices, data, tmp_path):
    from xformers_jax import config_lib

    r = aot.compile_step(config_lib.load_config(PRETRAINING[0]), topology, slices)
    assert r["devices"] == devices and r["mesh"]["data"] == data
    assert 0 < r["total_bytes"] < r["hbm_bytes"]


# The fused attention kernel (the Pallas TPU flash kernel) in every family with softmax attention
# (YOSO has none). Attention dropout off: with it on, the step takes einsum (layers.attention).
FLASH = [
    ("configs/xlm_roberta/pretrain_mlm.py:tiny", ["model.attention_probs_dropout_prob=0.0"]),
    ("configs/xlnet/pretrain_plm.py:tiny", ["model.dropout=0.0"]),
    ("configs/mt5/pretrain_span.py:tiny", []),
    ("configs/beit/pretrain_mim.py:tiny", []),
]


@needs_libtpu
@pytest.mark.parametrize("spec,overrides", FLASH, ids=[s.split("/")[1] for s, _ in FLASH])
@pytest.mark.slow
def test_every_family_compiles_with_flash_attention_for_v5p_8(spec, overrides):
    from xformers_jax import config_lib

    config = config_lib.load_config(spec, ["model.attention_kernel=flash", *overrides])
    r = aot.compile_step(config, "v5p-8")
    assert r["devices"] == 4 and 0 < r["total_bytes"] < r["hbm_bytes"]
    assert r["temp_bytes"] > 0 and r["flops"] > 0
