"""T5 span corruption: noise masks, sentinel rewriting, length arithmetic and a grain pipeline.

Follows T5's `span_corruption` preprocessor (t5.data.preprocessors / seqio): the text stream is cut
into chunks of `tokens_length` ids, a random 15% of each chunk (spans of mean length 3) becomes
noise, the inputs keep the non-noise tokens with one sentinel per noise span, the targets hold the
noise spans each introduced by its sentinel; both end with EOS. Sentinel `i` is
`vocab_size - 1 - i` (the ids at the end of the model's vocabulary, like mT5's `<extra_id_i>`), so
the tokenizer must leave them free. `random_spans_helper` picks `tokens_length` so every input is
exactly `inputs_length` long (no padding, no truncation), and gives the matching targets length.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import grain
import numpy as np

from xformers_jax.data.collators import IGNORE_INDEX
from xformers_jax.data.corpus import DataError
from xformers_jax.data.pipeline import global_batch_rows, iterate, sharded_stream
from xformers_jax.data.sources import read_texts


def _lengths(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs length, targets length) of a `tokens_length` chunk, EOS and sentinels included."""
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_span))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_helper(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """T5's `random_spans_helper`: the longest raw chunk whose corrupted inputs fit.

    Returns:
      `(tokens_length, targets_length)`: raw tokens per example, and the targets' length.
    """
    tokens_length = inputs_length - 1
    while _lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = _lengths(tokens_length, noise_density, mean_noise_span_length)
    # T5's hack: for density 0.5 keep targets no longer than inputs (a round number).
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Random split of `num_items` into `num_segments` non-empty segments; their lengths."""
    first = np.zeros(num_items, bool)
    first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> np.ndarray:
    """T5's noise mask: `[length]` bool, `round(length * density)` noise tokens in spans.

    Spans alternate non-noise / noise, starting with non-noise; span lengths are uniform random
    segmentations, so the mean noise span length is `mean_noise_span_length`.
    """
    orig_length, length = length, max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, np.int32)
    indicator[starts] = 1
    return (np.cumsum(indicator) % 2 == 1)[:orig_length]


def noise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, vocab_size: int
) -> np.ndarray:
    """Replaces each noise span by one sentinel (`vocab_size - 1`, `vocab_size - 2`, ...)."""
    prev = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~prev
    sentinel = vocab_size - np.cumsum(first)
    out = np.where(first, sentinel, tokens)
    return out[~(noise_mask & prev)]


def span_corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One example: raw `[n]` ids -> (inputs, targets), each ending with `eos_id`."""
    mask = random_spans_noise_mask(tokens.size, rng, noise_density, mean_noise_span_length)
    inputs = noise_span_to_unique_sentinel(tokens, mask, vocab_size)
    targets = noise_span_to_unique_sentinel(tokens, ~mask, vocab_size)
    return np.append(inputs, eos_id).astype(np.int32), np.append(targets, eos_id).astype(np.int32)


def _example(chunk, rng, *, inputs_length, targets_length, pad_id, **kw) -> dict[str, np.ndarray]:
    inputs, targets = span_corrupt(chunk, rng, **kw)
    ids = np.full(inputs_length, pad_id, np.int32)
    ids[: inputs.size] = inputs[:inputs_length]
    labels = np.full(targets_length, IGNORE_INDEX, np.int32)
    labels[: targets.size] = targets[:targets_length]
    # Teacher forcing: the labels shifted right behind the start token (T5 starts with <pad>).
    decoder_input_ids = np.concatenate([[pad_id], np.where(labels < 0, pad_id, labels)[:-1]])
    return {
        "input_ids": ids,
        "attention_mask": (ids != pad_id).astype(np.int32),
        "decoder_input_ids": decoder_input_ids.astype(np.int32),
        "labels": labels,
    }


def span_corruption_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    *,
    inputs_length: int,
    batch_size: int,
    seed: int,
    vocab_size: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    num_sentinels: int = 100,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    text_field: str = "text",
    holdout: str | None = None,
) -> grain.IterDataset:
    """Span-corruption batches from UTF-8 text files (one document per line).

    The lines' ids are concatenated and cut into chunks of `tokens_length` (see
    `random_spans_helper`); each chunk is corrupted with an rng derived from its global index,
    so every host sees the same example whatever the sharding, and the iterator state
    (`get_state()` / `set_state()`) resumes exactly. Train: shuffled, repeated; eval: one pass.

    Args:
      files: text file path(s).
      tokenizer: a `SentencePieceTokenizer`; its ids must stay below the sentinels.
      inputs_length: encoder length `n`; targets get T5's matching length `m`.
      batch_size: rows per batch for this shard.
      seed: shuffle and noise seed.
      vocab_size: the model's vocabulary; sentinels are its last `num_sentinels` ids.
      noise_density / mean_noise_span_length: T5's 0.15 and 3.

    Returns:
      A `grain.IterDataset` of int32 dicts: `input_ids`, `attention_mask` `[B, n]`,
      `decoder_input_ids` (labels shifted right) and `labels` (-100 = padding) `[B, m]`.
    """
    if tokenizer.vocab_size > vocab_size - num_sentinels:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab {vocab_size} keeps "
            f"its last {num_sentinels} for sentinels: train the tokenizer with at most "
            f"{vocab_size - num_sentinels}"
        )
    tokens_length, targets_length = random_spans_helper(
        inputs_length, noise_density, mean_noise_span_length
    )
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    lines = read_texts(files, text_field, holdout)
    stream = np.concatenate(
        [np.asarray(t, np.int32) for t in tokenizer.encode_many(lines, add_special_tokens=False)]
        or [np.zeros(0, np.int32)]
    )
    n = stream.size // tokens_length
    if n == 0:
        raise DataError(
            f"{', '.join(map(str, files))}: {stream.size} tokens, fewer than one example "
            f"({tokens_length})"
        )
    chunks = stream[: n * tokens_length].reshape(n, tokens_length)
    if not train:
        # Wrap around to whole batches on every host, so the eval step sees full batches.
        per_step = global_batch_rows(batch_size, shard_index, shard_count)
        chunks = np.resize(chunks, (-(-n // per_step) * per_step, tokens_length))
    fn = functools.partial(
        _example,
        inputs_length=inputs_length,
        targets_length=targets_length,
        pad_id=tokenizer.pad_id,
        vocab_size=vocab_size,
        eos_id=tokenizer.eos_id,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    ds = sharded_stream(
        chunks, fn, seed=seed, train=train, shard_index=shard_index, shard_count=shard_count,
        batch_size=batch_size,
    )  # fmt: skip
    return iterate(ds)
