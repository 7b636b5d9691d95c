"""BEiT without transformers: tiny shapes of every head, full-size presets traced, config I/O."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax.convert import param_map
from xformers_jax.models import FAMILIES, beit, beit_segmentation

TINY = dict(beit.PRESETS["tiny"], hidden_size=32, intermediate_size=64, num_labels=3)


def _init(head, cfg, x, **kw):
    module = FAMILIES["beit"].head_class(head)(cfg)
    variables = jax.jit(lambda: module.init(jax.random.key(0), x, **kw))()
    return module, variables


def test_tiny_shapes_every_head():
    cfg = beit.BeitConfig.from_dict(
        dict(TINY, use_relative_position_bias=True, use_absolute_position_embeddings=True)
    )
    x = jnp.ones((2, 3, 32, 32))
    mask = jnp.zeros((2, 16), bool).at[:, :5].set(True)
    cases = {
        "BeitModel": ({}, lambda o: o.last_hidden_state.shape == (2, 17, 32)),
        "BeitForMaskedImageModeling": (
            dict(bool_masked_pos=mask),
            lambda o: o.logits.shape == (2, 16, 64),
        ),
        "BeitForImageClassification": ({}, lambda o: o.logits.shape == (2, 3)),
        "BeitForSemanticSegmentation": ({}, lambda o: o.logits.shape == (2, 3, 16, 16)),
        "BeitBackbone": ({}, lambda o: [m.shape for m in o.feature_maps] == [(2, 32, 4, 4)] * 4),
    }
    for head, (kw, check) in cases.items():
        module = FAMILIES["beit"].head_class(head)(cfg)
        out = jax.eval_shape(lambda: module.apply(module.init(jax.random.key(0), x, **kw), x, **kw))
        assert check(out), head


def test_params_have_logical_names_and_stack_on_layers():
    cfg = beit.BeitConfig.from_dict(dict(TINY, use_relative_position_bias=True))
    x = jnp.ones((1, 3, 32, 32))
    boxed = jax.eval_shape(
        lambda: beit_segmentation.BeitForSemanticSegmentation(cfg).init(jax.random.key(0), x)
    )["params"]
    flat = param_map.flatten(boxed)
    table = flat[("beit", "encoder", "layers", "relative_position_bias",
                  "relative_position_bias_table")]  # fmt: skip
    assert table.names == ("layers", "relpos", "heads")
    assert table.value.shape == (4, 7 * 7 + 3, 4)
    for path, leaf in flat.items():
        assert hasattr(leaf, "names"), "/".join(path)


def test_training_mode_drop_path():
    cfg = beit.BeitConfig.from_dict(
        dict(TINY, drop_path_rate=0.5, num_hidden_layers=2, out_indices=None)
    )
    x = jax.random.normal(jax.random.key(1), (4, 3, 32, 32))
    module, variables = _init("BeitModel", cfg, x)
    run = jax.jit(lambda rng: module.apply(variables, x, deterministic=False,
                                           rngs={"dropout": rng}))  # fmt: skip
    a, b = run(jax.random.key(2)), run(jax.random.key(3))
    assert not np.allclose(a.last_hidden_state, b.last_hidden_state)


def test_batch_norm_statistics():
    """Eval reads the running stats; training uses the batch's and updates torch-style."""
    bn = beit_segmentation.BatchNorm(deterministic=False)
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * 2 + 1
    variables = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(variables, x, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 4)
    np.testing.assert_allclose(y.reshape(-1, 4).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-5)  # fmt: skip
    y_frozen = bn.apply(variables, x)  # immutable stats: batch statistics, no update
    np.testing.assert_allclose(y_frozen, y, atol=1e-6)
    y_eval = beit_segmentation.BatchNorm(deterministic=True).apply(variables, x)
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("preset", sorted(set(beit.PRESETS) - {"tiny"}))
def test_full_size_presets_trace(preset):
    cfg = beit.BeitConfig.from_dict(beit.PRESETS[preset])
    x = jax.ShapeDtypeStruct((1, 3, cfg.image_size, cfg.image_size), jnp.float32)
    seg = beit_segmentation.BeitForSemanticSegmentation
    head = seg if "ade" in preset else beit.BeitForImageClassification
    shapes = jax.eval_shape(lambda x: head(cfg).init(jax.random.key(0), x), x)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    assert n > 80e6


def test_config_round_trip_and_errors():
    cfg = beit.BeitConfig.from_dict(dict(TINY, out_features=["stage2", "stage4"], out_indices=None))
    assert cfg.out_indices == (2, 4)
    hf = cfg.to_hf_config()
    assert hf["out_indices"] == [2, 4] and hf["pool_scales"] == [1, 2, 3, 6]
    assert beit.BeitConfig.from_hf_config(hf) == dataclasses.replace(cfg, dtype="float32")
    with pytest.raises(ValueError, match="multiple"):
        beit.BeitConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="not in stages"):
        beit.BeitConfig(num_hidden_layers=2, out_indices=(5,))


def test_resize_matrix_matches_torch_formulas():
    # Same size is the identity; adaptive pooling rows average the covered inputs.
    np.testing.assert_allclose(beit.resize_matrix(5, 5, "bilinear"), np.eye(5))
    np.testing.assert_allclose(beit.resize_matrix(5, 5, "bicubic"), np.eye(5), atol=1e-7)
    np.testing.assert_allclose(
        beit.resize_matrix(4, 2, "adaptive_avg"), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    )
    for mode in ("bilinear", "bicubic", "adaptive_avg"):
        np.testing.assert_allclose(beit.resize_matrix(3, 7, mode).sum(1), 1.0, atol=1e-6)
