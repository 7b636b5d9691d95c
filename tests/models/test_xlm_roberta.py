"""XLM-RoBERTa shapes: tiny heads, eval_shape of the full-size presets (no memory), errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax.models import xlm_roberta as xr


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "preset,expected",
    [("xl", 3.48e9), ("xxl", 10.7e9), ("xlm-roberta-base", 278e6), ("xlm-v-base", 778e6)],
)
def test_eval_shape_full_presets(preset, expected):
    cfg = xr.XLMRobertaConfig(**xr.PRESETS[preset])
    model = xr.XLMRobertaForMaskedLM(cfg)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    params = jax.eval_shape(lambda r, i: model.init(r, i), jax.random.key(0), ids)["params"]
    n = _count(params)
    assert abs(n - expected) / expected < 0.02, n
    q = params["model"]["layers"]["attention"]["query"]["kernel"]
    assert q.value.shape == (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                             cfg.head_dim)  # fmt: skip
    assert q.names == ("layers", "embed", "heads", "kv")


@pytest.mark.parametrize("model_type", ["xlm-roberta-xl", "xlm-roberta"])
@pytest.mark.parametrize("pos", ["absolute", "relative_key", "relative_key_query"])
def test_tiny_shapes(model_type, pos):
    cfg = xr.XLMRobertaConfig(**{**xr.PRESETS["tiny"], "model_type": model_type,
                                 "position_embedding_type": pos, "num_hidden_layers": 2,
                                 "vocab_size": 500, "hidden_size": 64})  # fmt: skip
    ids = jnp.array([[0, 5, 6, 7, 2, 1], [0, 8, 9, 2, 1, 1]])
    model = xr.XLMRobertaForMaskedLM(cfg)
    v = jax.jit(model.init)(jax.random.key(0), ids)
    apply = jax.jit(lambda v, i, m: model.apply(v, i, m, output_hidden_states=True,
                                                output_attentions=True))  # fmt: skip
    out = apply(v, ids, (ids != 1).astype(jnp.int32))
    assert out.logits.shape == (2, 6, cfg.vocab_size)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 6, cfg.hidden_size)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 6, 6)
    # padding keys get no attention
    np.testing.assert_allclose(out.attentions[0][1, :, :, 4:], 0.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        xr.XLMRobertaConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="position_embedding_type"):
        xr.XLMRobertaConfig(position_embedding_type="rotary")
    cfg = xr.XLMRobertaConfig(**{**xr.PRESETS["tiny"], "max_position_embeddings": 10})
    ids = jnp.ones((1, 12), jnp.int32) * 5
    with pytest.raises(ValueError, match="exceeds the position table"):
        xr.XLMRobertaModel(cfg).init(jax.random.key(0), ids)
