"""Shared fixtures for the data tests: a tiny multilingual corpus and spm models trained on it."""

import pytest
import sentencepiece as spm

from xformers_jax.data import SentencePieceTokenizer, chatterbot_texts


@pytest.fixture(scope="session")
def multilingual_texts():
    """~1300 utterances (a few dozen KB) spread over all 28 chatterbot languages."""
    return chatterbot_texts()[::15]


@pytest.fixture(scope="session")
def native_tokenizer(tmp_path_factory, multilingual_texts):
    """A unigram model with the fairseq ids built in (trained in ~0.1 s)."""
    prefix = tmp_path_factory.mktemp("spm") / "native"
    return SentencePieceTokenizer.train(multilingual_texts, prefix, vocab_size=2000, seed=0)


@pytest.fixture(scope="session")
def plain_spm_model(tmp_path_factory, multilingual_texts):
    """A model with spm's default ids (<unk>=0, <s>=1, </s>=2), like XLM-R's bpe.model."""
    prefix = tmp_path_factory.mktemp("spm") / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(multilingual_texts),
        model_prefix=str(prefix),
        vocab_size=2000,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=2,
    )
    return f"{prefix}.model"


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """Two small text files of dialog lines (English + Russian + Japanese), ~2000 lines."""
    root = tmp_path_factory.mktemp("text")
    paths = []
    for name, langs in (("a.txt", ["english"]), ("b.txt", ["russian", "japanese"])):
        path = root / name
        path.write_text("\n".join(chatterbot_texts(langs)) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths
