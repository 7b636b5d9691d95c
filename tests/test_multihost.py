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
def test_two_hosts_train_the_losses_of_one(mesh, one_host, corpus, tmp_path):
    _two_hosts(tmp_path, corpus, *mesh)
    a, b = _losses(one_host), _losses(tmp_path)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
    np.testing.assert_allclose(_eval_loss(tmp_path), _eval_loss(one_host), rtol=2e-5)
