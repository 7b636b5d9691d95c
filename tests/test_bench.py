"""`xformers-jax bench` smoke test: every family runs on both sides and the outputs are written
(tiny sizes; timings are never asserted)."""

import json

from xformers_jax import bench


def test_bench_runs_and_writes_outputs(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.__dict__, "BENCH", dict(hidden=32, layers=2, heads=4, ffn=64,
                                                      vocab=100, batch=2, seq=16))  # fmt: skip
    monkeypatch.setitem(bench.BEIT, "image_size", 32)
    monkeypatch.setitem(bench.BEIT, "patch_size", 8)
    monkeypatch.setattr(bench, "BENCH_DECODER_LEN", 8)
    res = bench.main(None, str(tmp_path), n=1)
    assert sorted(r["family"] for r in res["results"]) == sorted(bench.CASES)
    for r in res["results"]:
        assert r["train_ms"] > 0 and r["ref_train_ms"] > 0 and r["flops_per_step"] > 0
    assert json.load(open(tmp_path / "bench.json"))["results"]
    assert "| xlm_roberta |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0
