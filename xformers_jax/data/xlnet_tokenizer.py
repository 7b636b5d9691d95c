"""The XLNet tokenizer: sentencepiece with XLNet's conventions, ids equal to transformers'.

Conventions (those of `transformers.XLNetTokenizer` and the original XLNet):

* ids are the spm model's own ids (no offset); XLNet's spm model holds the specials as pieces:
  `<unk>`=0 `<s>`=1 `</s>`=2 `<cls>`=3 `<sep>`=4 `<pad>`=5 `<mask>`=6 `<eod>`=7 `<eop>`=8
  (`train` builds a model with exactly that layout).
* text is normalised first: `remove_space` collapses whitespace, ``` `` ``` / `''` become `"`,
  accents are stripped unless `keep_accents`, lower-cased with `do_lower_case`; then split on the
  literal special-token strings (`<mask>` also eats the spaces before it), and pieces such as
  `▁1990,` are re-split into `▁1990` `,` (XLNet's digit-comma rule).
* sequences end with the CLS token: `A <sep> <cls>` and `A <sep> B <sep> <cls>`; segment ids are
  0 for A (and its sep), 1 for B (and its sep), 2 for CLS, 3 for padding.
* padding goes on the LEFT (the CLS token stays last, where XLNet's summary reads it).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from xformers_jax import paths

UNDERLINE = "\u2581"
SPECIALS = ("<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
PAD_TOKEN_TYPE_ID = 3
CLS_TOKEN_TYPE_ID = 2


class XLNetTokenizer:
    """An XLNet sentencepiece model (e.g. an HF XLNet tokenizer dir's `spiece.model`).

    Construct with `XLNetTokenizer.load(path)` or `XLNetTokenizer.train(texts, prefix, size)`.
    """

    def __init__(
        self,
        processor: spm.SentencePieceProcessor,
        *,
        path: str,
        do_lower_case: bool = False,
        remove_space: bool = True,
        keep_accents: bool = False,
    ):
        self._sp = processor
        self.path = path
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.keep_accents = keep_accents
        missing = [s for s in SPECIALS if self._piece_id(s) is None]
        if missing:
            raise ValueError(f"{path} is not an XLNet spm model: no pieces {missing}")

    # ------------------------------------------------------------------------- building
    @classmethod
    def load(cls, path: str | os.PathLike, **flags) -> XLNetTokenizer:
        """From a `.model` file or an HF tokenizer dir (`spiece.model`, and `do_lower_case` /
        `remove_space` / `keep_accents` from its `tokenizer_config.json` unless given)."""
        path = paths.path(path)
        if path.is_dir():
            config = path / "tokenizer_config.json"
            if config.is_file():
                saved = json.loads(config.read_text(encoding="utf-8"))
                for k in ("do_lower_case", "remove_space", "keep_accents"):
                    if k in saved:
                        flags.setdefault(k, saved[k])
            path = path / "spiece.model"
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        return cls(sp, path=str(path), **flags)

    @classmethod
    def train(
        cls, texts: Iterable[str], prefix: str | os.PathLike, vocab_size: int, **flags
    ) -> XLNetTokenizer:
        """Trains a unigram model with XLNet's special pieces at ids 0-8; writes `prefix.model`."""
        prefix = paths.resolve(prefix)
        from xformers_jax.data.tokenizer import GuardedLines

        lines = (s for t in texts for s in (x.strip() for x in t.split("\n")) if s)
        with paths.local_prefix(prefix) as local, GuardedLines(lines) as guarded:
            cls._train_local(guarded, local, vocab_size)
        return cls.load(prefix + ".model", **flags)

    @staticmethod
    def _train_local(lines: Iterable[str], prefix: str, vocab_size: int) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            control_symbols=["<cls>", "<sep>", "<pad>", "<mask>", "<eod>"],
            user_defined_symbols=["<eop>"],
            hard_vocab_limit=False,
            # A shuffled sample (reservoir) of at most this many sentences is kept, never the
            # whole corpus.
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )

    # ------------------------------------------------------------------------- ids
    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, token: str) -> int:
        i = self._piece_id(token)
        return self._sp.unk_id() if i is None else i

    pad_token_id = property(lambda self: self.token_id("<pad>"))
    cls_token_id = property(lambda self: self.token_id("<cls>"))
    sep_token_id = property(lambda self: self.token_id("<sep>"))
    mask_token_id = property(lambda self: self.token_id("<mask>"))
    unk_token_id = property(lambda self: self.token_id("<unk>"))
    eod_token_id = property(lambda self: self.token_id("<eod>"))
    eop_token_id = property(lambda self: self.token_id("<eop>"))

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.token_id(s) for s in SPECIALS)

    # ------------------------------------------------------------------------- tokenizing
    def preprocess(self, text: str) -> str:
        """XLNet's normalisation (see the module docstring)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        text = text.replace("``", '"').replace("''", '"')
        if not self.keep_accents:
            text = unicodedata.normalize("NFKD", text)
            text = "".join(c for c in text if not unicodedata.combining(c))
        return text.lower() if self.do_lower_case else text

    def _pieces(self, text: str) -> list[str]:
        out: list[str] = []
        for piece in self._sp.encode(self.preprocess(text), out_type=str):
            if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
                # `▁1990,` -> `▁1990` `,`: keeps numbers whole before a comma.
                cur = self._sp.encode(piece[:-1].replace(UNDERLINE, ""), out_type=str)
                if piece[0] != UNDERLINE and cur and cur[0][0] == UNDERLINE:
                    cur = cur[1:] if len(cur[0]) == 1 else [cur[0][1:], *cur[1:]]
                out.extend([*cur, piece[-1]])
            else:
                out.append(piece)
        return out

    def tokenize(self, text: str) -> list[str]:
        """Pieces of `text`, special-token strings kept whole."""
        parts = _SPECIAL_RE.split(text)
        out: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(part)
                continue
            if i + 1 < len(parts) and parts[i + 1] == "<mask>":
                part = part.rstrip()  # <mask> is lstrip=True in transformers
            if part:
                out.extend(self._pieces(part))
        return out

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.token_id(t) for t in tokens]

    def encode(
        self, text: str, text_pair: str | None = None, add_special_tokens: bool = True
    ) -> list[int]:
        a = self.convert_tokens_to_ids(self.tokenize(text))
        b = None if text_pair is None else self.convert_tokens_to_ids(self.tokenize(text_pair))
        return self._with_specials(a, b)[0] if add_special_tokens else a + (b or [])

    def _with_specials(self, a: list[int], b: list[int] | None) -> tuple[list[int], list[int]]:
        sep, cls = self.sep_token_id, self.cls_token_id
        ids, types = a + [sep], [0] * (len(a) + 1)
        if b is not None:
            ids, types = ids + b + [sep], types + [1] * (len(b) + 1)
        return ids + [cls], types + [CLS_TOKEN_TYPE_ID]

    # ------------------------------------------------------------------------- model inputs
    # What a data pipeline needs to lay out examples the XLNet way without knowing the family;
    # the names and results are those of `transformers.XLNetTokenizer`.
    padding_side = "left"  # the CLS token stays last, where XLNet's summary reads it
    pad_token_type_id = PAD_TOKEN_TYPE_ID
    model_input_names = ("input_ids", "token_type_ids", "attention_mask")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.special_ids)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """2 (`<sep> <cls>`) for one sequence, 3 for a pair."""
        return 3 if pair else 2

    def build_inputs_with_special_tokens(
        self, token_ids_0: Sequence[int], token_ids_1: Sequence[int] | None = None
    ) -> list[int]:
        """`A <sep> <cls>` or `A <sep> B <sep> <cls>` (ids without specials in, with out)."""
        b = None if token_ids_1 is None else list(token_ids_1)
        return self._with_specials(list(token_ids_0), b)[0]

    def create_token_type_ids_from_sequences(
        self, token_ids_0: Sequence[int], token_ids_1: Sequence[int] | None = None
    ) -> list[int]:
        """Segment ids of `build_inputs_with_special_tokens`: 0 for A, 1 for B, 2 for CLS."""
        b = None if token_ids_1 is None else list(token_ids_1)
        return self._with_specials(list(token_ids_0), b)[1]

    def get_special_tokens_mask(
        self, token_ids_0: Sequence[int], token_ids_1: Sequence[int] | None = None
    ) -> list[int]:
        """1 at the special tokens `build_inputs_with_special_tokens` adds, 0 at A's and B's."""
        mask = [0] * len(token_ids_0) + [1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask + [1]

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
    ) -> dict[str, list | np.ndarray]:
        """HF-style batch encoding: `input_ids`, `token_type_ids`, `attention_mask`.

        Args:
          text, text_pair: one string or a list (pairs element-wise).
          padding: False, True / `'longest'`, or `'max_length'`; pads on the left.
          max_length: with `truncation`, the longest output (longest-first for pairs); with
            `padding='max_length'`, the padded length.

        Returns:
          Lists of lists (no padding) or `[batch, length]` int32 numpy arrays (padding); a single
          string gives unbatched lists.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if single else list(text_pair)
        rows = []
        for i, t in enumerate(texts):
            a = self.convert_tokens_to_ids(self.tokenize(t))
            b = None if pairs is None else self.convert_tokens_to_ids(self.tokenize(pairs[i]))
            if truncation and max_length is not None:
                a, b = _truncate(a, b, max_length - (3 if b is not None else 2))
            rows.append(self._with_specials(a, b))
        ids, types = [r[0] for r in rows], [r[1] for r in rows]
        masks = [[1] * len(r) for r in ids]
        if padding:
            n = max_length if padding == "max_length" else max(map(len, ids))
            ids = _left_pad(ids, n, self.pad_token_id)
            types = _left_pad(types, n, PAD_TOKEN_TYPE_ID)
            masks = _left_pad(masks, n, 0)
        out = {"input_ids": ids, "token_type_ids": types, "attention_mask": masks}
        return {k: v[0] for k, v in out.items()} if single else out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens kept as their strings unless skipped."""
        out, run = [], []
        specials = self.special_ids
        for i in (int(x) for x in np.asarray(ids).reshape(-1)):
            if i in specials:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)


def _truncate(a: list[int], b: list[int] | None, budget: int):
    """Longest-first truncation of (a, b) to `budget` tokens in all."""
    a, b = list(a), None if b is None else list(b)
    while len(a) + len(b or []) > max(budget, 0):
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return a, b


def _left_pad(rows: list[list[int]], n: int, value: int) -> np.ndarray:
    out = np.full((len(rows), n), value, np.int32)
    for i, r in enumerate(rows):
        r = r[-n:] if len(r) > n else r
        out[i, n - len(r) :] = r
    return out
