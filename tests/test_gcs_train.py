"""Training with a gs:// workdir and gs:// data, against the fake-gcs-server emulator
(`tests/gcs.py`): every file lands in the bucket, the run resumes exactly from it, and nothing
local named `gs:` ever appears."""

import json
import os

import numpy as np
import pytest

from tests.helpers import tiny_mlm_config
from xformers_jax import paths, train


def _losses(workdir: str) -> dict[int, float]:
    rows = [json.loads(x) for x in paths.read_text(paths.join(workdir, "metrics.jsonl")).split("\n")
            if x.strip()]  # fmt: skip
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_gs_workdir_trains_resumes_exactly_and_keeps_everything_in_the_bucket(
    corpus, bucket, gcs_emulator, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data = bucket + "/data/corpus.txt"
    paths.copy(corpus, data)  # the training text is read from the bucket too
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(tiny_mlm_config(corpus), straight)

    run = bucket + "/runs/mlm"
    cfg = lambda **kw: tiny_mlm_config(data, checkpoint__every_steps=3, **kw)  # noqa: E731
    first = train.train_and_evaluate(cfg(train__steps=3), run)
    assert first["step"] == 3
    second = train.train_and_evaluate(cfg(), run)
    assert second["start_step"] == 3 and second["step"] == 6

    a, b = _losses(straight), _losses(run)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])

    objects = gcs_emulator.objects(bucket)
    for name in ("config.json", "metrics.jsonl", "loss.png", "tokenizer.model"):
        assert f"runs/mlm/{name}" in objects, (name, objects)
    assert any(o.startswith("runs/mlm/tb/events") for o in objects)
    assert any(o.startswith("runs/mlm/checkpoints/3/state/") for o in objects)
    assert any(o.startswith("runs/mlm/checkpoints/6/state/") for o in objects)
    assert paths.read_bytes(run + "/loss.png").startswith(b"\x89PNG")
    assert not os.path.exists(tmp_path / "gs:")
    assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))

    ev = train.evaluate(cfg(), run)
    assert np.isfinite(ev["loss"])


@pytest.mark.parametrize("url", ["s3://b/run", "gcs://b/run"])
def test_unknown_scheme_workdir_is_one_line(corpus, url):
    from xformers_jax import config_lib

    with pytest.raises(config_lib.UserError, match="unsupported URL scheme"):
        train.train_and_evaluate(tiny_mlm_config(corpus, train__steps=1), url)
