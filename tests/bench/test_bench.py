"""`xformers-jax bench` train suite smoke tests: every family runs on both sides and the outputs
are written (tiny sizes; timings are never asserted); named configs, bfloat16 and overrides."""

import json

import pytest

from xformers_jax.bench import train
from xformers_jax.config_lib import UserError

# Shrinks any named config to seconds on a CPU (the families' own shape fields stay named).
TINY = dict(hidden=32, layers=2, heads=4, ffn=64, vocab=100, batch=2, seq=16)
TINY.update(decoder_len=8, image_size=32, patch_size=8)  # MT5's, BEiT's
# The MFU denominator's matmul, tiny too: at its default 2048 a bfloat16 matmul takes ~15 s on a
# CPU without bfloat16 units, and a run measures it 22 times per library.
PEAK = 64


@pytest.mark.slow
def test_bench_runs_and_writes_outputs(tmp_path):
    res = train.main(None, str(tmp_path), n=1, overrides=TINY, peak_size=PEAK)
    assert sorted(r["family"] for r in res["results"]) == sorted(train.CASES)
    assert res["reference_device"] == "cpu" and res["dtype"] == "float32"
    for r in res["results"]:
        assert r["train_ms"] > 0 and r["ref_train_ms"] > 0 and r["flops_per_step"] > 0
        assert r["xla_flops_per_step"] > 0 and 0 < r["mfu"] and 0 < r["ref_mfu"]
    assert json.load(open(tmp_path / "bench.json"))["results"]
    md = (tmp_path / "bench.md").read_text()
    assert "| xlm_roberta |" in md and "'default'" in md
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.parametrize("config, family", [("xlmr_xl_512", "xlm_roberta"), ("mt5_base", "mt5")])
def test_named_config_in_bfloat16(tmp_path, config, family):
    res = train.main(
        None, str(tmp_path), n=1, config=config, dtype="bfloat16", overrides=TINY, peak_size=PEAK
    )
    assert [r["family"] for r in res["results"]] == [family]  # the config's own family
    assert res["dtype"] == "bfloat16" and res["config_name"] == config
    assert res["bench_config"]["hidden"] == 32
    r = res["results"][0]
    assert r["train_ms"] > 0 and r["ref_train_ms"] > 0 and r["mfu"] > 0
    assert f"'{config}'" in (tmp_path / "bench.md").read_text()
    module, params, batch, loss_fn = train.CASES[family].build_ours(res["bench_config"], "bfloat16")
    assert module.config.dtype == "bfloat16"
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(params)} == {"float32"}


def test_named_configs_have_the_model_shapes():
    xl, base = train.bench_config("xlmr_xl_512"), train.bench_config("mt5_base")
    assert (xl["hidden"], xl["heads"], xl["ffn"], xl["vocab"], xl["seq"]) == (
        2560,
        32,
        10240,
        250880,
        512,
    )
    assert (base["hidden"], base["heads"], base["ffn"], base["vocab"], base["layers"]) == (
        768,
        12,
        2048,
        250112,
        12,
    )
    assert train.bench_config("default", {"layers": 36})["layers"] == 36
    assert train.CONFIGS["default"]["layers"] == 4  # overrides copy


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("xl", None, "unknown bench config 'xl'"),
        ("default", {"depth": 3}, "has no field 'depth'"),
        ("default", {"families": 3}, "has no field 'families'"),
        ("default", {"layers": 0}, "layers must be a positive int"),
        ("default", {"layers": 2.5}, "layers must be a positive int"),
        ("default", {"heads": 3}, "not a multiple of heads 3"),
    ],
)
def test_bad_bench_config(name, overrides, match):
    with pytest.raises(UserError, match=match):
        train.bench_config(name, overrides)


def test_unknown_family_and_dtype():
    with pytest.raises(UserError, match="unknown bench family 'gpt'"):
        train.run(["gpt"], n=1, overrides=TINY, peak_size=PEAK)
    with pytest.raises(UserError, match="float32 or bfloat16"):
        train.run(None, n=1, dtype="float16", overrides=TINY, peak_size=PEAK)
