"""`scan_unroll` changes how the layer loop runs, never the params or the numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax.models import beit, mt5, xlm_roberta, xlnet, xlnet_heads, yoso

rng = np.random.default_rng(0)
IDS = rng.integers(3, 99, (2, 12)).astype(np.int32)
PIXELS = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)

CASES = {
    "xlm_roberta": lambda u: (
        xlm_roberta.XLMRobertaForMaskedLM(
            xlm_roberta.XLMRobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                         num_attention_heads=4, intermediate_size=64,
                                         max_position_embeddings=40, scan_unroll=u)),
        dict(input_ids=IDS, labels=IDS),
    ),
    "xlnet": lambda u: (
        xlnet_heads.XLNetLMHeadModel(xlnet.XLNetConfig(vocab_size=100, d_model=32, n_layer=3,
                                                       n_head=4, d_inner=64, mem_len=8,
                                                       scan_unroll=u)),
        dict(input_ids=IDS, labels=IDS),
    ),
    "yoso": lambda u: (
        yoso.YosoForMaskedLM(yoso.YosoConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=20, scan_unroll=u)),
        dict(input_ids=IDS, labels=IDS),
    ),
    "mt5": lambda u: (
        mt5.MT5ForConditionalGeneration(mt5.MT5Config(vocab_size=100, d_model=32, d_kv=8,
                                                      d_ff=64, num_layers=3, num_heads=4,
                                                      scan_unroll=u)),
        dict(input_ids=IDS, labels=IDS[:, :5]),
    ),
    "beit": lambda u: (
        beit.BeitForImageClassification(beit.BeitConfig(image_size=32, patch_size=8,
                                                         hidden_size=32, num_hidden_layers=3,
                                                         num_attention_heads=4,
                                                         intermediate_size=64, num_labels=3,
                                                         use_relative_position_bias=True,
                                                         scan_unroll=u)),
        dict(pixel_values=PIXELS, labels=np.array([0, 2])),
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(CASES))
def test_unrolled_layers_equal_the_scan(family):
    scanned, batch = CASES[family](1)
    unrolled, _ = CASES[family](3)
    params = scanned.init(jax.random.key(0), **batch)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        unrolled.init(jax.random.key(0), **batch)["params"]
    )

    def loss(module):
        return jax.jit(jax.value_and_grad(lambda p: module.apply({"params": p}, **batch).loss))

    # Unrolled over all 3 layers, the forward has no loop left.
    assert "stablehlo.while" in loss(scanned).lower(params).as_text()
    assert "stablehlo.while" not in loss(unrolled).lower(params).as_text()
    (a, ga), (b, gb) = loss(scanned)(params), loss(unrolled)(params)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert jnp.isfinite(a)
