"""SentencePiece tokenizers with the XLM-R / fairseq special-id layout.

Every id this module hands out uses fairseq's layout, the one XLM-R checkpoints are trained with:
`<s>`=0 (cls/bos), `<pad>`=1, `</s>`=2 (sep/eos), `<unk>`=3, then the pieces, and `<mask>`.
Two on-disk conventions reach that layout:

* `"native"`: a model trained by `SentencePieceTokenizer.train`, whose spm ids already are the
  layout (`<mask>` is a user-defined piece, id 4), so ids pass through unchanged.
* `"xlm-roberta"`: an HF `sentencepiece.bpe.model` with spm's default ids (`<unk>`=0, `<s>`=1,
  `</s>`=2), mapped exactly as `transformers.XLMRobertaTokenizer` maps it: every spm id + 1
  (the fairseq offset), spm's `<unk>` (0) -> 3, the four specials pinned, `<mask>` = spm size + 1.

Text is split on the literal special-token strings first, as HF's slow tokenizer does (with its
`lstrip=True` on `<mask>`), so `"Paris is the <mask> of France."` gives the same ids as HF.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from xformers_jax import paths
from xformers_jax.data.corpus import DataError, read_lines

CONVENTIONS = ("native", "xlm-roberta")

# fairseq's dictionary puts these four first, in this order, for every XLM-R checkpoint.
BOS_PIECE, PAD_PIECE, EOS_PIECE, UNK_PIECE, MASK_PIECE = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
_FAIRSEQ_SPECIALS = {BOS_PIECE: 0, PAD_PIECE: 1, EOS_PIECE: 2, UNK_PIECE: 3}
# HF's XLMRobertaTokenizer: spm id i -> i + 1 (spm has no <pad>, fairseq has one extra slot).
_FAIRSEQ_OFFSET = 1
# The literal strings HF's slow tokenizer splits text on (none is a prefix of another).
_SPECIAL_RE = re.compile(
    "|".join(re.escape(p) for p in (BOS_PIECE, PAD_PIECE, EOS_PIECE, UNK_PIECE, MASK_PIECE))
)


def _iter_training_lines(texts: Iterable[str | os.PathLike], files: Sequence) -> Iterator[str]:
    for item in texts:
        if isinstance(item, os.PathLike):
            yield from read_lines(item)
        else:
            # spm treats each iterator item as one sentence: split documents into lines.
            yield from (s for s in (line.strip() for line in str(item).split("\n")) if s)
    for path in files:
        yield from read_lines(path)


def train_spm(
    lines: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    specials: dict[str, Any],
    *,
    model_type: str,
    character_coverage: float,
    input_sentence_size: int,
    num_threads: int,
    seed: int | None,
    **trainer_kwargs,
) -> None:
    """Trains a sentencepiece model into `<out_prefix>.model` (and spm's `.vocab`).

    Args:
      lines: the training sentences, one an item.
      specials: the layout's special ids and pieces (spm options such as `pad_id`, `pad_piece`).
      vocab_size: a soft limit (`hard_vocab_limit=False`), so tiny corpora still train.
      seed: if given, seeds spm's (process-wide) sentence sampling and shuffling.
      trainer_kwargs: any other `spm.SentencePieceTrainer` option.

    Raises:
      ValueError: spm refused (its message says what to change), naming the model.
    """
    with paths.local_prefix(out_prefix) as local, GuardedLines(lines) as guarded:
        _train_spm_local(guarded, local, vocab_size, specials, model_type=model_type,
                         character_coverage=character_coverage,
                         input_sentence_size=input_sentence_size, num_threads=num_threads,
                         seed=seed, **trainer_kwargs)  # fmt: skip


class GuardedLines:
    """Training sentences for spm, which reads them from C++ and reports a Python exception
    there as an opaque INTERNAL error: an error of the source (a `DataError` naming the file and
    line) ends the iteration instead, and leaving the `with` block raises it again, in place of
    whatever spm then said."""

    def __init__(self, lines: Iterable[str]):
        self._lines, self.error = iter(lines), None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._lines)
        except StopIteration:
            raise
        except Exception as e:  # re-raised by `reraise`, unchanged
            self.error = e
            raise StopIteration from None

    def __enter__(self) -> GuardedLines:
        return self

    def __exit__(self, *exc) -> None:
        if self.error is not None:
            raise self.error


def _train_spm_local(lines, out_prefix, vocab_size, specials, *, model_type, character_coverage,
                     input_sentence_size, num_threads, seed, **trainer_kwargs) -> None:  # fmt: skip
    options = dict(
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        hard_vocab_limit=False,
        **specials,
        # spm logs every training step at INFO to stderr; keep warnings and errors only.
        minloglevel=2,
    )
    options.update(trainer_kwargs)
    if seed is not None:
        # spm has no per-call seed option, only this process-wide one.
        spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, **options)
    except RuntimeError as e:
        # spm's message says what to change (e.g. vocab_size below the distinct characters
        # that character_coverage must keep); add which model it was about.
        raise ValueError(f"sentencepiece training for {out_prefix}.model failed: {e}") from None


class SentencePieceTokenizer:
    """A sentencepiece model behind fairseq/XLM-R ids.

    Construct with `SentencePieceTokenizer.load(path, convention=...)` or `.train(...)`.

    Attributes:
        path: the `.model` file this tokenizer was loaded from.
        convention: `"native"` or `"xlm-roberta"` (see the module docstring).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, *, path: str, convention: str):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
        self._sp = processor
        self.path = path
        self.convention = convention
        n = processor.get_piece_size()
        if convention == "native":
            layout = {
                BOS_PIECE: processor.bos_id(),
                PAD_PIECE: processor.pad_id(),
                EOS_PIECE: processor.eos_id(),
                UNK_PIECE: processor.unk_id(),
            }
            if (
                layout != _FAIRSEQ_SPECIALS
                or processor.piece_to_id(MASK_PIECE) == layout[UNK_PIECE]
            ):
                raise DataError(
                    f"{path}: not a native model (special ids {layout}, expected "
                    f"{_FAIRSEQ_SPECIALS} and a {MASK_PIECE} piece); for an HF XLM-R "
                    "sentencepiece.bpe.model use convention='xlm-roberta'"
                )
            self._offset = 0
            self._vocab_size = n
            self._mask_id = processor.piece_to_id(MASK_PIECE)
        else:
            if processor.unk_id() != 0:
                raise DataError(
                    f"{path}: not an XLM-R spm model (its <unk> id is {processor.unk_id()}, "
                    "expected 0); for a model trained by SentencePieceTokenizer.train use "
                    "convention='native'"
                )
            self._offset = _FAIRSEQ_OFFSET
            self._mask_id = n + _FAIRSEQ_OFFSET
            self._vocab_size = n + _FAIRSEQ_OFFSET + 1
        self._piece_to_special = {**_FAIRSEQ_SPECIALS, MASK_PIECE: self._mask_id}
        self._special_to_piece = {v: k for k, v in self._piece_to_special.items()}
        self._special_ids = frozenset(self._piece_to_special.values())

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: str | os.PathLike, convention: str = "native") -> SentencePieceTokenizer:
        """Loads a `.model` file.

        Args:
            path: the sentencepiece model file.
            convention: `"native"` (trained by `train`) or `"xlm-roberta"` (HF's
                `sentencepiece.bpe.model` of XLM-R / XLM-V; ids equal `XLMRobertaTokenizer`'s).

        Raises:
            FileNotFoundError: no such file.
            DataError: the file is not a sentencepiece model, or its special ids do not fit the
                convention.
        """
        path = paths.resolve(path)
        if not paths.isfile(path):
            raise FileNotFoundError(f"{path}: sentencepiece model file not found")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(paths.read_bytes(path))
        except (RuntimeError, OSError, TypeError) as e:
            raise DataError(f"{path}: not a valid sentencepiece model ({e})") from None
        if processor.get_piece_size() == 0:
            raise DataError(f"{path}: not a valid sentencepiece model (no pieces)")
        return cls(processor, path=path, convention=convention)

    @classmethod
    def train(
        cls,
        texts: Iterable[str | os.PathLike] | None,
        out_prefix: str | os.PathLike,
        vocab_size: int,
        *,
        files: Sequence[str | os.PathLike] = (),
        model_type: str = "unigram",
        character_coverage: float = 0.9995,
        input_sentence_size: int = 2_000_000,
        num_threads: int = 2,
        seed: int | None = None,
        **trainer_kwargs,
    ) -> SentencePieceTokenizer:
        """Trains a sentencepiece model with the fairseq special ids built in; writes `.model`.

        Args:
            texts: strings (documents are split into lines) and/or `pathlib.Path`s of UTF-8 text
                files (read with `read_lines`). May be None when `files` is given.
            out_prefix: writes `<out_prefix>.model` (and spm's `<out_prefix>.vocab`).
            vocab_size: target size; a soft limit (`hard_vocab_limit=False`) so tiny corpora
                still train, i.e. the result may be smaller.
            files: text file paths given as plain strings.
            model_type: spm model type, `"unigram"` (XLM-R's) by default.
            character_coverage: fraction of characters covered by pieces; the rest map to `<unk>`.
            input_sentence_size: at most this many sentences are sampled (shuffled) for training.
            num_threads: trainer threads.
            seed: if given, seeds spm's (process-wide) sentence sampling and shuffling.
            **trainer_kwargs: any other `spm.SentencePieceTrainer` option.

        Returns:
            The trained tokenizer, loaded with `convention="native"`.
        """
        if vocab_size < 6:
            raise ValueError(f"vocab_size: must be >= 6 (5 special pieces + 1), got {vocab_size}")
        lines = _iter_training_lines(texts or (), files)
        # The fairseq layout: <s>=0, <pad>=1, </s>=2, <unk>=3, then the pieces, <mask> last.
        specials = dict(
            bos_id=0,
            pad_id=1,
            eos_id=2,
            unk_id=3,
            bos_piece=BOS_PIECE,
            pad_piece=PAD_PIECE,
            eos_piece=EOS_PIECE,
            unk_piece=UNK_PIECE,
            user_defined_symbols=[MASK_PIECE],
        )
        train_spm(
            lines,
            out_prefix,
            vocab_size,
            specials,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            num_threads=num_threads,
            seed=seed,
            **trainer_kwargs,
        )
        return cls.load(f"{out_prefix}.model", convention="native")

    def __getstate__(self) -> dict:
        # Ship the serialized model, not the C++ processor (grain worker processes, cloudpickle).
        return {
            "proto": self._sp.serialized_model_proto(),
            "path": self.path,
            "convention": self.convention,
        }

    def __setstate__(self, state: dict) -> None:
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(state["proto"])
        self.__init__(processor, path=state["path"], convention=state["convention"])

    # ------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids (the embedding table's minimum size), `<mask>` included."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return _FAIRSEQ_SPECIALS[PAD_PIECE]

    @property
    def bos_id(self) -> int:
        """`<s>`, also the cls token."""
        return _FAIRSEQ_SPECIALS[BOS_PIECE]

    @property
    def eos_id(self) -> int:
        """`</s>`, also the sep token."""
        return _FAIRSEQ_SPECIALS[EOS_PIECE]

    @property
    def unk_id(self) -> int:
        return _FAIRSEQ_SPECIALS[UNK_PIECE]

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def special_ids(self) -> frozenset[int]:
        """`{bos, pad, eos, unk, mask}` ids: never masked, dropped by `decode` by default."""
        return self._special_ids

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer({self.path!r}, convention={self.convention!r}, "
            f"vocab_size={self.vocab_size})"
        )

    # --------------------------------------------------------------------------------- encoding

    def _spm_to_ids(self, spm_ids: list[int]) -> list[int]:
        if not self._offset:
            return spm_ids
        # spm's <unk> is 0; shifting it would land on <pad>, so HF sends it to fairseq's <unk>.
        unk = self.unk_id
        return [i + self._offset if i else unk for i in spm_ids]

    def _chunks(self, text: str) -> list[str | int]:
        """Splits on special-token strings (HF's added-token split): text chunks and ids."""
        if "<" not in text:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            left = text[pos : m.start()]
            if m.group() == MASK_PIECE:
                # HF adds <mask> with lstrip=True: it swallows the blanks before it.
                left = left.rstrip()
            out.extend([left, self._piece_to_special[m.group()]])
            pos = m.end()
        out.append(text[pos:])
        return out

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [self._spm_to_ids(ids) for ids in self._sp.encode(texts)]

    def encode_many(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """Ids of many texts (batched through spm, no padding).

        Args:
            texts: strings.
            add_special_tokens: wrap each as `<s> ... </s>`.

        Returns:
            One list of ids per text (ragged).
        """
        texts = [str(t) for t in texts]
        chunked = [self._chunks(t) for t in texts]
        # spm's batched encode is much faster than one call per text for corpus tokenisation.
        plain = [c for chunks in chunked for c in chunks if isinstance(c, str) and c]
        encoded = iter(self._encode_plain(plain))
        out = []
        for chunks in chunked:
            ids: list[int] = []
            for c in chunks:
                if isinstance(c, int):
                    ids.append(c)
                elif c:
                    ids.extend(next(encoded))
            out.append([self.bos_id, *ids, self.eos_id] if add_special_tokens else ids)
        return out

    def encode(
        self, text: str, text_pair: str | None = None, add_special_tokens: bool = True
    ) -> list[int]:
        """Ids of one text (or a pair) as the model sees them.

        Args:
            text: the string.
            text_pair: optional second segment (classification / QA pairs).
            add_special_tokens: `<s> A </s>` or `<s> A </s></s> B </s>` (XLM-R's pair format).

        Returns:
            A list of int ids.
        """
        a = self.encode_many([text])[0]
        b = None if text_pair is None else self.encode_many([text_pair])[0]
        return self._with_specials(a, b) if add_special_tokens else a + (b or [])

    def _with_specials(self, a: list[int], b: list[int] | None) -> list[int]:
        if b is None:
            return [self.bos_id, *a, self.eos_id]
        return [self.bos_id, *a, self.eos_id, self.eos_id, *b, self.eos_id]

    @staticmethod
    def _truncate_pair(a: list[int], b: list[int] | None, remove: int):
        """HF's `longest_first` truncation (same token counts removed from the same ends)."""
        if remove <= 0:
            return a, b
        if b is None:
            return a[: max(len(a) - remove, 0)], None
        first = min(abs(len(b) - len(a)), remove)
        second = remove - first
        if len(a) > len(b):
            cut_a, cut_b = first + second // 2, second - second // 2
        else:
            cut_a, cut_b = second // 2, first + second - second // 2
        return a[: len(a) - cut_a], b[: len(b) - cut_b]

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int,
        padding: bool | str = True,
        truncation: bool = True,
        text_pairs: Sequence[str] | None = None,
    ) -> dict:
        """Encodes a batch with specials, truncated and right-padded for a jitted model.

        Args:
            texts: `batch` strings.
            max_length: the longest allowed row, specials included.
            padding: `True` / `"max_length"` pads every row to `max_length` (fixed shapes, one
                compilation); `"longest"` pads to the longest row; `False` returns ragged lists.
            truncation: cut rows to `max_length` keeping the specials (pairs: HF's
                `longest_first`); `False` raises if a row is too long.
            text_pairs: optional second segments, one per text.

        Returns:
            `{"input_ids": int32 [batch, length], "attention_mask": int32 [batch, length]}`
            (1 = real token), or lists of lists when `padding=False`.
        """
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2 (room for <s> and </s>), got {max_length}")
        if padding not in (True, False, "max_length", "longest"):
            raise ValueError(
                f"padding: expected True, False, 'max_length' or 'longest', got {padding!r}"
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        firsts = self.encode_many(texts)
        if text_pairs is None:
            seconds: list = [None] * len(firsts)
        else:
            if len(text_pairs) != len(texts):
                raise ValueError(f"text_pairs: {len(text_pairs)} pairs for {len(texts)} texts")
            seconds = self.encode_many(list(text_pairs))
        rows = []
        for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
            n_special = 2 if b is None else 4
            too_long = len(a) + len(b or []) + n_special - max_length
            if too_long > 0 and not truncation:
                raise ValueError(
                    f"texts[{i}]: {too_long + max_length} tokens > max_length {max_length} "
                    "and truncation=False"
                )
            if too_long > 0 and max_length < n_special + (b is not None):
                raise ValueError(f"max_length: {max_length} leaves no room for text in a pair")
            rows.append(self._with_specials(*self._truncate_pair(a, b, too_long)))
        if padding is False:
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        length = max_length if padding in (True, "max_length") else max(map(len, rows), default=0)
        input_ids = np.full((len(rows), length), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), length), dtype=np.int32)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # --------------------------------------------------------------------------------- decoding

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self._vocab_size:
            raise ValueError(f"id {i} out of range for vocab_size {self._vocab_size} ({self.path})")

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` (specials by their fairseq names)."""
        i = int(i)
        self._check_id(i)
        if i in self._special_to_piece:
            return self._special_to_piece[i]
        return self._sp.id_to_piece(i - self._offset)

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece string; unknown pieces give `unk_id`."""
        if piece in self._piece_to_special:
            return self._piece_to_special[piece]
        spm_id = self._sp.piece_to_id(piece)
        return self._spm_to_ids([spm_id])[0]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (`[length]`; -100 and other negatives are ignored).

        Args:
            ids: ids as a list or 1-d array.
            skip_special_tokens: drop `<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`; otherwise they
                appear by name.
        """
        parts: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                text = self._sp.decode([j - self._offset for j in run])
                # spm drops the word-boundary blank at the start of a decode; after a special
                # token it separates words, so put it back.
                if parts and self.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run.clear()

        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i < 0:  # label padding (-100) when decoding targets
                continue
            self._check_id(i)
            if i not in self._special_ids:
                run.append(i)
            elif not skip_special_tokens:
                flush()
                parts.append(self._special_to_piece[i])
        flush()
        # Like HF's convert_tokens_to_string: no leading/trailing word-boundary blanks.
        return "".join(parts).strip()
