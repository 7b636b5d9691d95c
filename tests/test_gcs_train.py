"""Training with a gs:// workdir and gs:// data, against the fake-gcs-server emulator
(`tests/gcs.py`): every file lands in the bucket, the run resumes exactly from it, and nothing
local named `gs:` ever appears."""

import json
import os

import jax
import numpy as np
import pytest

from tests.helpers import tiny_mlm_config
from xformers_jax import paths, train


def _losses(workdir: str) -> dict[int, float]:
    rows = [json.loads(x) for x in paths.read_text(paths.join(workdir, "metrics.jsonl")).split("\n")
            if x.strip()]  # fmt: skip
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
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

    # Export the trained head from the gs:// workdir into the bucket; it loads back.
    import xformers_jax as xj
    from xformers_jax import cli

    hf_out = bucket + "/export/mlm"
    assert cli.main(["export", "--checkpoint", run, "--hf-out", hf_out]) == 0
    assert "config.json" in paths.listdir(hf_out)
    model, trained = xj.from_pretrained(hf_out), train.load_trained_model(run)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(trained.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.parametrize("url", ["s3://b/run", "gcs://b/run"])
def test_unknown_scheme_workdir_is_one_line(corpus, url):
    from xformers_jax import config_lib

    with pytest.raises(config_lib.UserError, match="unsupported URL scheme"):
        train.train_and_evaluate(tiny_mlm_config(corpus, train__steps=1), url)


@pytest.mark.slow
def test_sigkill_during_gs_saves_resumes_from_a_complete_checkpoint(corpus, bucket, tmp_path):
    """SIGKILLs at random moments of a gs:// run that saves every step: each restart resumes
    from a complete checkpoint in the bucket (Orbax's GCS commit marker), the last run finishes
    with the losses of a straight run."""
    import random
    import signal
    import subprocess
    import time

    from tests.test_reliability import _cli, _env

    def logged() -> int:
        f = run + "/metrics.jsonl"
        return max(_losses(run), default=0) if paths.exists(f) else 0

    rng = random.Random(0)
    run = bucket + "/killed"
    args = ["--config.train.steps=30", "--config.checkpoint.every_steps=1",
            "--config.checkpoint.max_to_keep=2", "--config.log.every_steps=1"]  # fmt: skip
    resumed = []
    for _ in range(4):
        proc = subprocess.Popen(_cli(run, corpus, *args), env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=tmp_path)  # fmt: skip
        start, t0 = logged(), time.time()
        while logged() <= start + 1 and proc.poll() is None and time.time() - t0 < 600:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        assert "Traceback" not in out, out[-3000:]
        resumed += [int(x.split("step")[1].split()[0]) for x in out.splitlines()
                    if "Resuming from checkpoint at step" in x]  # fmt: skip
    assert len(resumed) >= 3 and resumed == sorted(resumed)
    res = subprocess.run(_cli(run, corpus, *args), env=_env(), capture_output=True, text=True,
                         timeout=900, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    straight = tmp_path / "straight"
    res = subprocess.run(_cli(straight, corpus, *args), env=_env(), capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(str(straight)), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])
    assert not os.path.exists(tmp_path / "gs:")
