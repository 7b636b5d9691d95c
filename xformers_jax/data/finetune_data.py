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
  other languages; the answer is its span in the context. `start_positions`, `end_positions`,
  and for heads that restrict answers (XLNet's SQuAD head) `p_mask` `[n, T]` (1 = cannot be in
  the answer: question, specials but the CLS token, padding) and `cls_index` `[n]`.
* multiple choice (`reply_choice`): a prompt and 4 candidate continuations: the true next
  utterance of its dialog and 3 decoys of random vocabulary tokens with the lengths of real
  utterances of other languages, the true one at a random slot. `labels` `[n]`. (Decoys made of
  real utterances of other languages make a task a tiny model cannot learn in a few hundred
  steps; random-token decoys keep the multiple-choice plumbing testable in a few steps.)

How an example is laid out is the tokenizer's business, asked through transformers' names
(`build_inputs_with_special_tokens`, `create_token_type_ids_from_sequences`,
`get_special_tokens_mask`, `num_special_tokens_to_add`, `padding_side`, `pad_token_type_id`,
`model_input_names`): `XLNetTokenizer` answers with XLNet's layout (`A <sep> B <sep> <cls>`,
segment ids 0 / 1 / 2 at the CLS / 3 at padding, LEFT padding so the CLS token stays last);
`FairseqLayout` gives a `SentencePieceTokenizer` XLM-R's (`<s> A </s></s> B </s>`, right padding,
no token types). Content is truncated before the specials are added, so every row keeps them.
As transformers' SQuAD preprocessing does, a left-padding tokenizer gets the context first and
the question second (XLNet's pretraining saw the shorter segment second).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from xformers_jax.data.corpus import chatterbot_texts
from xformers_jax.data.pipeline import block_indices

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


class FairseqLayout:
    """XLM-R's example layout over a `SentencePieceTokenizer`, under transformers' method names.

    `<s> A </s>` and `<s> A </s></s> B </s>`, right padding, no token type ids (XLM-R's
    `model_input_names`); `<s>` plays the CLS token.
    """

    padding_side = "right"
    pad_token_type_id = 0
    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    vocab_size = property(lambda self: self.tokenizer.vocab_size)
    pad_token_id = property(lambda self: self.tokenizer.pad_id)
    cls_token_id = property(lambda self: self.tokenizer.bos_id)
    all_special_ids = property(lambda self: sorted(self.tokenizer.special_ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 4 if pair else 2

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None) -> list[int]:
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        ids = [bos, *token_ids_0, eos]
        return ids if token_ids_1 is None else [*ids, eos, *token_ids_1, eos]

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None) -> list[int]:
        mask = [1, *([0] * len(token_ids_0)), 1]
        return mask if token_ids_1 is None else [*mask, 1, *([0] * len(token_ids_1)), 1]


def conventions(tokenizer):
    """The tokenizer itself when it lays out examples (`XLNetTokenizer`), else `FairseqLayout`."""
    if hasattr(tokenizer, "build_inputs_with_special_tokens"):
        return tokenizer
    return FairseqLayout(tokenizer)


def _pad(rows: Sequence[Sequence[int]], seq_len: int, value: int, left: bool) -> np.ndarray:
    out = np.full((len(rows), seq_len), value, np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, seq_len - len(r) :] = r
        else:
            out[i, : len(r)] = r
    return out


class _Examples:
    """Rows laid out by the tokenizer's conventions, padded to `seq_len` by `arrays()`."""

    def __init__(self, tok, seq_len: int):
        self.tok, self.seq_len = tok, seq_len
        self.left = tok.padding_side == "left"
        self.ids: list[list[int]] = []
        self.types: list[list[int]] = []

    def add(self, a: Sequence[int], b: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
        """Appends one example (`a`, `b`: ids without specials; must fit with the specials).

        Returns:
          The padded row's positions of the content tokens, A's then B's `[len(a) + len(b)]`,
          and the position of the CLS token.
        """
        ids = self.tok.build_inputs_with_special_tokens(list(a), None if b is None else list(b))
        if len(ids) > self.seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len {self.seq_len}")
        self.ids.append(ids)
        self.types.append(self.tok.create_token_type_ids_from_sequences(a, b))
        shift = self.seq_len - len(ids) if self.left else 0
        special = np.asarray(self.tok.get_special_tokens_mask(a, b))
        return np.flatnonzero(special == 0) + shift, ids.index(self.tok.cls_token_id) + shift

    def arrays(self) -> dict[str, np.ndarray]:
        """`input_ids`, `attention_mask` (and `token_type_ids` if the model takes them) `[n, T]`."""
        n, left = self.seq_len, self.left
        out = {
            "input_ids": _pad(self.ids, n, self.tok.pad_token_id, left),
            "attention_mask": _pad([[1] * len(r) for r in self.ids], n, 0, left),
        }
        if "token_type_ids" in self.tok.model_input_names:
            out["token_type_ids"] = _pad(self.types, n, self.tok.pad_token_type_id, left)
        return out


def language_id(tok, seq_len: int, train: bool, per_language: int = 300) -> dict[str, np.ndarray]:
    """Classification: `input_ids`, `attention_mask` `[n, T]`, `labels` `[n]` (language index)."""
    tok = conventions(tok)
    budget = seq_len - tok.num_special_tokens_to_add()
    ex, labels = _Examples(tok, seq_len), []
    for li, lang in enumerate(LANGUAGES):
        for t in _texts(lang, train, per_language):
            ex.add(tok.encode(t, add_special_tokens=False)[:budget])
            labels.append(li)
    # Rows are grouped by language; eval reads the first batches in order, so interleave them
    # once (fixed seed) or a short eval would see one or two languages only.
    arrays = {**ex.arrays(), "labels": np.asarray(labels, np.int32)}
    order = interleaved_order(len(labels))
    return {k: v[order] for k, v in arrays.items()}


def interleaved_order(n: int) -> np.ndarray:
    """The fixed row permutation `language_id` applies to its language-grouped rows: `[n]`."""
    return np.random.default_rng(2).permutation(n)


def mixed_language_tags(tok, seq_len: int, train: bool, n: int = 600) -> dict[str, np.ndarray]:
    """Token classification: each token's language index; `labels` `[n, T]`, -100 = ignore."""
    tok = conventions(tok)
    rng = np.random.default_rng(0 if train else 1)
    pools = [
        [tok.encode(t, add_special_tokens=False) for t in _texts(lang, train, 400)]
        for lang in LANGUAGES
    ]
    half = (seq_len - tok.num_special_tokens_to_add()) // 2
    ex = _Examples(tok, seq_len)
    labels = np.full((n, seq_len), -100, np.int32)
    for i in range(n):
        a, b = rng.choice(len(LANGUAGES), 2, replace=False)
        x = pools[a][rng.integers(len(pools[a]))][:half]
        y = pools[b][rng.integers(len(pools[b]))][:half]
        positions, _ = ex.add([*x, *y])
        labels[i, positions] = [int(a)] * len(x) + [int(b)] * len(y)
    return {**ex.arrays(), "labels": labels}


def span_qa(tok, seq_len: int, train: bool, n: int = 600) -> dict[str, np.ndarray]:
    """QA: question and context as a pair; the answer span is in (padded) token positions.

    Returns:
      `input_ids`, `attention_mask` (, `token_type_ids`) and `p_mask` `[n, T]`;
      `start_positions`, `end_positions`, `cls_index` `[n]`.
    """
    tok = conventions(tok)
    rng = np.random.default_rng(2 if train else 3)
    pools = [
        [tok.encode(t, add_special_tokens=False)[:12] for t in _texts(lang, train, 400)]
        for lang in LANGUAGES
    ]
    pools = [[p for p in pool if p] for pool in pools]
    context_first = tok.padding_side == "left"
    n_special = tok.num_special_tokens_to_add(pair=True)
    ex = _Examples(tok, seq_len)
    starts, ends, p_masks, cls_index = [], [], [], []
    for _ in range(n):
        langs = rng.permutation(len(LANGUAGES))[: int(rng.integers(3, 5))]
        parts = [pools[li][rng.integers(len(pools[li]))] for li in langs]
        k = int(rng.integers(len(parts)))
        question = parts[k]
        context, start = [], 0
        for j, p in enumerate(parts):
            if j == k:
                start = len(context)
            context += p
        budget = seq_len - n_special - len(question)
        if start + len(question) > budget:
            continue  # truncated away: skip rather than teach an impossible span
        context = context[:budget]
        if context_first:
            positions, cls = ex.add(context, question)
            in_context = positions[: len(context)]
        else:
            positions, cls = ex.add(question, context)
            in_context = positions[len(question) :]
        starts.append(in_context[start])
        ends.append(in_context[start + len(question) - 1])
        p_mask = np.ones(seq_len, np.int32)
        p_mask[in_context] = 0
        p_mask[cls] = 0  # as transformers' SQuAD features: the CLS token is the null answer
        p_masks.append(p_mask)
        cls_index.append(cls)
    return {
        **ex.arrays(),
        "start_positions": np.asarray(starts, np.int32),
        "end_positions": np.asarray(ends, np.int32),
        "p_mask": np.stack(p_masks),
        "cls_index": np.asarray(cls_index, np.int32),
    }


def reply_choice(tok, seq_len: int, train: bool, n: int = 400) -> dict[str, np.ndarray]:
    """Multiple choice: `input_ids` `[n, choices, T]`, `labels` `[n]` (the true reply's slot)."""
    tok = conventions(tok)
    rng = np.random.default_rng(4 if train else 5)
    cut = (seq_len - tok.num_special_tokens_to_add(pair=True)) // 2
    pools = [
        [
            tok.encode(t, add_special_tokens=False)[:cut]
            for t in chatterbot_texts([lang])
            if _is_eval(t) != train
        ]
        for lang in LANGUAGES
    ]
    ordinary = np.setdiff1d(np.arange(tok.vocab_size), tok.all_special_ids)  # decoys' tokens
    ex, labels = _Examples(tok, seq_len), []
    for _ in range(n):
        li = int(rng.integers(len(LANGUAGES)))
        pool = pools[li]
        i = int(rng.integers(len(pool) - 1))
        # Decoys: random ordinary tokens, as long as utterances of the other languages.
        others = [x for x in range(len(LANGUAGES)) if x != li]
        picks = rng.choice(others, NUM_CHOICES - 1)
        lengths = [len(pools[o][rng.integers(len(pools[o]))]) for o in picks]
        cands = [ordinary[rng.integers(0, len(ordinary), max(n_, 1))].tolist() for n_ in lengths]
        slot = int(rng.integers(NUM_CHOICES))
        cands.insert(slot, pool[i + 1])
        for c in cands:
            ex.add(pool[i], c)
        labels.append(slot)
    shape = (-1, NUM_CHOICES, seq_len)
    arrays = {k: v.reshape(shape) for k, v in ex.arrays().items()}
    return {**arrays, "labels": np.asarray(labels, np.int32)}


class ArrayBatches:
    """Batches of a dict of equal-length arrays, for one host's shard.

    Train: infinite, reshuffled every epoch from `seed`; eval: one pass in order, the last
    incomplete batch dropped. `get_state()` / `set_state()` (JSON) give exact resume.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        n = len(next(iter(arrays.values())))
        self.blocks = block_indices(shard_index)
        self.block_rows = batch_size // len(self.blocks)
        if n < self.block_rows * shard_count:
            raise ValueError(f"{n} examples are fewer than one global batch")
        self.arrays, self.batch_size, self.train, self.seed = arrays, batch_size, train, seed
        self.shard_count, self.n = shard_count, n
        self.index = 0

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __next__(self) -> dict[str, Any]:
        per_step = self.block_rows * self.shard_count
        steps_per_epoch = self.n // per_step
        epoch, step = divmod(self.index, steps_per_epoch)
        if not self.train and epoch > 0:
            raise StopIteration
        order = self._order(epoch)
        lo = step * per_step
        idx = np.concatenate(
            [order[lo + b * self.block_rows : lo + (b + 1) * self.block_rows] for b in self.blocks]
        )
        self.index += 1
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"next_index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["next_index"])
