"""grain pipelines over text files for masked-LM pretraining, with exact resume.

The corpora are small (a few MB), so every line is tokenised once up front and packed greedily
into rows of `seq_len` ids (`<s> a </s> b </s> ... </s> <pad>...`). The rows are a random-access
`grain.MapDataset`, which makes shuffling, sharding and resuming index arithmetic:

    source(rows) -> shuffle(seed) -> repeat() -> random_map(mask) -> [shard::count] -> batch
    -> to_iter_dataset()

Masking runs before the shard slice, so the rng of an element is derived from its *global*
index: each example is masked the same however many hosts read the data. The iterator state is
`{"next_index": int}` (JSON), saved with every checkpoint; restoring it replays the same batches.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from xformers_jax.data.collators import mlm_mask
from xformers_jax.data.corpus import DataError
from xformers_jax.data.sources import read_texts

# A prefetch buffer of a few batches hides host work behind the device step without holding
# hundreds of batches (grain's default of 500) in memory.
_DEFAULT_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=8)


def pack_sequences(
    token_lists: Sequence[Sequence[int]], seq_len: int, *, bos_id: int, eos_id: int, pad_id: int
) -> np.ndarray:
    """Greedily packs token lists into `<s> a </s> b </s> ...` rows, right-padded.

    Args:
        token_lists: ids of each line, without specials; lines longer than `seq_len - 2` are
            truncated to it, empty lines skipped.
        seq_len: row length.
        bos_id, eos_id, pad_id: the special ids.

    Returns:
        int32 `[rows, seq_len]`; every row starts with `bos_id` and each line ends with `eos_id`.
    """
    limit = seq_len - 2
    rows: list[np.ndarray] = []
    row = [bos_id]
    for tokens in token_lists:
        if not tokens:
            continue
        tokens = list(tokens[:limit])
        if len(row) + len(tokens) + 1 > seq_len:
            rows.append(np.asarray(row, dtype=np.int32))
            row = [bos_id]
        row.extend(tokens)
        row.append(eos_id)
    if len(row) > 1:
        rows.append(np.asarray(row, dtype=np.int32))
    packed = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        packed[i, : r.size] = r
    return packed


def _mask_row(row: np.ndarray, rng: np.random.Generator, *, pad_id: int, **mask_kwargs) -> dict:
    masked, labels = mlm_mask(row[None], rng, **mask_kwargs)
    return {
        "input_ids": masked[0],
        "attention_mask": (row != pad_id).astype(np.int32),
        "labels": labels[0],
    }


def block_indices(shard_index: int | Sequence[int]) -> tuple[int, ...]:
    """A host's row blocks (`sharding.batch_block`) as a tuple, from one index or several."""
    if isinstance(shard_index, int | np.integer):
        return (int(shard_index),)
    return tuple(int(b) for b in shard_index)


def global_batch_rows(batch_size: int, shard_index: int | Sequence[int], shard_count: int) -> int:
    """Rows of the global batch, from one host's `batch_size` rows in its blocks."""
    return batch_size // len(block_indices(shard_index)) * shard_count


def _check_args(tokenizer, seq_len, batch_size, seed, shard_index, shard_count, vocab_size):
    if seq_len < 4:
        raise ValueError(f"seq_len: must be >= 4 (<s>, a token, </s> and room), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed: must be in [0, 2**32), got {seed}")
    if shard_count < 1 or not all(0 <= b < shard_count for b in block_indices(shard_index)):
        raise ValueError(
            f"shard_index / shard_count: need 0 <= shard_index < shard_count, got "
            f"{shard_index} / {shard_count}"
        )
    for name in ("encode_many", "mask_id", "special_ids", "pad_id", "bos_id", "eos_id"):
        if not hasattr(tokenizer, name):
            raise TypeError(f"tokenizer: expected a SentencePieceTokenizer, got {type(tokenizer)}")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"vocab_size: the model's vocab ({vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size}, {getattr(tokenizer, 'path', tokenizer)}): they do not match"
        )


def mlm_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    mask_prob: float = 0.15,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    text_field: str = "text",
    holdout: str | None = None,
    vocab_size: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Masked-LM batches from UTF-8 text files (one example per line).

    Train: an infinite stream, reshuffled every epoch. Eval (`train=False`): one pass in file
    order, masked deterministically, padded with empty rows (all `<pad>`, labels -100, so they
    add nothing to weighted metrics) to a multiple of `shard_count * batch_size`: every host gets
    the same number of full batches and the eval step compiles once.

    Args:
        files: paths, globs or gs:// URLs of .txt / .jsonl / .parquet files (.gz, .zst), read
            with `sources.read_texts` (bad files raise `DataError`); `text_field`: their text
            field; `holdout`: "train" / "eval" takes a content-hash split of them.
        tokenizer: a `SentencePieceTokenizer`.
        seq_len: tokens per row (`T`), specials included.
        batch_size: rows per batch yielded by this shard (`B`): the per-host slice of the
            global batch.
        seed: shuffle and masking seed.
        mask_prob: masked-LM selection probability (80/10/10 of selected).
        train: training stream (shuffled, repeated) or a finite eval pass.
        shard_index, shard_count: this host's slice of the global stream (`jax.process_index()`,
            `jax.process_count()`): shards read disjoint rows.
        vocab_size: the model's vocab size, if given checked against the tokenizer's.
        read_options: grain thread / prefetch options (2 threads, 8 batches by default).

    Returns:
        A `grain.IterDataset`; `iter(ds)` yields dicts of int32 numpy arrays `input_ids`,
        `attention_mask` and `labels` (-100 = not predicted), each `[B, T]`, and supports
        `get_state()` / `set_state(state)` for exact resume.
    """
    _check_args(tokenizer, seq_len, batch_size, seed, shard_index, shard_count, vocab_size)
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not files:
        raise ValueError("files: no text files given")
    lines = read_texts(files, text_field, holdout)
    rows = pack_sequences(
        tokenizer.encode_many(lines, add_special_tokens=False),
        seq_len,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    if rows.shape[0] == 0:
        raise DataError(f"{', '.join(map(str, files))}: no tokens after tokenisation")
    if not train:
        per_step = global_batch_rows(batch_size, shard_index, shard_count)
        n_pad = -rows.shape[0] % per_step
        rows = np.concatenate([rows, np.full((n_pad, seq_len), tokenizer.pad_id, np.int32)])

    mask_fn = functools.partial(
        _mask_row,
        pad_id=tokenizer.pad_id,
        mask_token_id=tokenizer.mask_id,
        # Random replacements come from the tokenizer's ids, never from a model's padded rows.
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special_ids,
        mask_prob=mask_prob,
    )
    ds = sharded_stream(
        rows, mask_fn, seed=seed, train=train, shard_index=shard_index, shard_count=shard_count,
        batch_size=batch_size,
    )  # fmt: skip
    return iterate(ds, read_options)


def sharded_stream(
    source,
    fn,
    *,
    seed: int,
    train: bool,
    shard_index: int | Sequence[int],
    shard_count: int,
    batch_size: int,
    random: bool = True,
    per_block: Callable[[Any], Any] | None = None,
) -> grain.MapDataset:
    """This host's batches of the examples made from `source` (an array of items).

    Training: shuffled with `seed` and repeated forever; eval: one pass in order. `fn(item, rng)`
    makes each example (its rng seeded apart from the shuffle, from the example's global index),
    or `fn(item)` with `random=False`.

    The global batch of step `s` is `shard_count` blocks of `S` elements, elements
    `[s * S * shard_count, (s + 1) * S * shard_count)` of the stream in order, and a host feeds
    the blocks its devices hold (`sharding.batch_block`): `shard_index` is one block index or
    several (then `S = batch_size // len(blocks)` and the host's batch is its blocks
    concatenated). Row `r` of step `s` is therefore the same example whatever the host count.
    `per_block` maps each block's batch before the host's blocks are joined. A final partial
    batch is dropped (eval inputs are padded to whole global batches by the callers).
    """
    ds = grain.MapDataset.source(source)
    if train:
        ds = ds.shuffle(seed=seed).repeat(None)
    if random:
        # A seed distinct from the shuffle's (same value would correlate the two permutations).
        ds = ds.random_map(fn, seed=(seed * 0x9E3779B1 + 1) % 2**32)
    else:
        ds = ds.map(fn)
    return host_blocks(ds, shard_index, shard_count, batch_size, per_block)


def host_blocks(
    ds: grain.MapDataset,
    blocks: int | Sequence[int],
    count: int,
    batch_size: int,
    per_block: Callable[[Any], Any] | None = None,
) -> grain.MapDataset:
    """This host's batches of an unbatched stream: blocks `blocks` of `count` per global batch
    (see `sharded_stream`), `batch_size` rows in all, joined in block order."""
    blocks = block_indices(blocks)
    if count < 1 or not blocks or any(not 0 <= b < count for b in blocks):
        raise ValueError(f"need blocks in [0, {count}), got {blocks}")
    if batch_size % len(blocks):
        raise ValueError(f"batch_size {batch_size} does not split into {len(blocks)} blocks")
    batches = ds.batch(batch_size // len(blocks), drop_remainder=True)
    if per_block is not None:
        batches = batches.map(per_block)
    if len(blocks) == 1:
        return batches[blocks[0] :: count]

    def join(step: int) -> Any:
        parts = [batches[step * count + b] for b in blocks]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    return grain.MapDataset.range(len(batches) // count).map(join)


def iterate(ds: grain.MapDataset, read_options: grain.ReadOptions | None = None):
    """`ds` as a resumable `grain.IterDataset` (2 threads, 8 batches prefetched by default)."""
    return ds.to_iter_dataset(read_options or grain.ReadOptions(**_DEFAULT_READ_OPTIONS))


def tokens_per_batch(batch: dict) -> int:
    """Real (non-pad) tokens in a batch: `attention_mask.sum()`."""
    return int(np.sum(batch["attention_mask"]))
