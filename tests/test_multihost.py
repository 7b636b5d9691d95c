"""Multi-host runs (real jax.distributed processes on 127.0.0.1, `launch/local_multihost.sh`)
train the same losses as one host, whichever mesh axis spans the hosts.

The global batch of a step holds the same rows in the same order on any host count
(`sharding.batch_block`), so even dropout masks agree: the runs keep dropout on.
"""

import os
import subprocess

import numpy as np
import pytest

from tests.test_reliability import ROOT, _cli, _env, _losses

STEPS = ["--config.train.steps=3", "--config.train.batch_size=8", "--config.log.every_steps=1"]


def _eval_loss(workdir) -> float:
    import json

    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return next(r["loss"] for r in rows if r["split"] == "eval" and r["step"] == 0)


def _two_hosts(workdir, corpus, *overrides):
    launch = [os.path.join(ROOT, "launch", "local_multihost.sh"), "-n", "2", "-d", "2", "--"]
    res = subprocess.run(launch + _cli(workdir, corpus, *STEPS, *overrides), env=_env(),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def one_host(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    res = subprocess.run(_cli(workdir, corpus, *STEPS, "--config.mesh.tensor=4"), env=_env(4),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


@pytest.mark.parametrize(
    "mesh",
    [
        # tensor spans both hosts: every device holds every row, both hosts feed the whole batch.
        ["--config.mesh.data=1", "--config.mesh.tensor=4"],
        # fsdp spans both hosts: each host feeds its half.
        pytest.param(["--config.mesh.data=1", "--config.mesh.fsdp=4"], marks=pytest.mark.slow),
    ],
    ids=["tensor_across_hosts", "fsdp_across_hosts"],
)
@pytest.mark.slow
def test_two_hosts_train_the_losses_of_one(mesh, one_host, corpus, tmp_path):
    _two_hosts(tmp_path, corpus, *mesh)
    a, b = _losses(one_host), _losses(tmp_path)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
    np.testing.assert_allclose(_eval_loss(tmp_path), _eval_loss(one_host), rtol=2e-5)


@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_on_all(corpus, tmp_path):
    """A preemption notice (SIGTERM) to one host of two: JAX's coordination service agrees on a
    step, both hosts save it together and exit 0; the run resumes from it."""
    import signal
    import time

    from tests.test_reliability import _steps_logged, _wait_for

    port = str(21000 + os.getpid() % 20000)
    args = ["--config.train.steps=1000", "--config.checkpoint.every_steps=500",
            "--config.log.every_steps=1"]  # fmt: skip
    procs = []
    for i in range(2):
        env = _env(2) | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}  # fmt: skip
        procs.append(subprocess.Popen(_cli(tmp_path, corpus, *args), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    try:
        _wait_for(lambda: _steps_logged(tmp_path) >= 3, procs[0], timeout=600)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # host 1 only
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 500, saved
    assert f"SIGTERM: saved step {saved[0]}" in outs[0]
