"""Small generated fine-tuning datasets from the bundled chatterbot corpus (no download).

Each builder returns numpy arrays of whole examples; `ArrayBatches` serves them as training
batches (reshuffled per epoch, resumable) or one eval pass. Languages: `LANGUAGES` (those with the
most utterances). Examples are split train/eval by a content hash of the utterance, so the split
is stable. The four tasks:

* classification (`language_id`): which language is an utterance in? `labels` `[n]`.
* token classification (`mixed_language_tags`): two utterances of different languages are
  concatenated; every token is tagged with its language. `labels` `[n, T]` (-100 at specials
  and padding).
* QA (`span_qa`): the question is an utterance, the context holds it among 2-3 utterances of
  other languages; the answer is its span in the context. `start_positions`, `end_positions`.
* multiple choice (`reply_choice`): a prompt and 4 candidate continuations: the true next
  utterance of its dialog and 3 decoys of random vocabulary tokens with the lengths of real
  utterances of other languages, the true one at a random slot. `labels` `[n]`. (Decoys made of
  real utterances of other languages make a task a tiny model cannot learn in a few hundred
  steps; random-token decoys keep the multiple-choice plumbing testable in a few steps.)
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from xformers_jax.data.corpus import chatterbot_texts

LANGUAGES = ("english", "italian", "spanish", "portuguese")
NUM_CHOICES = 4


def _is_eval(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % 10 == 0


def _texts(lang: str, train: bool, limit: int) -> list[str]:
    seen, out = set(), []
    for t in chatterbot_texts([lang]):
        if t not in seen and _is_eval(t) != train:
            seen.add(t)
            out.append(t)
    return out[:limit]


def _pair(tok, first: Sequence[int], second: Sequence[int] | None, seq_len: int) -> list[int]:
    """`<s> a </s>` or XLM-R's pair layout `<s> a </s></s> b </s>`, truncated to `seq_len`."""
    ids = [tok.bos_id, *first, tok.eos_id]
    if second is not None:
        ids += [tok.eos_id, *second, tok.eos_id]
    return ids[:seq_len]


def _pad(rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), seq_len), pad_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, (ids != pad_id).astype(np.int32)


def language_id(tok, seq_len: int, train: bool, per_language: int = 300) -> dict[str, np.ndarray]:
    """Classification: `input_ids`, `attention_mask` `[n, T]`, `labels` `[n]` (language index)."""
    rows, labels = [], []
    for li, lang in enumerate(LANGUAGES):
        for t in _texts(lang, train, per_language):
            rows.append(_pair(tok, tok.encode(t, add_special_tokens=False), None, seq_len))
            labels.append(li)
    ids, mask = _pad(rows, seq_len, tok.pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels, np.int32)}


def mixed_language_tags(tok, seq_len: int, train: bool, n: int = 600) -> dict[str, np.ndarray]:
    """Token classification: each token's language index; `labels` `[n, T]`, -100 = ignore."""
    rng = np.random.default_rng(0 if train else 1)
    pools = [[tok.encode(t, add_special_tokens=False) for t in _texts(lang, train, 400)]
             for lang in LANGUAGES]  # fmt: skip
    rows, tags = [], []
    for _ in range(n):
        a, b = rng.choice(len(LANGUAGES), 2, replace=False)
        x = pools[a][rng.integers(len(pools[a]))]
        y = pools[b][rng.integers(len(pools[b]))]
        half = (seq_len - 2) // 2
        x, y = x[:half], y[:half]
        rows.append([tok.bos_id, *x, *y, tok.eos_id])
        tags.append([-100, *([int(a)] * len(x)), *([int(b)] * len(y)), -100])
    ids, mask = _pad(rows, seq_len, tok.pad_id)
    labels = np.full(ids.shape, -100, np.int32)
    for i, t in enumerate(tags):
        labels[i, : len(t)] = t
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def span_qa(tok, seq_len: int, train: bool, n: int = 600) -> dict[str, np.ndarray]:
    """QA: `<s> question </s></s> context </s>`; the answer span is in token positions."""
    rng = np.random.default_rng(2 if train else 3)
    pools = [[tok.encode(t, add_special_tokens=False)[:12] for t in _texts(lang, train, 400)]
             for lang in LANGUAGES]  # fmt: skip
    pools = [[p for p in pool if p] for pool in pools]
    rows, starts, ends = [], [], []
    for _ in range(n):
        langs = rng.permutation(len(LANGUAGES))[: int(rng.integers(3, 5))]
        parts = [pools[li][rng.integers(len(pools[li]))] for li in langs]
        k = int(rng.integers(len(parts)))
        answer = parts[k]
        context, start = [], 0
        for j, p in enumerate(parts):
            if j == k:
                start = len(context)
            context += p
        prefix = 1 + len(answer) + 2  # <s> question </s></s>
        row = _pair(tok, answer, context, seq_len)
        s, e = prefix + start, prefix + start + len(answer) - 1
        if e >= len(row) - 1:
            continue  # truncated away: skip rather than teach an impossible span
        rows.append(row)
        starts.append(s)
        ends.append(e)
    ids, mask = _pad(rows, seq_len, tok.pad_id)
    return {"input_ids": ids, "attention_mask": mask,
            "start_positions": np.asarray(starts, np.int32),
            "end_positions": np.asarray(ends, np.int32)}  # fmt: skip


def reply_choice(tok, seq_len: int, train: bool, n: int = 400) -> dict[str, np.ndarray]:
    """Multiple choice: `input_ids` `[n, choices, T]`, `labels` `[n]` (the true reply's slot)."""
    rng = np.random.default_rng(4 if train else 5)
    cut = seq_len // 2 - 2
    pools = [[tok.encode(t, add_special_tokens=False)[:cut] for t in chatterbot_texts([lang])
              if _is_eval(t) != train] for lang in LANGUAGES]  # fmt: skip
    rows, labels = [], []
    low = tok.unk_id + 1  # decoys never use the <s> <pad> </s> <unk> ids
    for _ in range(n):
        li = int(rng.integers(len(LANGUAGES)))
        pool = pools[li]
        i = int(rng.integers(len(pool) - 1))
        # Decoys: random ordinary tokens, as long as utterances of the other languages.
        others = [x for x in range(len(LANGUAGES)) if x != li]
        picks = rng.choice(others, NUM_CHOICES - 1)
        lengths = [len(pools[o][rng.integers(len(pools[o]))]) for o in picks]
        cands = [list(rng.integers(low, tok.vocab_size, max(n_, 1))) for n_ in lengths]
        slot = int(rng.integers(NUM_CHOICES))
        cands.insert(slot, pool[i + 1])
        rows += [_pair(tok, pool[i], c, seq_len) for c in cands]
        labels.append(slot)
    ids, mask = _pad(rows, seq_len, tok.pad_id)
    shape = (-1, NUM_CHOICES, seq_len)
    return {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape),
            "labels": np.asarray(labels, np.int32)}  # fmt: skip


class ArrayBatches:
    """Batches of a dict of equal-length arrays, for one host's shard.

    Train: infinite, reshuffled every epoch from `seed`; eval: one pass in order, the last
    incomplete batch dropped. `get_state()` / `set_state()` (JSON) give exact resume.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, train: bool,
                 seed: int = 0, shard_index: int = 0, shard_count: int = 1):  # fmt: skip
        n = len(next(iter(arrays.values())))
        if n < batch_size * shard_count:
            raise ValueError(f"{n} examples are fewer than one global batch")
        self.arrays, self.batch_size, self.train, self.seed = arrays, batch_size, train, seed
        self.shard_index, self.shard_count, self.n = shard_index, shard_count, n
        self.index = 0

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __next__(self) -> dict[str, Any]:
        per_step = self.batch_size * self.shard_count
        steps_per_epoch = self.n // per_step
        epoch, step = divmod(self.index, steps_per_epoch)
        if not self.train and epoch > 0:
            raise StopIteration
        order = self._order(epoch)
        lo = step * per_step + self.shard_index * self.batch_size
        idx = order[lo : lo + self.batch_size]
        self.index += 1
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"next_index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["next_index"])
