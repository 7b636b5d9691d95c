"""The trainer end to end on a tiny model: loss goes down, checkpoints, resume, outputs."""

import json
import os

import numpy as np
import pytest

from tests.helpers import tiny_mlm_config
from xformers_jax import train


def _train_losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_train_writes_outputs_and_lowers_loss(corpus, tmp_path, capsys):
    cfg = tiny_mlm_config(corpus, train__steps=40, optim__lr=1e-2, checkpoint__every_steps=20)
    cfg.log.every_steps = 5
    result = train.train_and_evaluate(cfg, str(tmp_path))
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"] - 0.3
    for name in ("metrics.jsonl", "loss.png", "config.json", "tokenizer.model"):
        assert os.path.exists(tmp_path / name), name
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    row = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][1]
    for key in ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_per_sec", "accuracy"):
        assert key in row
    out = capsys.readouterr().out
    assert "Starting from scratch" in out and "eval loss: first" in out


def test_resume_continues_exactly(corpus, tmp_path):
    straight = tmp_path / "straight"
    train.train_and_evaluate(tiny_mlm_config(corpus), str(straight))

    resumed = tmp_path / "resumed"
    first = train.train_and_evaluate(tiny_mlm_config(corpus, train__steps=3), str(resumed))
    assert first["step"] == 3
    second = train.train_and_evaluate(tiny_mlm_config(corpus), str(resumed))
    assert second["start_step"] == 3 and second["step"] == 6

    a, b = _train_losses(straight), _train_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)])


def test_nonfinite_loss_stops_and_keeps_checkpoint(corpus, tmp_path):
    cfg = tiny_mlm_config(corpus, train__steps=3)
    train.train_and_evaluate(cfg, str(tmp_path))
    # An absurd learning rate blows the params up within a few steps.
    cfg = tiny_mlm_config(corpus, train__steps=12, optim__lr=1e30)
    cfg.optim.warmup_steps = 0
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step"):
        train.train_and_evaluate(cfg, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert steps[-1] <= 6


def test_profile_window_writes_a_trace(corpus, tmp_path):
    cfg = tiny_mlm_config(corpus, train__steps=4)
    cfg.profile.steps = [2, 4]
    train.train_and_evaluate(cfg, str(tmp_path))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)


@pytest.mark.parametrize("steps", [[3], [0, 2], [4, 4], [1, 2, 3]])
def test_bad_profile_steps_are_one_line(corpus, steps):
    from xformers_jax import config_lib

    cfg = tiny_mlm_config(corpus)
    cfg.profile.steps = steps
    with pytest.raises(config_lib.ConfigError, match="profile.steps"):
        config_lib.validate(cfg)


def test_second_start_loads_the_step_from_the_compilation_cache(corpus, tmp_path):
    """Two starts of a run with `train.compilation_cache_dir`: the second compiles nothing that
    the first compiled (every compile a cache hit)."""
    import subprocess

    from tests.test_reliability import _cli, _env

    env = _env()
    env.pop("JAX_COMPILATION_CACHE_DIR")
    cache = tmp_path / "cache"
    args = [f"--config.train.compilation_cache_dir={cache}", "--config.train.steps=2"]
    first = subprocess.run(_cli(tmp_path / "a", corpus, *args), env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert "0 hits" in first.stdout and os.listdir(cache)
    second = subprocess.run(_cli(tmp_path / "b", corpus, *args), env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    line = next(x for x in second.stdout.splitlines() if "compilation cache:" in x)
    assert " 0 misses" in line and " 0 hits" not in line, line
