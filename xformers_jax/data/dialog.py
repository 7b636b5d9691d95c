"""Dialog replies from the bundled chatterbot corpus: prompt -> reply pairs for seq2seq training.

Every conversation of `chatterbot-corpus` (a YAML file's `conversations:` list of utterance lists)
gives one pair per consecutive pair of utterances: `(u[i], u[i+1])`. The split is by a hash of the
prompt (~10% eval), so a prompt and all its replies fall on the same side and the split does not
move when other languages are added. `encode_pairs` lays a pair out the T5 way at fixed lengths:
encoder `prompt </s>`, labels `reply </s>` (-100 padding) and decoder inputs the labels shifted
right behind the start token; `dialog_dataset` batches them through grain (exact resume).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import yaml

from xformers_jax.data.collators import IGNORE_INDEX
from xformers_jax.data.corpus import DataError, chatterbot_languages
from xformers_jax.data.pipeline import global_batch_rows, iterate, sharded_stream

_EVAL_BUCKETS = 10  # one prompt hash bucket in ten is held out
SPLITS = ("train", "eval", "all")


@dataclasses.dataclass(frozen=True)
class DialogPair:
    """One turn of a conversation: `reply` answers `prompt`; `language` is the corpus dir name."""

    prompt: str
    reply: str
    language: str


def _clean(item: Any) -> str:
    # One utterance per example: fold newlines and runs of blanks into single spaces.
    return "" if item is None else " ".join(str(item).split())


@functools.lru_cache(maxsize=8)
def _load_pairs(languages: tuple[str, ...]) -> tuple[DialogPair, ...]:
    import chatterbot_corpus

    root = Path(chatterbot_corpus.__file__).parent / "data"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    pairs = []
    for lang in languages:
        for path in sorted((root / lang).glob("*.yml")):
            try:
                with open(path, encoding="utf-8") as f:
                    doc = yaml.load(f, Loader=loader)
            except yaml.YAMLError as e:
                raise DataError(f"{path}: not valid YAML ({e})") from None
            convs = doc.get("conversations") if isinstance(doc, dict) else None
            for conv in convs or []:
                # A few files hold a bare string where a list of turns is expected: no reply.
                turns = [_clean(t) for t in conv] if isinstance(conv, list) else []
                turns = [t for t in turns if t]
                pairs.extend(DialogPair(a, b, lang) for a, b in zip(turns, turns[1:]))
    return tuple(pairs)


def is_eval_prompt(prompt: str) -> bool:
    """Whether the pairs of `prompt` belong to the eval split (a content hash, ~10%)."""
    return zlib.crc32(prompt.encode("utf-8")) % _EVAL_BUCKETS == 0


def dialog_pairs(languages: Sequence[str] | None = None, split: str = "all") -> list[DialogPair]:
    """Prompt -> reply pairs of the installed chatterbot corpus, in a deterministic order.

    Args:
      languages: corpus language names (`"english"`, `"japanese"`, ...); all 28 by default.
      split: `"train"`, `"eval"` (prompts whose hash falls in the held-out bucket) or `"all"`.

    Returns:
      Pairs ordered by language (as given), file path, conversation and turn.

    Raises:
      ValueError: an unknown language or split.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    available = chatterbot_languages()
    if isinstance(languages, str):
        languages = [languages]
    languages = available if languages is None else list(languages)
    unknown = sorted(set(languages) - set(available))
    if unknown:
        raise ValueError(f"languages: unknown {unknown}; available: {', '.join(available)}")
    pairs = _load_pairs(tuple(languages))
    if split == "all":
        return list(pairs)
    held_out = split == "eval"
    return [p for p in pairs if is_eval_prompt(p.prompt) == held_out]


def read_pairs(pattern: str | os.PathLike) -> list[DialogPair]:
    """Pairs from UTF-8 files of `prompt<TAB>reply` lines (blank lines skipped).

    `pattern` is a path, a glob (`**` recursive) or a gs:// URL; a name ending in `.gz` or `.zst`
    is decompressed while it streams. A pair's `language` is its file's name up to the first dot.

    Raises:
      DataError: no file matches, a file is unreadable, binary or not UTF-8, has no pair, or a
        line has no tab or an empty side; the message names the file and line.
    """
    from xformers_jax.data import sources

    pairs = []
    for path in sources.match_files(pattern):
        before, language = len(pairs), path.rsplit("/", 1)[-1].split(".")[0]
        for number, line in sources.iter_lines(path):
            if not line.strip():
                continue
            prompt, tab, reply = line.partition("\t")
            prompt, reply = _clean(prompt), _clean(reply)
            if not (tab and prompt and reply):
                raise DataError(f"{path}:{number}: expected 'prompt<TAB>reply', got {line[:60]!r}")
            pairs.append(DialogPair(prompt, reply, language))
        if len(pairs) == before:
            raise DataError(f"{path}: no 'prompt<TAB>reply' line (the file is empty)")
    return pairs


def encode_prompts(
    prompts: Sequence[str], tokenizer: Any, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder inputs `prompt </s>` cut and right-padded to `length`.

    Args:
      prompts: `batch` strings.
      tokenizer: a `T5Tokenizer` or `SentencePieceTokenizer` (`encode_many`, `pad_id`, `eos_id`).
      length: encoder length `n` (the EOS always fits: long prompts lose their tail).

    Returns:
      `(input_ids, attention_mask)`, int32 `[batch, n]`.
    """
    ids = np.full((len(prompts), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, row in enumerate(tokenizer.encode_many(list(prompts), add_special_tokens=False)):
        row = [*row[: length - 1], tokenizer.eos_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def encode_pairs(
    pairs: Sequence[DialogPair],
    tokenizer: Any,
    *,
    inputs_length: int,
    targets_length: int,
    decoder_start_token_id: int,
) -> dict[str, np.ndarray]:
    """Fixed-length seq2seq arrays of the pairs (teacher forcing).

    Args:
      pairs: `N` pairs.
      tokenizer: a `T5Tokenizer` or `SentencePieceTokenizer`.
      inputs_length: encoder length `n`; `targets_length`: decoder length `m`. Both keep the EOS
        when they cut a long utterance.
      decoder_start_token_id: the first decoder input (T5: `<pad>`).

    Returns:
      int32 `input_ids`, `attention_mask` `[N, n]`; `decoder_input_ids` and `labels` `[N, m]`
      (labels -100 past the reply's EOS, decoder inputs `pad_id` there).
    """
    if inputs_length < 2 or targets_length < 2:
        raise ValueError(f"lengths must be >= 2, got {inputs_length} and {targets_length}")
    input_ids, attention_mask = encode_prompts([p.prompt for p in pairs], tokenizer, inputs_length)
    labels = np.full((len(pairs), targets_length), IGNORE_INDEX, np.int32)
    replies = tokenizer.encode_many([p.reply for p in pairs], add_special_tokens=False)
    for i, row in enumerate(replies):
        row = [*row[: targets_length - 1], tokenizer.eos_id]
        labels[i, : len(row)] = row
    shifted = np.where(labels[:, :-1] < 0, tokenizer.pad_id, labels[:, :-1])
    start = np.full((len(pairs), 1), decoder_start_token_id, np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": np.concatenate([start, shifted], axis=1).astype(np.int32),
        "labels": labels,
    }


def dialog_dataset(
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Batches of `encode_pairs` arrays for one host.

    Train: shuffled and repeated forever; eval: one pass, wrapped around to whole batches on every
    host. The iterator's `get_state()` / `set_state()` resume exactly.

    Args:
      arrays: `encode_pairs`' output (`N` rows each).
      batch_size: rows per batch for this shard.
      seed: shuffle seed.
      shard_index / shard_count: this host's slice of every global batch.

    Returns:
      A `grain.IterDataset` of dicts of int32 `[batch_size, ...]` arrays.
    """
    n = len(next(iter(arrays.values())))
    per_step = global_batch_rows(batch_size, shard_index, shard_count)
    if n < per_step and train:
        raise DataError(f"{n} dialog pairs, fewer than one global batch ({per_step})")
    if not train:
        # Whole batches on every host, so the eval step always sees full shapes.
        n = -(-n // per_step) * per_step
    rows = np.resize(np.arange(len(next(iter(arrays.values())))), n)
    ds = sharded_stream(
        rows,
        lambda i: {k: v[i] for k, v in arrays.items()},
        seed=seed,
        train=train,
        shard_index=shard_index,
        shard_count=shard_count,
        batch_size=batch_size,
        random=False,
    )
    return iterate(ds)
