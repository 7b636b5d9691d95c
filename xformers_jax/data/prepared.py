"""Training from `xformers-jax prepare`'s shards: random access, global shuffle, host-independent
order, exact resume, language mixtures, XLNet streams.

A batch is made row by row: global row `r` of step `s` is a pure function of `(seed, s, r)`:

* MLM / span corruption: item `e = s * B + r` of the globally shuffled chunks (grain's
  `MapDataset.shuffle`: an index permutation in O(1) memory, new every epoch); with a mixture,
  the source of `e` is drawn with the mixture's weights and the chunk uniformly within it.
* XLNet: the chunks form `S` contiguous streams (`S = B`, or `B / 2` with `bi_data`, whose second
  half of the batch reads the same streams backwards); row `r` reads the next chunk of its
  stream at every step, so the mems carried between steps hold the preceding text.

Masking / permutations / noise use `np.random.default_rng((seed, s, r))`. Each host builds only
its rows `[a, b)` (`host_rows`), so the global batch sequence does not depend on the host count,
and the iterator state (`{"next_index": steps taken}`) resumes on any number of hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from xformers_jax import config_lib, paths
from xformers_jax.data.corpus import DataError
from xformers_jax.data.pipeline import block_indices

# Rows of an endless stream (grain needs a length; 2**40 steps are never reached).
_ENDLESS = 2**40
_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=8)


def host_rows(global_batch: int, shard_index: int | Sequence[int], shard_count: int) -> np.ndarray:
    """The global rows this host loads, in order: blocks `shard_index` (one index or several,
    `sharding.batch_block`) of the `shard_count` equal blocks of the global batch, concatenated
    (what `jax.make_array_from_process_local_data` maps onto this host's devices)."""
    blocks = block_indices(shard_index)
    if (shard_count < 1 or global_batch % shard_count
            or not all(0 <= b < shard_count for b in blocks)):  # fmt: skip
        raise ValueError(
            f"batch of {global_batch} rows cannot be split into {shard_count} equal host blocks "
            f"(blocks {blocks})"
        )
    n = global_batch // shard_count
    return np.concatenate([np.arange(b * n, (b + 1) * n) for b in blocks])


def _rows(example: Callable[[int, int], dict], global_batch, shard_index, shard_count, steps):
    """A MapDataset of this host's rows, step after step (element i -> step, row)."""
    rows = host_rows(global_batch, shard_index, shard_count)
    n = len(rows)

    def make(i: int) -> dict:
        step, offset = divmod(int(i), n)
        return example(step, int(rows[offset]))

    return grain.MapDataset.range(0, steps * n).map(make).batch(n), n


def row_dataset(
    example: Callable[[int, int], dict],
    *,
    global_batch: int,
    shard_index: int,
    shard_count: int,
    steps: int | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Batches of `example(step, row)` for this host's rows; `steps=None`: endless.

    Yields dicts of `[b - a, ...]` numpy arrays; `get_state()` is `{"next_index": steps}`, the
    same on every host, so a run resumes on another host count. `num_workers > 0` makes the
    examples in that many grain worker processes.
    """
    ds, _ = _rows(example, global_batch, shard_index, shard_count, steps or _ENDLESS)
    it = ds.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))
    return with_workers(it, num_workers)


def with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`ds` made in `num_workers` grain processes (none for 0)."""
    if num_workers <= 0:
        return ds
    from absl import flags

    # grain's workers read absl flags, which a program without absl.app never parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


# ------------------------------------------------------------------------------ the shards


def read_manifest(directory: str) -> dict[str, Any]:
    from xformers_jax.data.prepare import FORMAT_VERSION, MANIFEST

    target = paths.join(directory, MANIFEST)
    if not paths.exists(target):
        raise DataError(
            f"{directory}: no {MANIFEST} (not a finished `xformers-jax prepare` output directory)"
        )
    manifest = json.loads(paths.read_text(target))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{target}: format version {manifest.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}: run prepare again"
        )
    return manifest


def _local(directory: str, name: str, cache: str | None) -> str:
    """A local path of a shard: itself, or (gs://) a copy in the cache directory, made once."""
    target = paths.join(directory, name)
    if not paths.is_remote(target):
        return target
    cache = cache or os.path.join(tempfile.gettempdir(), "xformers_jax_shards")
    local = os.path.join(cache, target.removeprefix("gs://"))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        paths.copy(target, local + ".part")
        os.replace(local + ".part", local)
    return local


class Chunks:
    """Random access to the chunks of one split and source: `chunks[i]` -> int32 `[<= n]`."""

    def __init__(self, directory: str, manifest: dict, split: str, source: str, cache=None):
        try:
            entry = manifest["splits"][split]["sources"][source]
        except KeyError:
            raise DataError(f"{directory}: no {split!r} data of source {source!r}") from None
        files = [_local(directory, s["file"], cache) for s in entry["shards"]]
        self.source = grain.sources.ArrayRecordDataSource(files)
        self.tokens = int(entry["tokens"])
        self._len = len(self.source)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self.source[int(i)], np.int32)


@dataclasses.dataclass
class Prepared:
    """An opened prepared directory: its manifest, tokenizer and per-source chunks."""

    directory: str
    manifest: dict
    train: dict[str, Chunks]
    eval: dict[str, Chunks]

    @classmethod
    def open(cls, directory: str, cache: str | None = None) -> Prepared:
        manifest = read_manifest(directory)
        splits = {
            split: {
                name: Chunks(directory, manifest, split, name, cache)
                for name in manifest["splits"].get(split, {}).get("sources", {})
            }
            for split in ("train", "eval")
        }
        if not splits["eval"]:
            raise DataError(f"{directory}: no eval chunks (too little held-out text)")
        return cls(directory, manifest, splits["train"], splits["eval"])

    def tokenizer(self):
        from xformers_jax.data.prepare import load_tokenizer

        return load_tokenizer(self.directory, self.manifest["tokenizer"])

    def check(self, config, chunk_len: int) -> None:
        """The shards were cut for this config's objective and length."""
        m = self.manifest
        if m["objective"] != config.task or m["chunk_len"] != chunk_len:
            raise config_lib.ConfigError(
                f"data.prepared_dir {self.directory} holds {m['objective']} chunks of "
                f"{m['chunk_len']} ids (seq_len {m['seq_len']}); task {config.task} with "
                f"data.seq_len {config.data.seq_len} needs {chunk_len}: run prepare for it"
            )


# ------------------------------------------------------------------------------ mixtures


def mixture_weights(
    tokens: dict[str, int], alpha: float = 0.3, weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Sampling probabilities of sources: explicit `weights`, else token share ** `alpha`
    (XLM-R and mT5 use 0.3), normalised."""
    names = sorted(tokens)
    if weights and any(weights.get(n) is not None for n in names):
        missing = [n for n in names if weights.get(n) is None]
        if missing:
            raise config_lib.ConfigError(f"data.mixture: no weight for {missing}")
        raw = np.array([float(weights[n]) for n in names])
    else:
        counts = np.array([max(tokens[n], 1) for n in names], np.float64)
        raw = (counts / counts.sum()) ** alpha
    if (raw < 0).any() or raw.sum() <= 0:
        raise config_lib.ConfigError(f"data.mixture: weights must be >= 0 and not all 0: {raw}")
    return dict(zip(names, (raw / raw.sum()).tolist()))


def _config_weights(config) -> dict[str, float] | None:
    mixture = config.data.get("mixture")
    if not mixture:
        return None
    return {
        str(k): (v.get("weight") if hasattr(v, "get") else None) for k, v in dict(mixture).items()
    }


# ------------------------------------------------------------------------------ examples


def _rng(seed: int, step: int, row: int) -> np.random.Generator:
    return np.random.default_rng((seed, step, row))


class ShuffledItems:
    """Item `e` of the endless, epoch-reshuffled chunk stream (one source, or a mixture)."""

    def __init__(self, sources: dict[str, Chunks], seed: int, probs: dict[str, float] | None):
        self.names = sorted(sources)
        self.sources = [sources[n] for n in self.names]
        self.single = len(self.sources) == 1
        self.shuffled = grain.MapDataset.source(self.sources[0]).shuffle(seed=seed).repeat(None)
        self.probs = np.array([probs[n] for n in self.names]) if probs else None
        self.seed = seed

    def __call__(self, e: int) -> tuple[np.ndarray, str]:
        if self.single:
            return self.shuffled[e], self.names[0]
        rng = np.random.default_rng((self.seed, e, 7))
        k = int(rng.choice(len(self.sources), p=self.probs))
        src = self.sources[k]
        return src[int(rng.integers(len(src)))], self.names[k]


def _all(sources: dict[str, Chunks]) -> Callable[[int], np.ndarray]:
    """Eval: every chunk of every source in order, wrapping around (whole batches)."""
    order = [(s, i) for name in sorted(sources) for s in [sources[name]] for i in range(len(s))]
    return lambda e: order[e % len(order)][0][order[e % len(order)][1]]


def prepared_datasets(config, make_row: Callable, chunk_len: int, *, streams: bool = False):
    """`(train_data, eval_data)` factories for a `TaskSpec` from `data.prepared_dir`.

    Args:
      make_row: `(chunk int32 [<= chunk_len], rng, others: Chunks, reverse: bool) -> dict`.
      streams: XLNet's contiguous per-row streams (see the module docstring) instead of shuffled
        chunks.
    """
    prepared = Prepared.open(config.data.prepared_dir)
    prepared.check(config, chunk_len)
    d, seed = config.data, int(config.train.seed)
    global_batch = int(config.train.batch_size)
    workers = int(d.get("num_workers", 0))
    train_sources = prepared.train
    probs = mixture_weights(
        {n: c.tokens for n, c in train_sources.items()}, float(d.get("mixture_alpha", 0.3)),
        _config_weights(config),
    )  # fmt: skip
    others = train_sources[sorted(train_sources)[0]]
    bi_data = streams and bool(config.model.get("bi_data", False))

    if streams:
        example = StreamRows(others, global_batch, seed, make_row, bi_data)
    else:
        items = ShuffledItems(train_sources, seed, probs)

        def example(step: int, row: int) -> dict:
            chunk, _ = items(step * global_batch + row)
            return make_row(chunk, _rng(seed, step, row), others, False)

    eval_item = _all(prepared.eval)
    n_eval = sum(map(len, prepared.eval.values()))
    eval_steps = -(-n_eval // global_batch)

    def eval_example(step: int, row: int) -> dict:
        reverse = bi_data and row >= global_batch // 2
        return make_row(
            eval_item(step * global_batch + row), _rng(seed + 1, step, row), others, reverse
        )

    def train_data(shard_index, shard_count):
        return row_dataset(
            example, global_batch=global_batch, shard_index=shard_index,
            shard_count=shard_count, num_workers=workers,
        )  # fmt: skip

    def eval_data(shard_index, shard_count):
        return row_dataset(
            eval_example, global_batch=global_batch, shard_index=shard_index,
            shard_count=shard_count, steps=eval_steps,
        )  # fmt: skip

    return prepared, (train_data, eval_data)


class StreamRows:
    """XLNet: row `r` of step `s` is chunk `s mod L` of stream `r` (backwards for the second half
    of a bi_data batch); each epoch of `L` steps gives the streams new blocks of the corpus."""

    def __init__(self, chunks: Chunks, global_batch: int, seed: int, make_row, bi_data: bool):
        self.chunks, self.seed, self.make_row, self.bi_data = chunks, seed, make_row, bi_data
        self.streams = global_batch // 2 if bi_data else global_batch
        self.length = len(chunks) // self.streams
        if self.length < 1:
            raise DataError(
                f"{len(chunks)} chunks cannot fill {self.streams} contiguous streams: more text "
                f"or a smaller train.batch_size"
            )

    def chunk_index(self, step: int, row: int) -> tuple[int, bool]:
        stream, reverse = row % self.streams, self.bi_data and row >= self.streams
        epoch, pos = divmod(step, self.length)
        block = int(np.random.default_rng((self.seed, epoch, 3)).permutation(self.streams)[stream])
        if reverse:
            pos = self.length - 1 - pos
        return block * self.length + pos, reverse

    def __call__(self, step: int, row: int) -> dict:
        index, reverse = self.chunk_index(step, row)
        return self.make_row(self.chunks[index], _rng(self.seed, step, row), self.chunks, reverse)


# ------------------------------------------------------------------------------ objectives


class MlmMasker:
    """RoBERTa's 80/10/10 masking of one row (as `collators.mlm_mask`, same distribution), lean
    enough to run per row: the special ids are a lookup table built once, and one `rng.random`
    call draws selection, action and replacement."""

    def __init__(self, *, vocab_size, special_ids, mask_token_id, mask_prob, pad_id):
        specials = np.unique(np.asarray([*special_ids, mask_token_id], np.int64))
        self.special = np.zeros(vocab_size, bool)
        self.special[specials] = True
        self.others = np.flatnonzero(~self.special).astype(np.int32)
        self.mask_id, self.mask_prob, self.pad_id = mask_token_id, mask_prob, pad_id

    def __call__(self, row: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        maskable = ~self.special[row]
        u = rng.random((3, row.size))
        selected = maskable & (u[0] < self.mask_prob)
        if not selected.any() and maskable.any():  # never an empty loss for a row
            selected[np.argmax(np.where(maskable, u[2], -1.0))] = True
        masked = row.copy()
        masked[selected & (u[1] < 0.8)] = self.mask_id
        rand = selected & (u[1] >= 0.8) & (u[1] < 0.9)
        masked[rand] = self.others[(u[2][rand] * self.others.size).astype(np.int64)]
        return {
            "input_ids": masked,
            "attention_mask": (row != self.pad_id).astype(np.int32),
            "labels": np.where(selected, row, -100).astype(np.int32),
        }


def mlm_row(chunk, rng, others, reverse, *, seq_len, bos_id, pad_id, masker) -> dict:
    """`<s> chunk` right-padded to `seq_len`, masked by `masker` (an `MlmMasker`)."""
    row = np.full(seq_len, pad_id, np.int32)
    row[0] = bos_id
    row[1 : 1 + chunk.size] = chunk[: seq_len - 1]
    return masker(row, rng)


def span_row(chunk, rng, others, reverse, **kw) -> dict:
    from xformers_jax.data.span_corruption_examples import _example

    return _example(chunk, rng, **kw)


def plm_row(chunk, rng, others, reverse, **kw) -> dict:
    from xformers_jax.data.plm_examples import plm_one

    return plm_one(chunk[::-1].copy() if reverse else chunk, rng, others=others, **kw)
