"""The T5 / mT5 tokenizer: sentencepiece with T5's conventions, ids equal to transformers'.

Conventions (those of `transformers.T5Tokenizer` / `MT5Tokenizer`, the slow sentencepiece ones):

* ids are the spm model's own ids, with T5's specials as spm defines them: `<pad>`=0, `</s>`=1,
  `<unk>`=2 and no `<s>` (`train` builds a model with exactly that layout).
* `extra_ids` sentinels `<extra_id_0>` ... `<extra_id_{E-1}>` sit on top of the spm pieces, counted
  down from the end: `<extra_id_i>` = `len(tokenizer) - 1 - i` with `len = spm pieces + E` (T5's
  span-corruption sentinels). In text they are recognised whole and eat the blanks around them.
  The literal strings `<pad>`, `</s>` and `<unk>` are recognised too.
* every sequence ends with `</s>` (not added again when it already does): `A </s>` and
  `A </s> B </s>`. No `<s>`, no token types; padding (id 0) goes on the right.
* `legacy=True` (transformers' default) runs each text chunk through spm as it is (the dummy
  prefix adds a word boundary after every special token); `legacy=False` is transformers' newer
  rule (a chunk after a special token gets no word boundary unless it starts with a blank).

`vocab_size` is the spm piece count, as `transformers.T5Tokenizer.vocab_size`; `len(tokenizer)`
counts the sentinels as well (the smallest model vocabulary that fits every id). mT5's released
`spiece.model` already holds 250100 pieces and its tokenizer dir says `extra_ids: 0`: sentinel `i`
is then piece `250099 - i`, which `sentinel_id` gives in both cases.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from xformers_jax import paths
from xformers_jax.data.corpus import DataError
from xformers_jax.data.tokenizer import train_spm

SPIECE = "spiece.model"
UNDERLINE = "\u2581"  # sentencepiece's word-boundary mark
PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"
T5_SPECIALS = {PAD_PIECE: 0, EOS_PIECE: 1, UNK_PIECE: 2}
DEFAULT_EXTRA_IDS = 100
# transformers' `clean_up_tokenization`: blanks a word-level tokenizer would have put before
# punctuation and English contractions.
_CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def sentinel_piece(i: int) -> str:
    """The text of sentinel `i`: `<extra_id_i>`."""
    return f"<extra_id_{i}>"


def _read_proto(path: str) -> bytes:
    proto = paths.read_bytes(path)
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"{path}: not a valid sentencepiece model ({e})") from None
    if processor.get_piece_size() == 0:
        raise DataError(f"{path}: not a valid sentencepiece model (no pieces)")
    return proto


def _resolve(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(`.model` file, the tokenizer dir's saved settings) of a dir or a model file."""
    path = paths.path(path)
    if path.is_dir():
        model = path / SPIECE
        if not model.is_file():
            raise FileNotFoundError(
                f"{path}: no {SPIECE} (an HF T5/MT5 tokenizer dir needs the sentencepiece "
                "model; tokenizer.json alone is not read)"
            )
        config = path / "tokenizer_config.json"
        saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        return model, saved
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sentencepiece model file not found")
    return path, {}


def is_t5_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a T5-layout tokenizer: an HF tokenizer dir holding `spiece.model`, or a
    `.model` whose spm ids are `<pad>`=0, `</s>`=1, `<unk>`=2 (the fairseq layout of
    `SentencePieceTokenizer` has `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3)."""
    path = paths.path(path)
    if path.is_dir():
        path = path / SPIECE  # XLNet dirs have one too: its ids tell them apart
    if not path.is_file():
        return False
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, TypeError):
        return False
    return (processor.pad_id(), processor.eos_id(), processor.unk_id()) == (0, 1, 2)


class T5Tokenizer:
    """A T5 / mT5 sentencepiece model with transformers' ids (see the module docstring).

    Construct with `T5Tokenizer.load(path)` (an HF tokenizer dir or a `.model` file) or
    `T5Tokenizer.train(texts, prefix, vocab_size)`.

    Attributes:
      path: the `.model` file.
      extra_ids: number of `<extra_id_i>` sentinels on top of the spm pieces.
      legacy: transformers' `legacy` flag (True = its default behaviour).
      add_prefix_space: with `legacy=False`, a word boundary starts the text (transformers' flag).
      clean_up_tokenization_spaces: `decode` drops blanks before punctuation (default False, as
        transformers' T5Tokenizer).
    """

    def __init__(
        self,
        proto: bytes,
        *,
        path: str,
        extra_ids: int = DEFAULT_EXTRA_IDS,
        legacy: bool = True,
        add_prefix_space: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._proto = proto
        self.path = path
        self.extra_ids = int(extra_ids)
        self.legacy = bool(legacy)
        self.add_prefix_space = bool(add_prefix_space)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(proto if legacy else _without_dummy_prefix(proto))
        n = self._sp.get_piece_size()
        layout = {
            PAD_PIECE: self._sp.pad_id(),
            EOS_PIECE: self._sp.eos_id(),
            UNK_PIECE: self._sp.unk_id(),
        }
        if layout != T5_SPECIALS:
            raise DataError(
                f"{path}: not a T5 sentencepiece model (special ids {layout}, expected "
                f"{T5_SPECIALS}); a model trained by SentencePieceTokenizer.train has the "
                "fairseq layout: load it with SentencePieceTokenizer.load"
            )
        if self.extra_ids < 0:
            raise ValueError(f"extra_ids: must be >= 0, got {extra_ids}")
        self._vocab = {self._sp.id_to_piece(i): i for i in range(n)}
        self._added = dict(T5_SPECIALS)
        self._added.update(
            {sentinel_piece(i): n + self.extra_ids - 1 - i for i in range(self.extra_ids)}
        )
        self._added_by_id = {v: k for k, v in self._added.items()}
        self._sentinel_ids = frozenset(range(n, n + self.extra_ids))
        # Longest first: `<extra_id_1>` must not win over `<extra_id_10>`.
        names = sorted(self._added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")
        # legacy=False encodes "<unk>" + chunk and drops the "<unk>" pieces (see `_spm_pieces`).
        self._unk_len = len(self._sp.encode(UNK_PIECE, out_type=str))

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        extra_ids: int | None = None,
        legacy: bool | None = None,
        add_prefix_space: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> T5Tokenizer:
        """From an HF T5/MT5 tokenizer dir (`spiece.model` + `tokenizer_config.json`) or a
        `.model` file.

        Settings not given are read from the dir's `tokenizer_config.json` (`extra_ids`, `legacy`,
        `add_prefix_space`, `clean_up_tokenization_spaces`), else transformers' defaults (100
        sentinels, legacy, prefix space, no clean-up).

        Raises:
          FileNotFoundError: no such file, or a dir without `spiece.model`.
          DataError: not a sentencepiece model, or not T5's special ids.
        """
        model, saved = _resolve(path)
        given = dict(
            extra_ids=extra_ids,
            legacy=legacy,
            add_prefix_space=add_prefix_space,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
        )
        defaults = dict(
            extra_ids=DEFAULT_EXTRA_IDS,
            legacy=True,
            add_prefix_space=True,
            clean_up_tokenization_spaces=False,
        )
        # transformers writes `legacy: null` for "the default", which is legacy.
        kw = {
            k: next(v for v in (given[k], saved.get(k), defaults[k]) if v is not None)
            for k in defaults
        }
        return cls(_read_proto(str(model)), path=str(model), **kw)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        out_prefix: str | os.PathLike,
        vocab_size: int,
        *,
        extra_ids: int = DEFAULT_EXTRA_IDS,
        model_type: str = "unigram",
        character_coverage: float = 0.9995,
        input_sentence_size: int = 2_000_000,
        num_threads: int = 2,
        seed: int | None = None,
        **trainer_kwargs,
    ) -> T5Tokenizer:
        """Trains a sentencepiece model with T5's special ids; writes `<out_prefix>.model`.

        Args:
          texts: strings (documents are split into lines).
          out_prefix: output path prefix (`.model` and spm's `.vocab` are written).
          vocab_size: spm pieces wanted (the sentinels come on top: `len` is `vocab_size +
            extra_ids`); a soft limit, so a tiny corpus gives fewer.
          extra_ids: sentinels of the returned tokenizer.
          model_type / character_coverage / input_sentence_size / num_threads: spm options.
          seed: if given, seeds spm's (process-wide) sentence sampling.
          **trainer_kwargs: any other `spm.SentencePieceTrainer` option.

        Returns:
          The trained tokenizer (legacy behaviour).
        """
        if vocab_size < 4:
            raise ValueError(f"vocab_size: must be >= 4 (3 special pieces + 1), got {vocab_size}")
        # spm treats each iterator item as one sentence: feed lines.
        lines = (s for t in texts for s in (x.strip() for x in str(t).split("\n")) if s)
        # T5's layout: <pad>=0, </s>=1, <unk>=2, no <s>.
        specials = dict(
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece=PAD_PIECE,
            eos_piece=EOS_PIECE,
            unk_piece=UNK_PIECE,
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
        return cls.load(f"{out_prefix}.model", extra_ids=extra_ids, legacy=True)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes an HF tokenizer dir (`spiece.model`, `tokenizer_config.json`,
        `special_tokens_map.json`) that `transformers.T5Tokenizer.from_pretrained` loads."""
        directory = paths.path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPIECE).write_bytes(self._proto)
        sentinels = [sentinel_piece(i) for i in range(self.extra_ids)]
        specials = dict(
            eos_token=EOS_PIECE,
            unk_token=UNK_PIECE,
            pad_token=PAD_PIECE,
            additional_special_tokens=sentinels,
        )
        config = dict(
            specials,
            tokenizer_class="T5Tokenizer",
            extra_ids=self.extra_ids,
            legacy=self.legacy,
            add_prefix_space=self.add_prefix_space,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
        )
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            (directory / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    def __getstate__(self) -> dict:
        # The C++ processor does not pickle (grain workers): ship the serialized model.
        return dict(
            proto=self._proto,
            path=self.path,
            extra_ids=self.extra_ids,
            legacy=self.legacy,
            add_prefix_space=self.add_prefix_space,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
        )

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        self.__init__(state.pop("proto"), **state)

    # ------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """spm pieces (transformers' `T5Tokenizer.vocab_size`); the sentinels come after them."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        """Every id: spm pieces plus sentinels (the smallest model vocabulary that fits)."""
        return self.vocab_size + self.extra_ids

    pad_id = property(
        lambda self: T5_SPECIALS[PAD_PIECE],
        doc="`<pad>` (0), also the decoder start token of T5 models.",
    )
    eos_id = property(lambda self: T5_SPECIALS[EOS_PIECE], doc="`</s>` (1).")
    unk_id = property(lambda self: T5_SPECIALS[UNK_PIECE], doc="`<unk>` (2).")
    pad_token_id, eos_token_id, unk_token_id = pad_id, eos_id, unk_id  # transformers' names

    def sentinel_id(self, i: int) -> int:
        """Id of sentinel `i`: `len(self) - 1 - i` (T5's span-corruption sentinels)."""
        return len(self) - 1 - int(i)

    @property
    def special_ids(self) -> frozenset[int]:
        """`<pad>`, `</s>`, `<unk>` and the sentinels: dropped by `decode(skip_special_tokens)`."""
        return frozenset(self._added_by_id)

    def __repr__(self) -> str:
        return (
            f"T5Tokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"extra_ids={self.extra_ids}, legacy={self.legacy})"
        )

    # --------------------------------------------------------------------------------- encoding

    def _chunks(self, text: str) -> list[str]:
        """Text split around special-token strings (odd indices), sentinels' blanks eaten."""
        parts = self._split_re.split(text)
        for i in range(1, len(parts), 2):
            if parts[i] not in T5_SPECIALS:
                # transformers adds the sentinels with lstrip=True, rstrip=True.
                parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
        return parts

    def _spm_pieces(self, chunks: list[str]) -> list[list[str]]:
        """spm pieces of plain-text chunks, batched (the expensive part of tokenising)."""
        if self.legacy:
            return self._sp.encode(chunks, out_type=str)
        # Without the dummy prefix spm drops a leading blank; transformers keeps it as a word
        # boundary by encoding "<unk>" + chunk and removing the "<unk>" pieces.
        bounded = [c.startswith((UNDERLINE, " ")) for c in chunks]
        pieces = self._sp.encode(
            [UNK_PIECE + c if b else c for c, b in zip(chunks, bounded)], out_type=str
        )
        return [
            p[self._unk_len :] if b and len(p) >= self._unk_len else p
            for p, b in zip(pieces, bounded)
        ]

    def tokenize_many(self, texts: Sequence[str]) -> list[list[str]]:
        """Pieces of many texts (transformers' `tokenize`), special-token strings kept whole."""
        texts = [str(t) for t in texts]
        if not self.legacy:
            # transformers' newer rule: `▁` in the text is a blank, and the text starts a word.
            texts = [t.replace(UNDERLINE, " ") for t in texts]
            texts = [UNDERLINE + t if self.add_prefix_space and t else t for t in texts]
        split = [self._chunks(t) for t in texts]
        plain = [c for parts in split for c in parts[::2] if c]
        encoded = iter(self._spm_pieces(plain))
        out = []
        for parts in split:
            pieces: list[str] = []
            for i, c in enumerate(parts):
                if i % 2:
                    pieces.append(c)
                elif c:
                    pieces.extend(next(encoded))
            if (
                not self.legacy
                and len(pieces) > 1
                and pieces[0] == UNDERLINE
                and pieces[1] in self._added
            ):
                pieces = pieces[1:]  # a lone boundary before a special token is dropped
            out.append(pieces)
        return out

    def tokenize(self, text: str) -> list[str]:
        """Pieces of one text (transformers' `tokenize`)."""
        return self.tokenize_many([text])[0]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Piece strings -> ids; unknown pieces give `unk_id`."""
        unk = self.unk_id
        return [self._added.get(t, self._vocab.get(t, unk)) for t in tokens]

    def encode_many(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """Ids of many texts, batched through spm, no padding.

        Args:
          texts: strings.
          add_special_tokens: end each with `</s>` (unless it already ends with one).

        Returns:
          One list of ids per text (ragged).
        """
        rows = [self.convert_tokens_to_ids(p) for p in self.tokenize_many(texts)]
        return [self._with_eos(r) for r in rows] if add_special_tokens else rows

    def _with_eos(self, ids: list[int]) -> list[int]:
        # transformers does not add `</s>` to a sequence that already ends with it.
        return ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id]

    def _build(self, a: list[int], b: list[int] | None) -> list[int]:
        return self._with_eos(a) if b is None else self._with_eos(a) + self._with_eos(b)

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: bool = False,
    ) -> list[int]:
        """Ids of one text (or a pair): `A </s>` / `A </s> B </s>`, as transformers' `encode`."""
        out = self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            max_length=max_length,
        )
        return out["input_ids"]

    @staticmethod
    def _truncate(a: list[int], b: list[int] | None, remove: int):
        """transformers' `longest_first`: the longer side first, the rest split evenly."""
        if remove <= 0:
            return a, b
        if b is None:
            return a[: len(a) - remove], None
        first = min(abs(len(b) - len(a)), remove)
        second = remove - first
        cut_a, cut_b = (
            (first + second // 2, second - second // 2)
            if len(a) > len(b)
            else (second // 2, first + second - second // 2)
        )
        return a[: len(a) - cut_a], b[: len(b) - cut_b]

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """transformers-style encoding: `input_ids` and `attention_mask`.

        Args:
          text, text_pair: one string or a list (pairs element-wise).
          padding: False / `'do_not_pad'`, True / `'longest'`, or `'max_length'`; pads on the
            right with `pad_id`.
          truncation: True / `'longest_first'` cuts rows to `max_length` (specials included;
            pairs lose tokens from the longer side first).
          max_length: the row length for truncation and for `padding='max_length'`.
          add_special_tokens: append `</s>` to each segment.

        Returns:
          Lists (one string: a list of ids; a list: lists of lists), or `[batch, length]` int32
          numpy arrays when padding.
        """
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(
                f"padding: expected False, True, 'longest' or 'max_length', got {padding!r}"
            )
        if truncation not in (False, True, "longest_first", "do_not_truncate"):
            raise ValueError(f"truncation: only 'longest_first' is supported, got {truncation!r}")
        truncate = truncation in (True, "longest_first")
        if (truncate or padding == "max_length") and max_length is None:
            raise ValueError("max_length is required with truncation or padding='max_length'")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"text_pair: {len(pairs)} pairs for {len(texts)} texts")
        firsts = self.encode_many(texts)
        seconds = self.encode_many(pairs) if pairs is not None else [None] * len(texts)
        rows = []
        for a, b in zip(firsts, seconds, strict=True):
            n_special = (1 if b is None else 2) if add_special_tokens else 0
            if truncate:
                if max_length < n_special + 1:
                    raise ValueError(f"max_length {max_length} leaves no room for text")
                a, b = self._truncate(a, b, len(a) + len(b or []) + n_special - max_length)
            rows.append(self._build(a, b) if add_special_tokens else a + (b or []))
        if padding in (False, "do_not_pad"):
            masks = [[1] * len(r) for r in rows]
            if single:
                return {"input_ids": rows[0], "attention_mask": masks[0]}
            return {"input_ids": rows, "attention_mask": masks}
        length = max_length if padding == "max_length" else max(map(len, rows), default=0)
        length = max(length, max(map(len, rows), default=0))  # never cut by padding
        input_ids = np.full((len(rows), length), self.pad_id, np.int32)
        attention_mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            attention_mask[i, : len(r)] = 1
        if single:
            return {"input_ids": input_ids[0], "attention_mask": attention_mask[0]}
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # --------------------------------------------------------------------------------- decoding

    def id_to_piece(self, i: int) -> str:
        """Piece string of id `i` (sentinels as `<extra_id_k>`)."""
        i = int(i)
        if i in self._added_by_id:
            return self._added_by_id[i]
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"id {i} out of range for {len(self)} ids ({self.path})")
        return self._sp.id_to_piece(i)

    def _pieces_to_text(self, pieces: list[str]) -> str:
        """One run of pieces between sentinels -> text (transformers' convert_tokens_to_string:
        `<pad>` / `</s>` / `<unk>` are written by name, a blank before the first of a group)."""
        if self.add_prefix_space and pieces[0].startswith(UNDERLINE):
            pieces = [pieces[0][1:], *pieces[1:]]  # the boundary spm added in front of the text
        out, run, after_special = [], [], False
        for p in pieces:
            if p in T5_SPECIALS:
                out.append(("" if after_special else " ") + self._sp.decode_pieces(run) + p)
                run, after_special = [], True
            else:
                run.append(p)
                after_special = False
        out.append(self._sp.decode_pieces(run))
        return "".join(out).strip()

    def decode(
        self,
        ids: Sequence[int] | np.ndarray,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of `[length]` ids, as transformers' `decode`.

        Negative ids (-100 label padding) and ids past `len(self)` (unused rows of a padded model
        vocabulary) are dropped; transformers would fail on them.

        Args:
          ids: a list or 1-d array.
          skip_special_tokens: drop `<pad>`, `</s>`, `<unk>` and the sentinels (otherwise they are
            written by name, sentinels separated by blanks).
          clean_up_tokenization_spaces: drop blanks before punctuation; default: the tokenizer's.
        """
        groups: list[str] = []
        run: list[str] = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= i < len(self) or (skip_special_tokens and i in self._added_by_id):
                continue
            if i in self._sentinel_ids:
                # Sentinels are their own groups; an empty run before one is not.
                text = self._pieces_to_text(run) if run else ""
                groups.extend([text, self._added_by_id[i]] if text else [self._added_by_id[i]])
                run = []
            else:
                run.append(self.id_to_piece(i))
        if run:
            groups.append(self._pieces_to_text(run))
        text = " ".join(groups)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else (clean_up_tokenization_spaces)
        )
        if clean:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def batch_decode(self, rows: Sequence[Sequence[int]] | np.ndarray, **kwargs) -> list[str]:
        """`decode` of each row of `[batch, length]` ids."""
        return [self.decode(r, **kwargs) for r in rows]


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The model with spm's dummy prefix off (transformers' `legacy=False` processor)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as e:  # pragma: no cover - protobuf ships with our dependencies
        raise ImportError(f"legacy=False needs protobuf: {e}") from e
    model = model_pb2.ModelProto.FromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


# ==================================================================================================
# Choosing the tokenizer of a run.
# ==================================================================================================

TOKENIZER_DIR = "t5_tokenizer"  # in a workdir: an HF tokenizer dir transformers can load
NATIVE_MODEL = "tokenizer.model"  # the fairseq-layout model a run trains (tasks/mlm.py)


def _saved_t5(directory: str | os.PathLike) -> Any:
    """The T5 tokenizer kept in a run's workdir or an HF model dir, if there is one."""
    directory = paths.path(directory)
    for candidate in (directory / TOKENIZER_DIR, directory):
        if is_t5_model(candidate):
            return candidate
    return None


def t5_tokenizer_for(
    data_config: Any, workdir: str, texts: Callable[[], Sequence[str]], init_from: str = ""
) -> T5Tokenizer | None:
    """The run's T5 tokenizer, or None where the config asks for another kind.

    In order: `data.tokenizer` if set (a T5 tokenizer when `is_t5_model`, else None: the file
    decides, not `data.tokenizer_type`); with
    `data.tokenizer_type='t5'`: the one kept in the workdir, the one of `init_from` (an HF
    T5/mT5 dir's `spiece.model`, or a run's `t5_tokenizer/`), else one trained on `texts()` with
    `data.vocab_size` pieces (+ `data.extra_ids`, default 100, sentinels). The tokenizer is kept
    in `<workdir>/t5_tokenizer/` (an HF tokenizer dir), so a resumed run tokenises identically
    and a run initialised from this one finds it.

    Args:
      data_config: the config's `data` section.
      workdir: the run's directory.
      texts: the training texts, called only when a tokenizer has to be trained.
      init_from: the run's `init_from` ('' = none).

    Raises:
      DataError: `data.tokenizer_type='t5'` with an `init_from` whose checkpoint was trained with
        a fairseq-layout `tokenizer.model` (and no `data.tokenizer`).
    """
    path = data_config.get("tokenizer", "")
    kind = data_config.get("tokenizer_type", "sentencepiece")
    kept = paths.path(workdir) / TOKENIZER_DIR
    if path:
        if not is_t5_model(path):
            return None  # the file decides, whatever data.tokenizer_type says
        tok = T5Tokenizer.load(path)
        if not (kept / SPIECE).is_file():
            tok.save_pretrained(kept)
        return tok
    if kind != "t5":
        return None
    if (kept / SPIECE).is_file():
        return T5Tokenizer.load(kept)
    if init_from:
        source = _saved_t5(init_from)
        if source is not None:
            tok = T5Tokenizer.load(source)
            tok.save_pretrained(kept)
            return tok
        if (paths.path(init_from) / NATIVE_MODEL).is_file():
            raise DataError(
                f"init_from {init_from} was trained with the fairseq-layout {NATIVE_MODEL}: its "
                "ids only mean something with that tokenizer; pass --config.data.tokenizer="
                f"{paths.path(init_from) / NATIVE_MODEL} (and the model ids it asks for)"
            )
    extra_ids = int(data_config.get("extra_ids", DEFAULT_EXTRA_IDS))
    tok = T5Tokenizer.train(
        texts(), kept / "spiece", int(data_config.vocab_size), extra_ids=extra_ids, seed=0
    )
    tok.save_pretrained(kept)
    return T5Tokenizer.load(kept)
