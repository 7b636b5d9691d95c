"""Training straight from `data.train_files` without `prepare`: files read lazily, tokenised in
grain workers, interleaved, with a checkpointable iterator (`data.streaming=True`).

    files (expanded, reshuffled every epoch with the seed)
      -> one `FileChunks` per file: its documents streamed, tokenised, cut into the objective's
         chunks (as `prepare` cuts them)
      -> grain's InterleaveIterDataset (`cycle_length` files at once)
      -> mp_prefetch over `data.num_workers` processes (each works through its share of the
         files; the main process takes their chunks round-robin)
      -> `HostRows`: the global batch's `B` chunks per step, of which this host makes its rows
         `[a, b)` (masking / permutations / noise from `(seed, step, row)`).

The global batch sequence is a function of the seed, the step and `data.num_workers` only (not of
the host count), but every host reads and tokenises the whole stream: streaming is for small or
one-off corpora; `xformers-jax prepare` is the path that scales (each host reads only its rows).
The iterator state is grain's (per file: chunks already taken; restoring re-reads a file up to
there) plus the step, saved with every checkpoint. Eval data is tokenised once and cached in the
workdir (`eval_cache/`), never at each eval.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from xformers_jax import paths
from xformers_jax.data.corpus import DataError
from xformers_jax.data.prepared import host_rows, row_dataset, with_workers

_ENCODE_BATCH = 256


def file_chunks(
    path: str,
    tokenizer,
    *,
    chunk_len: int,
    separator: int,
    text_field: str = "text",
    holdout: str | None = None,
    pad_tail: bool = False,
) -> Iterator[np.ndarray]:
    """The chunks of one file's document stream: `chunk_len` int32 ids each (documents joined by
    `separator`, -1 = none); a shorter last one with `pad_tail`. `holdout`: as `read_texts`."""
    from xformers_jax.data.prepare import _encode_many
    from xformers_jax.data.sources import is_holdout, iter_texts

    buffer: list[np.ndarray] = []
    held = 0
    texts = iter_texts(path, text_field)
    if holdout is not None:
        texts = (t for t in texts if is_holdout(t) == (holdout == "eval"))
    while True:
        batch = [t for _, t in zip(range(_ENCODE_BATCH), texts)]
        if not batch:
            break
        for doc in _encode_many(tokenizer, batch):
            if separator >= 0:
                doc = [*doc, separator]
            buffer.append(np.asarray(doc, np.int32))
            held += len(doc)
        if held >= chunk_len:
            flat = np.concatenate(buffer)
            whole = flat.size // chunk_len
            yield from flat[: whole * chunk_len].reshape(whole, chunk_len)
            rest = flat[whole * chunk_len :]
            buffer, held = ([rest] if rest.size else []), rest.size
    if pad_tail and held:
        yield np.concatenate(buffer)


class FileChunks(grain.IterDataset):
    """`file_chunks` of one file as a resumable grain dataset (state: chunks taken)."""

    def __init__(self, path: str, make: Callable[[str], Iterator[np.ndarray]]):
        super().__init__()
        self.path, self.make = path, make

    def __iter__(self):
        return _FileChunksIterator(self)

    def __str__(self) -> str:
        return f"FileChunks({self.path})"


class _FileChunksIterator(grain.DatasetIterator):
    def __init__(self, ds: FileChunks):
        super().__init__()
        self._ds, self._taken = ds, 0
        self._it = ds.make(ds.path)

    def __next__(self) -> np.ndarray:
        chunk = next(self._it)
        self._taken += 1
        return chunk

    def get_state(self) -> dict[str, Any]:
        return {"taken": self._taken}

    def set_state(self, state: dict[str, Any]) -> None:
        self._it = self._ds.make(self._ds.path)
        for _ in range(int(state["taken"])):
            next(self._it)
        self._taken = int(state["taken"])


class HostRows(grain.IterDataset):
    """Per step, `global_batch` chunks of the parent; this host's rows (`host_rows`) made by
    `make_row(chunk, rng, others, reverse)` with rng `(seed, step, row)`, stacked."""

    def __init__(
        self, parent, make_row, *, global_batch, shard_index, shard_count, seed, bi_data=False
    ):
        super().__init__(parent)
        self.make_row, self.global_batch, self.seed = make_row, global_batch, seed
        self.rows = host_rows(global_batch, shard_index, shard_count)
        # XLNet's bi_data: the second half of the batch reads its chunks backwards.
        self.reversed_from = global_batch // 2 if bi_data else global_batch

    def __iter__(self):
        return _HostRowsIterator(self, self._parent.__iter__())


class _HostRowsIterator(grain.DatasetIterator):
    def __init__(self, ds: HostRows, parent):
        super().__init__(parent)
        self._ds, self._step = ds, 0

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        chunks = [next(self._parent) for _ in range(ds.global_batch)]
        rows = [
            ds.make_row(
                chunks[r],
                np.random.default_rng((ds.seed, self._step, r)),
                chunks,
                r >= ds.reversed_from,
            )
            for r in (int(x) for x in ds.rows)
        ]
        self._step += 1
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._step = int(state["step"])


class _FileDataset:
    """Picklable `path -> FileChunks`."""

    def __init__(self, chunker):
        self.chunker = chunker

    def __call__(self, path: str) -> FileChunks:
        return FileChunks(path, self.chunker)


class _Chunker:
    """Picklable `path -> file_chunks(path, ...)` (it travels to the grain workers)."""

    def __init__(self, tokenizer, **kwargs):
        self.tokenizer, self.kwargs = tokenizer, kwargs

    def __call__(self, path: str) -> Iterator[np.ndarray]:
        return file_chunks(path, self.tokenizer, **self.kwargs)


def stream_dataset(
    files: list[str],
    tokenizer,
    make_row,
    *,
    lay: dict,
    global_batch: int,
    shard_index: int,
    shard_count: int,
    seed: int,
    text_field: str = "text",
    holdout: str | None = None,
    num_workers: int = 0,
    cycle_length: int = 4,
    bi_data: bool = False,
) -> grain.IterDataset:
    """The endless training stream of this host's batches (see the module docstring)."""
    chunker = _Chunker(
        tokenizer,
        chunk_len=lay["chunk_len"],
        separator=lay["separator"],
        text_field=text_field,
        holdout=holdout,
        pad_tail=lay["objective"] == "mlm",
    )
    per_file = grain.MapDataset.source(files).shuffle(seed=seed).repeat(None)
    per_file = per_file.map(_FileDataset(chunker))
    chunks = grain.experimental.InterleaveIterDataset(
        per_file, cycle_length=min(cycle_length, len(files))
    )
    chunks = with_workers(chunks, num_workers)
    return HostRows(
        chunks,
        make_row,
        global_batch=global_batch,
        shard_index=shard_index,
        shard_count=shard_count,
        seed=seed,
        bi_data=bi_data,
    )


def cached_eval_chunks(
    files: list[str], tokenizer, lay: dict, workdir: str, text_field: str, holdout: str | None
) -> np.ndarray:
    """The eval split's chunks `[n, chunk_len]` (MLM: right-padded with -1), tokenised once and
    kept in `workdir/eval_cache/` (keyed by the files, the layout and the tokenizer)."""
    key = json.dumps([files, lay, text_field, holdout, getattr(tokenizer, "path", "")])
    target = paths.join(workdir, "eval_cache", hashlib.sha1(key.encode()).hexdigest()[:16] + ".npy")
    if paths.exists(target):
        return np.load(io.BytesIO(paths.read_bytes(target)))
    n = lay["chunk_len"]
    chunks = [
        np.pad(c, (0, n - c.size), constant_values=-1)
        for f in files
        for c in file_chunks(
            f, tokenizer, chunk_len=n, separator=lay["separator"], text_field=text_field,
            holdout=holdout, pad_tail=lay["objective"] == "mlm",
        )
    ]  # fmt: skip
    if not chunks:
        raise DataError(f"{', '.join(files)}: no eval chunk of {n} ids")
    array = np.stack(chunks)
    buf = io.BytesIO()
    np.save(buf, array)
    paths.write_bytes(target, buf.getvalue())
    return array


def streaming_datasets(config, workdir: str, tokenizer, make_row, lay: dict, bi_data=False):
    """`(train_data, eval_data)` factories of a `TaskSpec` streaming `data.train_files`."""
    from xformers_jax.data.sources import expand_files
    from xformers_jax.data.tokenizers import eval_files, holdout

    d, seed = config.data, int(config.train.seed)
    global_batch, field = int(config.train.batch_size), d.get("text_field", "text")
    train_files = expand_files(list(d.train_files))
    evals = expand_files(eval_files(config, workdir))
    cache: dict[str, np.ndarray] = {}

    def eval_array() -> np.ndarray:
        if "eval" not in cache:
            cache["eval"] = cached_eval_chunks(
                evals, tokenizer, lay, workdir, field, holdout(config, "eval")
            )
        return cache["eval"]

    def train_data(shard_index, shard_count):
        return stream_dataset(
            train_files, tokenizer, make_row, lay=lay, global_batch=global_batch,
            shard_index=shard_index, shard_count=shard_count, seed=seed, text_field=field,
            holdout=holdout(config, "train"), num_workers=int(d.get("num_workers", 0)),
            bi_data=bi_data,
        )  # fmt: skip

    def eval_data(shard_index, shard_count):
        array = eval_array()
        steps = -(-len(array) // global_batch)

        def example(step, row):
            chunk = array[(step * global_batch + row) % len(array)]
            rng = np.random.default_rng((seed + 1, step, row))
            reverse = bi_data and row >= global_batch // 2
            return make_row(chunk[chunk >= 0], rng, array, reverse)

        return row_dataset(
            example, global_batch=global_batch, shard_index=shard_index,
            shard_count=shard_count, steps=steps,
        )  # fmt: skip

    return train_data, eval_data
