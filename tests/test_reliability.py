"""What a week-long pod run relies on: exact resume after SIGKILL, atomic checkpoints, preemption,
resharding onto other meshes, non-finite losses, one-line errors, multi-host runs.

Subprocess tests run the real CLI (`python -m xformers_jax train ...`) on a tiny config.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, tiny_mlm_config
from xformers_jax import checkpoint as ckpt_lib
from xformers_jax import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Restarted processes reuse each other's compiled steps: a persistent compilation cache.
_CACHE = tempfile.mkdtemp(prefix="xfj-test-jax-cache-")


def _env(devices: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    env["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _cli(workdir, corpus, *overrides) -> list[str]:
    return [
        sys.executable, "-m", "xformers_jax", "train", "--config", TINY_CONFIG,
        "--workdir", str(workdir), f"--config.data.train_files=['{corpus}']",
        f"--config.data.eval_files=['{corpus}']", *overrides,
    ]  # fmt: skip


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, **kw)


def _losses(workdir) -> dict[int, float]:
    """Train loss per step; a step logged twice (before a kill and after resume) keeps the last."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


def _final_params(workdir, step):
    from xformers_jax import checkpoint

    params, _, _ = checkpoint.load_params_from_checkpoint(str(workdir), step=step)
    return params


def _wait_for(predicate, proc, timeout=300.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _steps_logged(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max([json.loads(x)["step"] for x in open(path) if '"train"' in x] or [0])


@pytest.mark.slow
def test_exact_resume_after_sigkill(corpus, tmp_path):
    """Straight 8 steps == 8 steps with a SIGKILL after the step-4 checkpoint and a restart:
    bit-identical per-step losses and params."""
    steps = ["--config.train.steps=8", "--config.checkpoint.every_steps=2",
             "--config.checkpoint.async_save=False"]  # fmt: skip
    straight = tmp_path / "straight"
    assert _run(_cli(straight, corpus, *steps)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, corpus, *steps), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(lambda: os.path.isdir(killed / "checkpoints" / "4"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = _run(_cli(killed, corpus, *steps))
    assert res.returncode == 0, res.stderr
    assert "Resuming from checkpoint at step" in res.stdout

    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in a] == [b[s] for s in a]
    jax.tree.map(np.testing.assert_array_equal, _final_params(straight, 8),
                 _final_params(killed, 8))  # fmt: skip


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_partial_checkpoint(corpus, tmp_path):
    """20 SIGKILLs at random moments of a run that saves every step: each restart resumes from
    a complete checkpoint; the last run finishes."""
    rng = random.Random(0)
    args = ["--config.train.steps=400", "--config.checkpoint.every_steps=1",
            "--config.checkpoint.max_to_keep=2"]  # fmt: skip
    resumed_from = []
    for _ in range(20):
        proc = subprocess.Popen(
            _cli(tmp_path, corpus, *args), env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        start = _steps_logged(tmp_path)
        _wait_for(lambda s=start: _steps_logged(tmp_path) > s, proc)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        assert "Traceback" not in out, out
        for line in out.splitlines():
            if "Resuming from checkpoint at step" in line:
                resumed_from.append(int(line.split("step")[1].split()[0]))
    assert len(resumed_from) >= 19 and resumed_from == sorted(resumed_from)
    # The last run finishes the same 400-step run (saving every step, as the killed ones did).
    res = _run(_cli(tmp_path, corpus, *args))
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_0(corpus, tmp_path):
    args = ["--config.train.steps=1000", "--config.checkpoint.every_steps=500"]
    proc = subprocess.Popen(_cli(tmp_path, corpus, *args), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(lambda: _steps_logged(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
    assert len(saved) == 1 and 3 <= saved[0] < 500
    assert f"SIGTERM: saved step {saved[0]}" in out
    res = _run(_cli(tmp_path, corpus, f"--config.train.steps={saved[0] + 2}"))
    assert res.returncode == 0 and f"at step {saved[0]}" in res.stdout


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(corpus, tmp_path):
    """Written on 8 devices (data x fsdp x tensor = 2x2x2); restored onto 4, 2, 1 devices and
    another mesh shape with identical values; training goes on."""
    cfg = tiny_mlm_config(corpus, train__steps=2, checkpoint__every_steps=2)
    with cfg.unlocked():
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    train.train_and_evaluate(cfg, str(tmp_path))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), every_steps=0, max_to_keep=3)
    reference = None
    devices = jax.devices()
    for n, shape in [(8, (2, 2, 2)), (4, (1, 2, 2)), (2, (1, 1, 2)), (1, (1, 1, 1)),
                     (8, (1, 4, 2))]:  # fmt: skip
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices[:n])
        s = train.setup(cfg, str(tmp_path), mesh=mesh)
        abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
        state, data_state = ckpt.restore(2, abstract)
        host = jax.device_get(state)
        if reference is None:
            reference = (host, data_state)
        else:
            jax.tree.map(np.testing.assert_array_equal, host, reference[0])
            assert data_state == reference[1]
        batch = next(iter(s.task.train_data(0, 1)))
        with sharding.use_mesh(mesh, s.rules):
            _, metrics = s.train_step(state, s.to_global(batch), s.rng)
        assert np.isfinite(float(metrics["loss"]))
    ckpt.close()


def test_skip_nonfinite_drops_bad_updates(corpus, tmp_path):
    cfg = tiny_mlm_config(corpus, train__steps=4, optim__lr=1e30, train__skip_nonfinite=True)
    with cfg.unlocked():
        cfg.optim.warmup_steps = 0
    result = train.train_and_evaluate(cfg, str(tmp_path))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"train"' in x]
    assert result["step"] == 4 and sum(r["skipped_steps"] for r in rows) >= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--config.train.steps=abc"], "train.steps"),
        (["--config.data.seq_len=64"], "position"),
    ],
)
def test_bad_input_is_one_line(corpus, tmp_path, args, message):
    res = _run(_cli(tmp_path / "w", corpus, *args))
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip() and "Warning" not in x]
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_bad_corpus_files_are_one_line(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("\n\n")
    binary.write_bytes(b"fine line\n\x00\x01 broken\n")
    for path, message in ((empty, "empty"), (binary, ":2:")):
        res = _run(_cli(tmp_path / "w", str(path)))
        assert res.returncode == 2, res.stderr
        lines = [x for x in res.stderr.splitlines() if x.strip() and "Warning" not in x]
        assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], res.stderr


def test_workdir_that_is_a_file(corpus, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = _run(_cli(f, corpus))
    assert res.returncode == 2 and "not a directory" in res.stderr


@pytest.mark.slow
def test_two_hosts_match_one_host(corpus, tmp_path):
    """2 processes x 4 devices (jax.distributed on 127.0.0.1) == 1 process x 8 devices in loss;
    the checkpoint saved across hosts restores (the rerun resumes)."""
    # Dropout on: the global batch holds the same rows in the same order on any host count.
    args = ["--config.train.steps=4", "--config.checkpoint.every_steps=2"]
    one = tmp_path / "one"
    res = subprocess.run(_cli(one, corpus, *args), env=_env(8), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    two = tmp_path / "two"
    launch = [os.path.join(ROOT, "launch", "local_multihost.sh"), "-n", "2", "-d", "4", "--"]
    res = subprocess.run(launch + _cli(two, corpus, *args), env=_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    res = subprocess.run(launch + _cli(two, corpus, "--config.train.steps=6", *args[1:]),
                         env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0 and "Resuming from checkpoint at step 4" in res.stdout
