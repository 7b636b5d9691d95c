"""Tests for optim: schedules, weight-decay mask, AdamW/Adafactor, layer decay, accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xformers_jax import config_lib, optim


def _cfg(**kw):
    c = config_lib.base_config().optim
    for k, v in kw.items():
        c[k] = v
    return c


def _params():
    return {
        "embeddings": {
            "word_embeddings": {"embedding": jnp.ones((5, 2))},
            "norm": {"scale": jnp.ones((2,)), "bias": jnp.zeros((2,))},
        },
        "layers": {
            "attention": {"query": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.zeros((3, 2))}},
            "LayerNorm_0": {"scale": jnp.ones((3, 2)), "weight": jnp.ones((3, 2))},
            "r_w_bias": jnp.zeros((3, 2)),
        },
        "final_norm": {"scale": jnp.ones((2,))},
        "head": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros((4,))},
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # lr=1, warmup=10, total=110, end=0.1; steps 0, 5, 10, 60, 110, 200.
        ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
        ("linear", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedules(name, expected):
    sched = optim.make_schedule(name, 1.0, 10, 110, end_lr_factor=0.1)
    got = [optim.learning_rate(sched, s) for s in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    cosine_35 = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25))
    if name == "cosine":
        np.testing.assert_allclose(optim.learning_rate(sched, 35), cosine_35, rtol=1e-6)


def test_rsqrt_schedule_matches_t5():
    sched = optim.make_schedule("rsqrt", 0.01, 10_000, 100_000)
    for step in (0, 5_000, 10_000, 40_000, 90_000):
        np.testing.assert_allclose(
            optim.learning_rate(sched, step), 1 / np.sqrt(max(step, 10_000)), rtol=1e-6
        )


def test_schedule_is_jittable():
    sched = optim.make_schedule("cosine", 1.0, 10, 110)
    np.testing.assert_allclose(jax.jit(sched)(jnp.int32(60)), 0.5, rtol=1e-6)


def test_decay_mask():
    mask = optim.decay_mask(_params())
    assert mask["embeddings"]["word_embeddings"]["embedding"] is True
    assert mask["embeddings"]["norm"] == {"scale": False, "bias": False}
    assert mask["layers"]["attention"]["query"] == {"kernel": True, "bias": False}
    assert mask["layers"]["LayerNorm_0"] == {"scale": False, "weight": False}
    assert mask["layers"]["r_w_bias"] is False
    assert mask["final_norm"]["scale"] is False
    assert mask["head"] == {"kernel": True, "bias": False}


def test_decay_mask_on_boxed_params():
    import flax.linen as nn

    params = {
        "dense": {
            "kernel": nn.LogicallyPartitioned(jnp.ones((2, 2)), ("embed", "mlp")),
            "bias": nn.LogicallyPartitioned(jnp.zeros((2,)), ("mlp",)),
        }
    }
    mask = nn.meta.unbox(optim.decay_mask(params))
    assert mask == {"dense": {"kernel": True, "bias": False}}


def test_adamw_step_matches_hand_computation():
    cfg = _cfg(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0.0)
    tx, _ = optim.make_optimizer(cfg, total_steps=10)
    params = {"dense": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([3.0])}}
    grads = {"dense": {"kernel": jnp.array([0.5, 0.25]), "bias": jnp.array([-1.0])}}
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)

    def adam_first_step(g):  # Bias-corrected m/sqrt(v) after one step is g / (|g| + eps).
        return g / (np.abs(g) + 1e-6)

    g_k, p_k = np.array([0.5, 0.25]), np.array([1.0, -2.0])
    np.testing.assert_allclose(
        new["dense"]["kernel"], p_k - 0.1 * (adam_first_step(g_k) + 0.5 * p_k), rtol=1e-6
    )
    # Biases get no weight decay.
    np.testing.assert_allclose(new["dense"]["bias"], [3.0 - 0.1 * adam_first_step(-1.0)], rtol=1e-6)


def test_clipping_by_global_norm():
    base = dict(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0)
    tx_clip, _ = optim.make_optimizer(_cfg(**base, clip_norm=1.0), total_steps=10)
    tx_raw, _ = optim.make_optimizer(_cfg(**base, clip_norm=0.0), total_steps=10)
    params = {"w": jnp.zeros((2,))}
    big, small = {"w": jnp.array([30.0, 40.0])}, {"w": jnp.array([0.3, -0.1])}
    # Adam is scale-invariant within one step, so compare two steps: a clipped then an unclipped
    # gradient, against the unclipped chain fed the gradient clipped by hand (norm 50 -> 1).
    s_clip, s_raw = tx_clip.init(params), tx_raw.init(params)
    _, s_clip = tx_clip.update(big, s_clip, params)
    _, s_raw = tx_raw.update({"w": big["w"] / 50.0}, s_raw, params)
    u_clip, _ = tx_clip.update(small, s_clip, params)
    u_raw, _ = tx_raw.update(small, s_raw, params)
    np.testing.assert_allclose(u_clip["w"], u_raw["w"], rtol=1e-5)
    _, s_unclipped = tx_raw.update(big, tx_raw.init(params), params)
    u_unclipped, _ = tx_raw.update(small, s_unclipped, params)
    assert not np.allclose(u_unclipped["w"], u_clip["w"], rtol=1e-3)


def test_layer_decay_factors():
    params = _params()
    f = optim.layer_decay_factors(params, 0.5)
    # L = 3: layer i gets 0.5 ** (3 - i), broadcast along axis 0.
    q = f["layers"]["attention"]["query"]["kernel"]
    assert q.shape == (3, 1, 1)
    np.testing.assert_allclose(q.ravel(), [0.125, 0.25, 0.5])
    np.testing.assert_allclose(f["layers"]["r_w_bias"].ravel(), [0.125, 0.25, 0.5])
    assert f["embeddings"]["word_embeddings"]["embedding"] == 0.5**4
    assert f["embeddings"]["norm"]["scale"] == 0.5**4
    assert f["final_norm"]["scale"] == 1.0 and f["head"]["kernel"] == 1.0


def test_layer_decay_scales_updates():
    params = {"layers": {"kernel": jnp.zeros((4, 2))}, "head": {"kernel": jnp.zeros((2,))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    base = dict(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    tx1, _ = optim.make_optimizer(_cfg(**base), total_steps=10)
    tx2, _ = optim.make_optimizer(_cfg(**base, layer_decay=0.5), total_steps=10)
    u1, _ = tx1.update(grads, tx1.init(params), params)
    u2, _ = jax.jit(tx2.update)(grads, tx2.init(params), params)
    ratio = np.asarray(u2["layers"]["kernel"] / u1["layers"]["kernel"])
    np.testing.assert_allclose(ratio[:, 0], [0.0625, 0.125, 0.25, 0.5], rtol=1e-6)
    np.testing.assert_allclose(u2["head"]["kernel"], u1["head"]["kernel"])


def test_adafactor_runs():
    cfg = _cfg(name="adafactor", lr=0.01, warmup_steps=2, weight_decay=0.1, layer_decay=0.9)
    tx, sched = optim.make_optimizer(cfg, total_steps=10)
    params = {"layers": {"kernel": jnp.ones((2, 256, 128))}, "head": {"bias": jnp.ones((4,))}}
    state = tx.init(params)
    # Factored second moments: row/column statistics, not a full [256, 128] matrix.
    assert all(x.size < 256 * 128 for x in jax.tree_util.tree_leaves(state) if x.ndim >= 2)

    @jax.jit
    def step(params, state):
        grads = jax.tree_util.tree_map(lambda p: 0.1 * p, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))
    assert float(params["layers"]["kernel"][0, 0, 0]) < 1.0
    assert optim.learning_rate(sched, 1) == pytest.approx(0.005)


def test_every_update_is_an_optimizer_step_whatever_grad_accum_steps():
    """Accumulation is the trainer's (inside its step): the chain applies an update on every
    call, and `grad_accum_steps` leaves it unchanged."""
    base = dict(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    tx_acc, _ = optim.make_optimizer(_cfg(**base, grad_accum_steps=4), total_steps=10)
    tx_one, _ = optim.make_optimizer(_cfg(**base), total_steps=10)
    params = {"w": jnp.array([1.0, 2.0])}
    g = {"w": jnp.array([1.0, -3.0])}
    u_acc, _ = tx_acc.update(g, tx_acc.init(params), params)
    u_one, _ = tx_one.update(g, tx_one.init(params), params)
    np.testing.assert_array_equal(u_acc["w"], u_one["w"])
    assert float(jnp.abs(u_acc["w"]).min()) > 0


def test_mu_dtype_stores_the_first_moment_in_bfloat16():
    base = dict(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
    g = {"w": jnp.sin(jnp.arange(64.0)).reshape(8, 8) * 1e-3}
    tx16, _ = optim.make_optimizer(_cfg(**base, mu_dtype="bfloat16"), total_steps=10)
    tx32, _ = optim.make_optimizer(_cfg(**base, mu_dtype="float32"), total_steps=10)
    s16, s32 = tx16.init(params), tx32.init(params)
    adam16 = next(s for s in s16 if isinstance(s, optax.ScaleByAdamState))
    assert adam16.mu["w"].dtype == jnp.bfloat16 and adam16.nu["w"].dtype == jnp.float32
    u16, s16 = tx16.update(g, s16, params)
    u32, _ = tx32.update(g, s32, params)
    adam16 = next(s for s in s16 if isinstance(s, optax.ScaleByAdamState))
    assert adam16.mu["w"].dtype == jnp.bfloat16  # rounded when stored, every step
    assert u16["w"].dtype == jnp.float32
    # The first update uses the float32 moment before it is stored: equal to float32's.
    np.testing.assert_allclose(u16["w"], u32["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown optim.mu_dtype 'int8'"):
        optim.make_optimizer(_cfg(**base, mu_dtype="int8"), total_steps=10)
    with pytest.raises(ValueError, match="adafactor keeps no first moment"):
        optim.make_optimizer(_cfg(**base, name="adafactor", mu_dtype="bfloat16"), total_steps=10)


def test_make_optimizer_accepts_a_mapping():
    tx, sched = optim.make_optimizer({"lr": 0.5, "schedule": "constant"}, total_steps=5)
    assert optim.learning_rate(sched, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make_optimizer({"name": "sgd"}, total_steps=5)
