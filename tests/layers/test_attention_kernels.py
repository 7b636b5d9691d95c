"""The fused attention kernel equals einsum: the layer, then every family with softmax attention.

On CPU `attention_kernel="flash"` runs the Pallas TPU flash-attention kernel in TPU interpret
mode, forward and backward; each case compares outputs and the gradients of every input / param
with the einsum path (float32, padded batches, biases, masks), to 1e-5 relative to the largest
value. Interpreted kernels are slow on CPU (a minute or more per model): the fast suite runs
the layer cases, XLM-R and BEiT; the other families' cases are `slow`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xformers_jax.layers.attention as attn
from xformers_jax.models import beit, mt5, xlm_roberta, xlnet
from xformers_jax.models.base import FamilyConfig

TOL = 1e-5


def _assert_trees_close(a, b, tol: float = TOL) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(1.0, float(np.max(np.abs(x))))
        err = float(np.max(np.abs(x - y))) if x.size else 0.0
        assert err <= tol * scale, f"{jax.tree_util.keystr(path)}: {err} > {tol} * {scale}"


def _rand(shape, seed):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


# --------------------------------------------------------------------------------------------------
# The layer.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_len,kv_len,causal,bias_batch,dense",
    [
        (40, 40, False, 1, False),  # key padding + a per-head bias (BEiT / MT5)
        (40, 40, True, 2, False),  # causal + padding + a per-example bias (relative_key)
        (24, 136, False, 0, True),  # cross-attention, no bias, a dense mask folded into a bias
    ],
)
def test_flash_equals_einsum(q_len, kv_len, causal, bias_batch, dense):
    b, h, d = 2, 2, 16
    q, k, v = _rand((b, q_len, h, d), 0), _rand((b, kv_len, h, d), 1), _rand((b, kv_len, h, d), 2)
    bias = _rand((bias_batch, h, q_len, kv_len), 3) if bias_batch else None
    key_mask = jnp.asarray(np.arange(kv_len)[None] < np.array([[kv_len], [kv_len - 9]]))
    if dense:  # left padding and a hole, as a boolean [b, 1, q, k] mask
        keep = (np.arange(kv_len) >= 5) & (np.arange(kv_len) != 17)
        mask = jnp.broadcast_to(keep[None, None, None], (b, 1, 1, kv_len))
    else:
        mask = attn.Mask(key_mask, causal=causal)

    def loss(kernel, q, k, v, bias):
        out, _ = attn.attention(q, k, v, mask=mask, bias=bias, kernel=kernel, scale=0.3)
        return jnp.mean(jnp.sin(out) * out), out

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    (_, want), dwant = grad("einsum", q, k, v, bias)
    (_, got), dgot = jax.jit(grad, static_argnums=0)("flash", q, k, v, bias)
    _assert_trees_close((want, dwant), (got, dgot))


def test_kernel_choice_and_fallbacks():
    assert attn.resolve_kernel("auto") == "einsum"  # CPU: einsum is the fastest path here
    assert attn.resolve_kernel("flash") == "flash"
    for fallback in (dict(need_probs=True), dict(head_mask=jnp.ones(2)), dict(dropout=True)):
        assert attn.resolve_kernel("flash", **fallback) == "einsum", fallback
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        attn.resolve_kernel("xla")
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        xlm_roberta.XLMRobertaConfig(attention_kernel="fused")
    # A config field of ours: never in config.json.
    cfg = xlm_roberta.XLMRobertaConfig(attention_kernel="flash")
    assert "attention_kernel" not in cfg.to_hf_config()
    assert "attention_kernel" in FamilyConfig._COMMON_LOCAL


def test_flash_returns_no_probs_and_output_attentions_takes_einsum():
    q = _rand((1, 8, 2, 16), 0)
    out, probs = attn.attention(q, q, q, kernel="flash")
    assert probs is None and out.shape == q.shape
    out2, probs = attn.attention(q, q, q, kernel="flash", need_probs=True)
    assert probs.shape == (1, 2, 8, 8)
    _assert_trees_close(out, out2)


# --------------------------------------------------------------------------------------------------
# The families.
# --------------------------------------------------------------------------------------------------


def _family_grads(module_fn, cfg, args, kwargs, out_fn, seed=0):
    """(outputs, param grads) of einsum and flash for the same params."""
    params = module_fn(cfg).init(jax.random.key(seed), *args, **kwargs)

    def run(kernel):
        module = module_fn(cfg.replace(attention_kernel=kernel))

        def loss(p):
            out = out_fn(module.apply(p, *args, **kwargs))
            return jnp.mean(jnp.sin(out) * out), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grads

    return run("einsum"), run("flash")


IDS = np.random.RandomState(0).randint(5, 90, (2, 20))
PAD = np.array([[1] * 20, [1] * 13 + [0] * 7])


@pytest.mark.parametrize(
    "position,decoder",
    [
        ("absolute", False),
        pytest.param("relative_key_query", False, marks=pytest.mark.slow),
        pytest.param("relative_key", True, marks=pytest.mark.slow),
    ],
)
def test_xlm_roberta(position, decoder):
    cfg = xlm_roberta.XLMRobertaConfig(
        model_type="xlm-roberta", vocab_size=100, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        position_embedding_type=position, is_decoder=decoder,
    )  # fmt: skip
    want, got = _family_grads(
        xlm_roberta.XLMRobertaModel, cfg, (jnp.asarray(IDS), jnp.asarray(PAD)), {},
        lambda o: o.last_hidden_state * PAD[..., None],
    )  # fmt: skip
    _assert_trees_close(want, got)


def test_beit_relative_position_bias():
    cfg = beit.BeitConfig.from_dict(
        dict(beit.PRESETS["tiny"], hidden_size=32, intermediate_size=64,
             use_relative_position_bias=True, use_shared_relative_position_bias=False)
    )  # fmt: skip
    pixels = _rand((2, 3, 32, 32), 4)
    want, got = _family_grads(beit.BeitModel, cfg, (pixels,), {}, lambda o: o.last_hidden_state)
    _assert_trees_close(want, got)


@pytest.mark.slow
def test_mt5_bucketed_bias_padding_causal_and_cross():
    cfg = mt5.MT5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
    )  # fmt: skip
    dec = IDS[:, :9]
    dec_pad = np.array([[1] * 9, [1] * 6 + [0] * 3])
    kwargs = dict(
        attention_mask=jnp.asarray(PAD), decoder_input_ids=jnp.asarray(dec),
        decoder_attention_mask=jnp.asarray(dec_pad),
    )  # fmt: skip
    want, got = _family_grads(
        mt5.MT5Model, cfg, (jnp.asarray(IDS),), kwargs,
        lambda o: o.last_hidden_state * dec_pad[..., None],
    )  # fmt: skip
    _assert_trees_close(want, got)


@pytest.mark.slow
def test_xlnet_two_streams_perm_mask_padding_segments():
    cfg = xlnet.XLNetConfig(
        vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0
    )
    n = IDS.shape[1]
    perm = np.random.RandomState(1).rand(2, n, n) < 0.3
    target = np.zeros((2, 3, n), np.float32)
    target[:, np.arange(3), [2, 7, 11]] = 1.0
    kwargs = dict(
        attention_mask=jnp.asarray(PAD), perm_mask=jnp.asarray(perm, jnp.float32),
        target_mapping=jnp.asarray(target), token_type_ids=jnp.asarray(IDS % 2),
    )  # fmt: skip
    from xformers_jax.models.xlnet_heads import XLNetLMHeadModel

    want, got = _family_grads(
        XLNetLMHeadModel, cfg, (jnp.asarray(IDS),), kwargs, lambda o: o.logits
    )
    _assert_trees_close(want, got)
