"""Collators: turn token batches into model inputs and targets, in numpy, on the host.

They run inside grain workers (`random_map`) with the per-element `np.random.Generator` grain
hands them, so masking is a deterministic function of (seed, element index): a resumed run masks
exactly as the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Label value for positions without a target; optax / our losses weight them out (torch's default
# ignore_index, so HF-style `labels=` work unchanged).
IGNORE_INDEX = -100


def _sample_non_special(
    rng: np.random.Generator, shape: tuple[int, ...], vocab_size: int, specials: np.ndarray
) -> np.ndarray:
    """Uniform ids over `[0, vocab_size)` minus `specials` (sorted, unique, in range)."""
    # Draw a rank among the non-special ids, then step over every special at or below it: with
    # the specials ascending, one pass maps rank r to the r-th non-special id.
    ids = rng.integers(0, vocab_size - specials.size, size=shape, dtype=np.int64)
    for s in specials.tolist():
        ids += ids >= s
    return ids


def _validate(input_ids, mask_token_id, vocab_size, specials, probs):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, length], got shape {input_ids.shape}")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids: expected an integer array, got {input_ids.dtype}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id: {mask_token_id} outside [0, vocab_size={vocab_size}) "
            "(tokenizer and vocab_size do not match)"
        )
    if specials.size and (specials.min() < 0 or specials.max() >= vocab_size):
        raise ValueError(f"special_ids: {specials.tolist()} not all in [0, {vocab_size})")
    if specials.size >= vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} leaves no non-special id to sample")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        bad = input_ids.max() if input_ids.max() >= vocab_size else input_ids.min()
        raise ValueError(
            f"input_ids: contains id {int(bad)} outside [0, vocab_size={vocab_size}) "
            "(tokenizer and model vocab do not match)"
        )
    mask_prob, replace_prob, random_prob = probs
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob: must be in (0, 1], got {mask_prob}")
    if replace_prob < 0 or random_prob < 0 or replace_prob + random_prob > 1.0:
        raise ValueError(
            f"replace_prob + random_prob: must be non-negative and sum to <= 1, got "
            f"{replace_prob} + {random_prob}"
        )


def mlm_mask(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    mask_prob: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT / RoBERTa masked-LM corruption.

    Every token that is not special (specials include `<pad>` and `<mask>`) is selected with
    probability `mask_prob`. A selected token becomes `mask_token_id` with probability
    `replace_prob`, a uniformly random non-special id with probability `random_prob`, and stays
    as it is otherwise. Each row with at least one maskable token gets at least one selected
    token, so the loss of a row is never empty.

    Args:
        input_ids: `[batch, length]` integer ids.
        rng: the generator to draw from (grain's per-element one inside a pipeline).
        mask_token_id: the `<mask>` id.
        vocab_size: ids are in `[0, vocab_size)`; random replacements are drawn from it.
        special_ids: ids never selected nor drawn as replacements.
        mask_prob: selection probability per maskable token.
        replace_prob: of selected, fraction replaced by `<mask>`.
        random_prob: of selected, fraction replaced by a random token.

    Returns:
        `(masked_ids, labels)`, both int32 `[batch, length]`; labels hold the original id at
        selected positions and -100 elsewhere.

    Raises:
        ValueError: bad shapes or probabilities, or ids outside `[0, vocab_size)` (a tokenizer
            that does not match the model's vocab).
    """
    input_ids = np.asarray(input_ids)
    specials = np.unique(np.asarray([*special_ids, mask_token_id], dtype=np.int64))
    _validate(
        input_ids, mask_token_id, vocab_size, specials, (mask_prob, replace_prob, random_prob)
    )
    maskable = ~np.isin(input_ids, specials)
    selected = maskable & (rng.random(input_ids.shape) < mask_prob)
    # Short rows can draw no selection at all (p = 0.85^n); force one uniformly chosen position.
    starved = maskable.any(axis=1) & ~selected.any(axis=1)
    if starved.any():
        scores = np.where(maskable, rng.random(input_ids.shape), -1.0)
        rows = np.flatnonzero(starved)
        selected[rows, np.argmax(scores[rows], axis=1)] = True
    action = rng.random(input_ids.shape)
    to_mask = selected & (action < replace_prob)
    to_random = selected & (action >= replace_prob) & (action < replace_prob + random_prob)
    random_ids = _sample_non_special(rng, input_ids.shape, vocab_size, specials)
    masked = np.where(to_mask, mask_token_id, input_ids)
    masked = np.where(to_random, random_ids, masked)
    labels = np.where(selected, input_ids, IGNORE_INDEX)
    return masked.astype(np.int32), labels.astype(np.int32)
