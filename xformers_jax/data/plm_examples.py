"""XLNet permutation-LM examples and grain pipelines (the original XLNet recipe, in numpy).

An example is `A <sep> B <sep> <cls>` (segment ids 0, 1, 2; B is A's continuation or, half of the
time, a random chunk) of `seq_len` tokens. Targets are whole spans (lengths 1..`max_span`, longer
ones rarer) until `num_predict` tokens are chosen; a factorisation order is drawn per block of
`perm_size` positions (local permutation). Then, with rank r(i) in that order (-1 for tokens
that are not predicted, which everyone sees):

    perm_mask[i, j] = 1  (i may not see j)  iff  j is a target or special and r(i) <= r(j),
                                               except that non-targets may see themselves;
    target_mapping[k, j] = 1 for the k-th predicted position j; target[k] its token.

With `reuse_len` the first `reuse_len` tokens (kept as mems for the next segment) are permuted on
their own and never see the rest; the rest sees all of them. With `bi_data` every batch is half
forward rows and half their reversals (the model's `bi_data` gives them backward positions).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import grain
import numpy as np

from xformers_jax.data.corpus import DataError
from xformers_jax.data.pipeline import iterate, sharded_stream
from xformers_jax.data.sources import read_texts

IGNORE_INDEX = -100


def sample_spans(
    n: int,
    num_predict: int,
    rng: np.random.Generator,
    max_span: int = 5,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """`[n]` bool: whole spans (length ~ 1/l on 1..max_span) until `num_predict` are chosen."""
    allowed = np.ones(n, bool) if candidates is None else candidates.copy()
    chosen = np.zeros(n, bool)
    lengths = np.arange(1, max_span + 1)
    p = 1.0 / lengths
    p /= p.sum()
    for _ in range(4 * n):
        if chosen.sum() >= num_predict or not allowed.any():
            break
        span = int(rng.choice(lengths, p=p))
        start = int(rng.integers(0, n))
        end = min(start + span, n, start + num_predict - int(chosen.sum()))
        chosen[start:end] |= allowed[start:end]
    return chosen


def local_perm_mask(
    is_target: np.ndarray, is_special: np.ndarray, perm_size: int, rng: np.random.Generator
) -> np.ndarray:
    """`[n, n]` float32 perm_mask (1 = may not attend) for one segment (see module docstring)."""
    n = is_target.shape[0]
    order = np.arange(n)
    for s in range(0, n, perm_size):
        order[s : s + perm_size] = s + rng.permutation(min(perm_size, n - s))
    hidden = is_target | is_special  # what others may not freely see
    rank = np.where(hidden, order, -1)
    self_rank = np.where(is_target, rank, rank + 1)  # non-targets also see themselves
    return ((self_rank[:, None] <= rank[None, :]) & hidden[None, :]).astype(np.float32)


def plm_example(
    a: np.ndarray,
    b: np.ndarray,
    rng: np.random.Generator,
    *,
    sep_id: int,
    cls_id: int,
    num_predict: int,
    perm_size: int,
    reuse_len: int = 0,
    max_span: int = 5,
) -> dict[str, np.ndarray]:
    """One example from segments `a`, `b` (ids, no specials; `len(a) + len(b) + 3` tokens).

    Returns int32 `input_ids`, `token_type_ids` `[n]`, float32 `perm_mask` `[n, n]`,
    `target_mapping` `[num_predict, n]`, int32 `labels` `[num_predict]` (-100 where fewer targets
    were drawn).
    """
    ids = np.concatenate([a, [sep_id], b, [sep_id, cls_id]]).astype(np.int32)
    types = np.concatenate([np.zeros(len(a) + 1), np.ones(len(b) + 1), [2]]).astype(np.int32)
    n = ids.shape[0]
    special = (ids == sep_id) | (ids == cls_id)
    perm = np.ones((n, n), np.float32)
    target = np.zeros(n, bool)
    parts = [(0, reuse_len), (reuse_len, n)] if reuse_len else [(0, n)]
    for s, e in parts:
        share = round(num_predict * (e - s) / n)
        target[s:e] = sample_spans(e - s, share, rng, max_span, ~special[s:e])
        perm[s:e, s:e] = local_perm_mask(target[s:e], special[s:e], perm_size, rng)
    if reuse_len:
        perm[reuse_len:, :reuse_len] = 0.0  # the new part sees the whole reused part
    pos = np.flatnonzero(target)[:num_predict]
    mapping = np.zeros((num_predict, n), np.float32)
    mapping[np.arange(len(pos)), pos] = 1.0
    labels = np.full(num_predict, IGNORE_INDEX, np.int32)
    labels[: len(pos)] = ids[pos]
    return dict(
        input_ids=ids, token_type_ids=types, perm_mask=perm, target_mapping=mapping, labels=labels
    )


def plm_one(x: np.ndarray, rng: np.random.Generator, *, others, **kw) -> dict[str, np.ndarray]:
    """A chunk of raw ids -> one example: cut into A and B, B replaced half of the time by the
    start of a random chunk of `others` (anything with `len` and `[i]`)."""
    cut = int(rng.integers(1, len(x) - 1))
    a, b = x[:cut], x[cut:]
    if rng.random() < 0.5:  # B not A's continuation
        row = others[int(rng.integers(0, len(others)))]
        b = row[: len(b)]
    return plm_example(a, b, rng, **kw)


def _make_row(
    chunk: np.ndarray, rng: np.random.Generator, *, others: np.ndarray, bi_data: bool, **kw
) -> dict[str, np.ndarray]:
    """A chunk of raw ids -> one example (two stacked, forward then reversed, with bi_data)."""

    def one(x):
        return plm_one(x, rng, others=others, **kw)

    if not bi_data:
        return one(chunk)
    fwd, bwd = one(chunk), one(chunk[::-1].copy())
    return {k: np.stack([fwd[k], bwd[k]]) for k in fwd}


def _halves(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`[B/2, 2, ...]` (forward, reversed) -> `[B, ...]`, forward rows first (bi_data)."""
    return {k: np.concatenate([v[:, 0], v[:, 1]]) for k, v in batch.items()}


def plm_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    num_predict: int,
    perm_size: int,
    reuse_len: int = 0,
    bi_data: bool = False,
    max_span: int = 5,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    text_field: str = "text",
    holdout: str | None = None,
) -> grain.IterDataset:
    """Permutation-LM batches from UTF-8 text files, resumable (grain iterator state).

    The lines are tokenised (an `XLNetTokenizer`), joined with `<eod>` between documents and cut
    into chunks of `seq_len - 3` ids. Yields dicts of `[B, ...]` numpy arrays as `plm_example`.
    """
    if bi_data and batch_size % 2:
        raise ValueError(f"bi_data needs an even batch_size, got {batch_size}")
    if seq_len < 8 or num_predict < 1 or perm_size < 1:
        raise ValueError("seq_len >= 8, num_predict >= 1 and perm_size >= 1 are required")
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    stream: list[int] = []
    for line in read_texts(files, text_field, holdout):
        stream.extend(tokenizer.encode(line, add_special_tokens=False))
        stream.append(tokenizer.eod_token_id)
    body = seq_len - 3
    rows = np.asarray(stream[: len(stream) // body * body], np.int32).reshape(-1, body)
    if rows.shape[0] < 2:
        raise DataError(f"{', '.join(map(str, files))}: too little text for seq_len {seq_len}")
    kw = dict(
        others=rows,
        bi_data=bi_data,
        sep_id=tokenizer.sep_token_id,
        cls_id=tokenizer.cls_token_id,
        num_predict=num_predict,
        perm_size=perm_size,
        reuse_len=reuse_len,
        max_span=max_span,
    )
    ds = sharded_stream(
        rows,
        functools.partial(_make_row, **kw),
        seed=seed,
        train=train,
        shard_index=shard_index,
        shard_count=shard_count,
        batch_size=batch_size // 2 if bi_data else batch_size,
        per_block=_halves if bi_data else None,
    )
    return iterate(ds)
