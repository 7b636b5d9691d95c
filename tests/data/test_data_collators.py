"""mlm_mask: 80/10/10 statistics, specials never touched, labels, at least one target per row."""

import numpy as np
import pytest

from xformers_jax.data import IGNORE_INDEX, mlm_mask

VOCAB, MASK = 1000, 4
SPECIALS = frozenset({0, 1, 2, 3, 4})
KW = dict(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)


def _batch(rng, shape=(256, 512)):
    ids = rng.integers(5, VOCAB, size=shape).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    ids[:, -40:-1] = 1  # padding
    ids[:, 7] = 3  # an <unk>
    return ids


def test_statistics_80_10_10():
    ids = _batch(np.random.default_rng(0))
    masked, labels = mlm_mask(ids, np.random.default_rng(1), **KW)
    assert masked.dtype == labels.dtype == np.int32 and masked.shape == labels.shape == ids.shape
    maskable = ~np.isin(ids, list(SPECIALS))
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.005
    n = selected.sum()
    became_mask = (masked == MASK) & selected
    kept = (masked == ids) & selected
    randomised = selected & ~became_mask & ~kept
    assert abs(became_mask.sum() / n - 0.8) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01
    assert abs(randomised.sum() / n - 0.1) < 0.01
    # Random replacements are real tokens, spread over the vocabulary.
    assert not np.isin(masked[randomised], list(SPECIALS)).any()
    assert masked[randomised].min() < 50 and masked[randomised].max() > VOCAB - 50


def test_specials_untouched_and_labels():
    ids = _batch(np.random.default_rng(2), (64, 128))
    masked, labels = mlm_mask(ids, np.random.default_rng(3), **KW, mask_prob=0.9)
    special = np.isin(ids, list(SPECIALS))
    assert (labels[special] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(masked[special], ids[special])
    selected = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[selected], ids[selected])
    np.testing.assert_array_equal(masked[~selected], ids[~selected])


def test_at_least_one_target_per_row():
    ids = np.full((500, 16), 1, np.int32)
    ids[:, 0], ids[:, 2] = 0, 2
    ids[:, 1] = 100  # one real token per row
    ids[-1] = 1  # an all-padding row has nothing to predict
    _, labels = mlm_mask(ids, np.random.default_rng(0), **KW, mask_prob=0.01)
    per_row = (labels != IGNORE_INDEX).sum(axis=1)
    assert (per_row[:-1] == 1).all() and per_row[-1] == 0
    assert (labels[:-1, 1] == 100).all()


def test_deterministic_given_rng():
    ids = _batch(np.random.default_rng(0), (8, 64))
    a = mlm_mask(ids, np.random.default_rng(7), **KW)
    b = mlm_mask(ids, np.random.default_rng(7), **KW)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_errors_name_the_argument():
    ids = np.full((2, 8), 10, np.int32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="vocab_size"):
        mlm_mask(ids + VOCAB, rng, **KW)  # a tokenizer bigger than the model's vocab
    with pytest.raises(ValueError, match="mask_token_id"):
        mlm_mask(ids, rng, **{**KW, "mask_token_id": VOCAB})
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        mlm_mask(ids[0], rng, **KW)
    with pytest.raises(ValueError, match="mask_prob"):
        mlm_mask(ids, rng, **KW, mask_prob=0.0)
    with pytest.raises(ValueError, match="random_prob"):
        mlm_mask(ids, rng, **KW, replace_prob=0.8, random_prob=0.3)
