"""Sharding: mesh construction, the rules table, and one train step on 8 fake devices with
data x fsdp x tensor sharding giving the loss and params of the 1-device run."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import tiny_corpus, tiny_mlm_config
from xformers_jax import sharding, train


def test_mesh_shape_resolves_and_rejects():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_rules_and_fit():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.fit_spec(P("tensor", "fsdp"), (901629, 64), mesh) == P(None, "fsdp")
    rules = sharding.rules_from_config({"rules": [("vocab", None)]})
    assert dict(rules)["vocab"] is None and dict(rules)["embed"] == "fsdp"


def _run_step(cfg, workdir, mesh, params, batch):
    s = train.setup(cfg, workdir, mesh=mesh)
    state = s.init_state(s.rng)
    state = state.replace(params=jax.device_put(params, s.param_shardings))
    with sharding.use_mesh(mesh):
        state, metrics = s.train_step(state, s.to_global(batch), s.rng)
    return jax.device_get(metrics["loss"]), jax.device_get(state.params), state


def test_train_step_8_devices_matches_1_device(tmp_path):
    corpus = tiny_corpus(str(tmp_path))
    cfg = tiny_mlm_config(corpus)
    cfg.model.hidden_dropout_prob = 0.0
    cfg.model.attention_probs_dropout_prob = 0.0
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    s1 = train.setup(cfg, str(tmp_path), mesh=one)
    params = jax.device_get(s1.init_state(s1.rng).params)
    batch = next(iter(s1.task.train_data(0, 1)))

    loss1, params1, _ = _run_step(cfg, str(tmp_path), one, params, batch)
    eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loss8, params8, state8 = _run_step(cfg, str(tmp_path), eight, params, batch)

    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params8, params1)
    # The params really are split: the q kernel [layers, embed, heads, kv] over fsdp and tensor.
    q = state8.params["model"]["layers"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len({d.id for d in q.sharding.device_set}) == 8


@pytest.mark.parametrize(
    "mesh, blocks",
    [
        ({"data": 1, "fsdp": 1, "tensor": 8}, [((0,), 1), ((0,), 1)]),  # tensor across hosts
        ({"data": 2, "fsdp": 1, "tensor": 4}, [((0,), 2), ((1,), 2)]),
        ({"data": 2, "fsdp": 2, "tensor": 2}, [((0, 1), 4), ((2, 3), 4)]),
        # The physical device order interleaves the hosts along fsdp / data.
        ({"data": 1, "fsdp": 8, "tensor": 1}, [((0, 2, 4, 6), 8), ((1, 3, 5, 7), 8)]),
    ],
)
def test_batch_blocks_of_a_two_host_pod(mesh, blocks):
    """The rows each host of a v5p-16 (2 hosts x 4 chips, described by libtpu) must feed."""
    import ml_collections

    from xformers_jax import compile as aot

    _, devices = aot.topology_devices("v5p-16")
    m = sharding.make_mesh(ml_collections.ConfigDict(mesh), devices)
    assert [sharding.batch_block(m, 16, p) for p in (0, 1)] == blocks
    # Every row is fed by some host, and hosts that share a device slice feed the same rows.
    fed = {b for bl, _ in blocks for b in bl}
    assert fed == set(range(blocks[0][1]))
    with pytest.raises(ValueError, match="does not split over the mesh's data x fsdp = 8"):
        sharding.batch_block(sharding.make_mesh(ml_collections.ConfigDict(
            {"data": 8, "fsdp": 1, "tensor": 1}), devices), 12, 0)  # fmt: skip


def test_dcn_mesh_spans_slices_along_data():
    """`mesh.dcn_data=2` over two v5p-8 slices: each slice holds the configured mesh and the
    slices multiply `data` (only the data axis crosses the data-center network)."""
    import ml_collections

    from xformers_jax import compile as aot

    _, devices = aot.topology_devices("v5p-8", slices=2)
    cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 2, "dcn_data": 2})
    m = sharding.make_mesh(cfg, devices)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for i in range(2):
        assert {d.slice_index for d in m.devices[i].flat} == {i}
    with pytest.raises(ValueError, match="devices form 2 slices"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(cfg, dcn_data=4)), devices)
    # One process on CPU is one granule: dcn_data=2 needs two processes.
    with pytest.raises(ValueError, match="form 1 processes"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(cfg, dcn_data=2)))
