"""Vocabulary-chunked cross-entropy and the masked-only MLM paths equal the full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xformers_jax.layers.losses import chunked_cross_entropy, gather_positions
from xformers_jax.models import xlm_roberta as xr
from xformers_jax.tasks import mlm


def _full(x, emb, bias, labels):
    logits = x @ emb.T + bias
    valid = labels != -100
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.where(valid, losses, 0.0), jnp.argmax(logits, -1)


@pytest.mark.parametrize("chunk_size", [7, 1000])  # uneven chunks, one chunk
def test_chunked_cross_entropy_matches_full(chunk_size):
    k = jax.random.split(jax.random.key(0), 4)
    vocab, hidden = 50, 8
    x = jax.random.normal(k[0], (3, 5, hidden))
    emb = jax.random.normal(k[1], (vocab, hidden))
    bias = jax.random.normal(k[2], (vocab,))
    labels = jax.random.randint(k[3], (3, 5), 0, vocab).at[0, 1].set(-100)
    losses, pred = chunked_cross_entropy(x, emb, bias, labels, chunk_size=chunk_size)
    ref_losses, ref_pred = _full(x, emb, bias, labels)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    np.testing.assert_array_equal(pred, ref_pred)

    def total(fn):
        return lambda a, b, c: jnp.sum(fn(a, b, c, labels)[0])

    chunked = lambda a, b, c, y: chunked_cross_entropy(a, b, c, y, chunk_size=chunk_size)  # noqa: E731
    grads = jax.grad(total(chunked), argnums=(0, 1, 2))(x, emb, bias)
    ref = jax.grad(total(_full), argnums=(0, 1, 2))(x, emb, bias)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_gather_positions():
    x = jnp.arange(2 * 4 * 3).reshape(2, 4, 3)
    pos = jnp.array([[3, 1], [0, -1]])
    out = gather_positions(x, pos)
    np.testing.assert_array_equal(out[0, 0], x[0, 3])
    np.testing.assert_array_equal(out[1, 1], x[1, 0])


def test_masked_lm_paths_give_the_same_loss_and_grads():
    cfg = xr.XLMRobertaConfig(**{**xr.PRESETS["tiny"], "num_hidden_layers": 1, "vocab_size": 301,
                                 "hidden_size": 32, "intermediate_size": 64})  # fmt: skip
    model = xr.XLMRobertaForMaskedLM(cfg)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 301, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = 1, 0
    labels = np.where(rng.rand(2, 12) < 0.3, ids, -100).astype(np.int32)
    labels[1, 9:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    params = model.init(jax.random.key(0), ids)["params"]

    def run(**kw):
        f = lambda p: mlm.loss_fn(p, batch, jax.random.key(1), model=model, deterministic=True,  # noqa: E731
                                  **kw)  # fmt: skip
        return jax.value_and_grad(f, has_aux=True)(params)

    (ref, ref_aux), ref_g = run()
    n_masked = int((labels != -100).sum(1).max())
    (loss, aux), _ = run(max_predictions=n_masked)  # gather only
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    (loss, aux), g = run(max_predictions=n_masked + 2, vocab_chunk_size=64)  # gather + chunked
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert float(aux["weight"]) == float(ref_aux["weight"])
    assert int(aux["correct"]) == int(ref_aux["correct"])
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_masked_positions_pads_and_truncates():
    labels = jnp.array([[-100, 5, -100, 7, 8], [-100] * 5])
    np.testing.assert_array_equal(mlm.masked_positions(labels, 2), [[1, 3], [-1, -1]])
