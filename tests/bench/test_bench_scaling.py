"""`xformers-jax bench --suite yoso | decoding | mlm_logits` smoke tests at toy sizes: each suite
runs both sides, skips what exceeds the memory budget, and writes well-formed JSON / Markdown / PNG
(timings are never asserted)."""

import json

import pytest

from xformers_jax import cli
from xformers_jax.bench import decoding, harness, scaling, suites, train
from xformers_jax.config_lib import UserError


def _outputs(tmp_path, suite, command=None):
    res = json.loads((tmp_path / f"{suite}.json").read_text())
    md = (tmp_path / f"{suite}.md").read_text()
    png = (tmp_path / f"{suite}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["suite"] == suite and (command or f"--suite {suite}") in res["command"]
    assert res["command"] in md
    return res, md


def test_yoso_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "YOSO", dict(lengths=(16, 32), batch=1, heads=2, head_dim=16))
    suites.main("yoso", out_dir=str(tmp_path), n=1)
    res, md = _outputs(tmp_path, "yoso")
    methods = {"yoso_sampled", "yoso_expectation", "softmax", "hf_yoso_expectation"}
    assert {(r["length"], r["method"]) for r in res["rows"]} == {
        (n, m) for n in (16, 32) for m in methods
    }
    for r in res["rows"]:
        assert r["fwd_bytes"] > 0 and r["fb_bytes"] > 0
        assert r["fwd_ms"] > 0 and r["fb_ms"] > 0 and r["fwd_reps"] == r["fb_reps"] == 1
    assert res["config"]["num_hash"] == 64 and res["config"]["hash_code_len"] == 9
    assert set(res["growth_exponent"]) == methods
    assert all(e["fwd"] is not None for e in res["growth_exponent"].values())
    assert res["sampled_beats_softmax_from"].keys() == {"fwd", "fb"}
    assert "| 32 | yoso_sampled |" in md and "growth exponent" in md


def test_yoso_suite_skips_what_exceeds_the_memory_budget(tmp_path, monkeypatch):
    methods = ("softmax", "hf_yoso_expectation")
    yoso = dict(lengths=(16, 64), batch=1, heads=2, head_dim=16, methods=methods)
    monkeypatch.setattr(scaling, "YOSO", yoso)
    # Between the [2, 16, 16] and the [2, 64, 64] score matrices' needs.
    budget = 60_000
    monkeypatch.setattr(harness, "MAX_GIB", budget / harness.GIB)
    suites.main("yoso", out_dir=str(tmp_path), n=1)
    res, md = _outputs(tmp_path, "yoso")
    assert [(r["length"], r["method"]) for r in res["rows"]] == [
        (n, m) for n in (16, 64) for m in ("softmax", "hf_yoso_expectation")
    ]
    for r in res["rows"]:
        for mode in ("fwd", "fb"):
            if r[f"{mode}_bytes"] > budget:
                assert r[f"{mode}_skipped"] == harness.skip_note(r[f"{mode}_bytes"])
                assert f"{mode}_ms" not in r and r[f"{mode}_skipped"] in md
            else:
                assert r[f"{mode}_ms"] > 0
    assert all("fb_ms" in r for r in res["rows"] if r["length"] == 16)
    assert all("fb_skipped" in r for r in res["rows"] if r["length"] == 64)


def test_decoding_suite(tmp_path, monkeypatch):
    sizes = dict(hidden=32, layers=1, heads=2, ffn=64, vocab=100)
    cfg = dict(new_tokens=(8, 16), batch=2, encoder_len=8, prompt_len=4, num_beams=2, **sizes)
    monkeypatch.setattr(decoding, "DECODING", cfg)
    # Through `python -m xformers_jax.bench.decoding`, which runs this suite.
    decoding.main(["--new", "2,4", "--n", "1", "--out", str(tmp_path)])
    res, md = _outputs(tmp_path, "decoding", "xformers_jax.bench.decoding --new 2,4 --n 1")
    keys = [(r["model"], r["mode"], r["new_tokens"]) for r in res["rows"]]
    assert keys == [
        (m, mode, n)
        for m, mode in (("mt5", "greedy"), ("mt5", "beam2"), ("xlnet", "greedy"))
        for n in (2, 4)
    ]
    for r in res["rows"]:
        assert r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and r["reps"] == 1
        # float32 random-init models, forced lengths: both sides produce the same tokens.
        assert r["same_tokens"], r
    assert [(s["model"], s["target"]) for s in res["summary"]] == [
        ("mt5", 2.0),
        ("mt5", 2.0),
        ("xlnet", 5.0),
    ]
    assert "| xlnet | greedy | 4 |" in md


def test_mlm_logits_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(
        scaling,
        "MLM",
        dict(
            vocab=1000,
            hidden=32,
            layers=1,
            heads=2,
            ffn=64,
            shapes=((2, 16),),
            max_predictions_fraction=0.25,
            vocab_chunk_size=256,
        ),
    )
    suites.main("mlm_logits", out_dir=str(tmp_path), n=1, dtype="bfloat16")
    res, md = _outputs(tmp_path, "mlm_logits")
    assert res["dtype"] == "bfloat16"
    variants = [v for v, _, _ in scaling.MLM_VARIANTS] + ["hf_full_logits"]
    assert [r["variant"] for r in res["rows"]] == variants
    by = {r["variant"]: r for r in res["rows"]}
    # Logits at 4 masked positions instead of 16 need less memory.
    assert by["masked_only"]["bytes"] < by["full_logits"]["bytes"]
    assert by["masked_only"]["max_predictions"] == 4
    assert by["vocab_chunked"]["vocab_chunk_size"] == 256
    for r in res["rows"]:
        assert r["ms"] > 0 and r["reps"] == 1 and "skipped" not in r
    assert "| 2x16 | masked_only | 4 | 0 |" in md


def test_cli_dispatch_and_errors(monkeypatch):
    calls = []
    monkeypatch.setattr(suites, "run_suite", lambda *a: calls.append(a))
    # The device switch itself is global jax state: recorded here, not applied to the test run.
    monkeypatch.setattr(harness, "select_device", lambda d: calls.append(("device", d)))
    assert (
        cli.main(
            [
                "bench",
                "--suite",
                "yoso",
                "--n",
                "2",
                "--dtype",
                "bfloat16",
                "--device",
                "cpu",
                "--out",
                "X",
            ]
        )
        == 0
    )
    assert calls == [("device", "cpu"), ("yoso", "X", 2, "bfloat16", "cpu")]
    calls.clear()
    monkeypatch.setattr(train, "main", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["bench", "--family", "xlnet"]) == 0  # default suite: today's train bench
    assert cli.main(["bench", "--suite", "train", "--n", "3"]) == 0
    default = dict(config="default", dtype="float32", overrides=None)
    assert calls == [
        ("device", None),
        ((["xlnet"], None), default),
        ("device", None),
        ((None, None), dict(default, n=3)),
    ]
    calls.clear()
    assert (
        cli.main(
            [
                "bench",
                "--bench-config",
                "xlmr_xl_512",
                "--bench-set",
                "layers=36",
                "--bench-set",
                "batch=4",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert calls == [
        ("device", None),
        (
            (None, None),
            dict(config="xlmr_xl_512", dtype="bfloat16", overrides={"layers": 36, "batch": 4}),
        ),
    ]
    with pytest.raises(UserError, match="family"):
        suites.main("yoso", families=["xlnet"])
    with pytest.raises(UserError, match="configure the train suite"):
        suites.main("yoso", config="mt5_base")
    with pytest.raises(UserError, match="unknown bench config 'nope'"):
        suites.main("train", config="nope")
    with pytest.raises(UserError, match="unknown bench suite"):
        suites.main("nope")
    for bad in ("layers", "layers=", "=3", "layers=two"):
        assert cli.main(["bench", "--bench-set", bad]) == 2
    assert cli.main(["bench", "--suite", "nope"]) == 2
