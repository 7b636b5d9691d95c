"""Which tokenizer a run uses: from the config, the workdir, `init_from`, or trained once.

`text_tokenizer(config, workdir)` serves MLM, PLM and the fine-tuning tasks (a fairseq-layout
`SentencePieceTokenizer` or an `XLNetTokenizer`, by `data.tokenizer_type`);
`seq2seq_tokenizer(config, workdir)` serves span corruption and seq2seq (a `T5Tokenizer` where
the config asks for one, else the former). A tokenizer trained by a run is kept in its workdir, so
a resumed run tokenises identically and a run initialised from it finds it. The training files
of a run are `train_files` / `eval_files` (the bundled corpus unless `data.train_files`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from xformers_jax import config_lib, paths
from xformers_jax.data.corpus import DataError, default_corpus
from xformers_jax.data.sources import expand_files, iter_texts


def train_files(config, workdir: str) -> list[str]:
    """`data.train_files`, else the bundled corpus' training split (written into the workdir)."""
    if config.data.train_files:
        return list(config.data.train_files)
    return [default_corpus(paths.join(workdir, "corpus"))[0]]


def eval_files(config, workdir: str) -> list[str]:
    """`data.eval_files`, else `data.train_files` (whose held-out slice `holdout` selects),
    else the bundled corpus' eval split."""
    if config.data.eval_files:
        return list(config.data.eval_files)
    if config.data.train_files:
        return list(config.data.train_files)
    return [default_corpus(paths.join(workdir, "corpus"))[1]]


def holdout(config, split: str) -> str | None:
    """`split` ("train" / "eval") when the eval data is a held-out slice of `data.train_files`
    (no `data.eval_files`), else None: the split's files are read whole."""
    return split if config.data.train_files and not config.data.eval_files else None


def _corpus_lines(config, workdir: str):
    """The training texts, streamed (tokenizer training samples `input_sentence_size` of them)."""
    files = expand_files(train_files(config, workdir))
    return _nonempty_texts(files, config.data.get("text_field", "text"))


def _nonempty_texts(files, field):
    """`iter_corpus`, naming a file that holds no text (streamed, spm would only say "no
    sentences")."""
    for f in files:
        empty = True
        for text in iter_texts(f, field):
            empty = False
            yield text
        if empty:
            raise DataError(f"{f}: empty file (no non-blank lines)")


def _sentencepiece(path: str, convention: str = "native"):
    from xformers_jax.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer.load(path, convention=convention)


def _xlnet(path: str):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    return XLNetTokenizer.load(path)


def _train_sentencepiece(texts, prefix: str, vocab_size: int):
    from xformers_jax.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer.train(texts, prefix, vocab_size)


def _train_xlnet(texts, prefix: str, vocab_size: int):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    return XLNetTokenizer.train(texts, prefix, vocab_size)


# `data.tokenizer_type` -> (the prefix a run trains its model to in the workdir, the loader of a
# `.model` file, the trainer, the tokenizer files an `init_from` dir may hold with their loaders).
# `sentencepiece`: fairseq/XLM-R ids (an MLM or span-corruption workdir's `tokenizer.model`, an
# HF XLM-R dir's `sentencepiece.bpe.model`). `xlnet`: XLNet's ids and example layout, trained
# and named as PLM pretraining does (a PLM workdir's or an HF XLNet dir's `spiece.model`; the
# dir is loaded, for an HF dir's `tokenizer_config.json` flags).
TOKENIZER_TYPES = {
    "sentencepiece": (
        "tokenizer",
        _sentencepiece,
        _train_sentencepiece,
        (
            ("tokenizer.model", _sentencepiece),
            ("sentencepiece.bpe.model", lambda p: _sentencepiece(p, "xlm-roberta")),
        ),
    ),
    "xlnet": (
        "spiece",
        _xlnet,
        _train_xlnet,
        (("spiece.model", lambda p: _xlnet(p.rsplit("/", 1)[0])),),
    ),
}


def text_tokenizer(config, workdir: str, default_type: str = "sentencepiece"):
    """The run's tokenizer, of kind `data.tokenizer_type` (`TOKENIZER_TYPES`; `default_type`
    where the config has no such key).

    In order: `data.tokenizer` if set; the one this run saved in its workdir; the one saved with
    `init_from` (a pretraining workdir or an HF dir holding its tokenizer, so a checkpoint and
    its tokenizer carry over together); else one trained on the training corpus, once, kept in
    the workdir so a resumed run tokenises identically.
    """
    kind = config.data.get("tokenizer_type", default_type)
    if kind not in TOKENIZER_TYPES:
        raise config_lib.ConfigError(
            f"config key 'data.tokenizer_type' must be one of {', '.join(TOKENIZER_TYPES)}; "
            f"got {kind!r}"
        )
    stem, load, train, saved = TOKENIZER_TYPES[kind]
    if config.data.tokenizer:
        return load(config.data.tokenizer)
    prefix = paths.join(workdir, stem)
    if paths.exists(prefix + ".model"):
        return load(prefix + ".model")
    init_from = config.get("init_from", "")
    for name, load_saved in saved if init_from else ():
        if paths.isfile(paths.join(init_from, name)):
            return load_saved(paths.join(init_from, name))
    return train(_corpus_lines(config, workdir), prefix, config.data.vocab_size)


def seq2seq_tokenizer(config, workdir: str, texts: Callable[[], Sequence[str]] | None = None):
    """The tokenizer of a text-to-text run: a `T5Tokenizer` where the config asks for one
    (`data.t5_tokenizer.t5_tokenizer_for`), else the fairseq-layout one of `data.tokenizer` or
    `text_tokenizer`.

    Args:
      texts: `() -> list[str]`, the texts a new tokenizer is trained on (default: the lines of
        the training files).
    """
    from xformers_jax.data.t5_tokenizer import t5_tokenizer_for
    from xformers_jax.data.tokenizer import SentencePieceTokenizer

    if texts is None:
        texts = lambda: _corpus_lines(config, workdir)  # noqa: E731
    tok = t5_tokenizer_for(config.data, workdir, texts, init_from=config.get("init_from", ""))
    if tok is not None:
        return tok
    if config.data.get("tokenizer_type") == "t5":
        # A T5 run given a fairseq-layout data.tokenizer (e.g. a span-corruption run's): the
        # file decides.
        return SentencePieceTokenizer.load(config.data.tokenizer)
    return text_tokenizer(config, workdir)
