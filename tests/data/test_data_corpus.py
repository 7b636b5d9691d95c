"""Corpus helpers: the bundled chatterbot corpus and read_lines' errors."""

import pytest

from xformers_jax.data import (
    DataError,
    chatterbot_languages,
    chatterbot_texts,
    default_corpus,
    read_lines,
)


def test_chatterbot_texts():
    assert len(chatterbot_languages()) == 28
    texts = chatterbot_texts()
    assert len(texts) > 15_000
    assert all(t == t.strip() and t and "\n" not in t for t in texts)
    assert chatterbot_texts() == texts  # deterministic
    ja = chatterbot_texts(["japanese"])
    assert ja and set(ja) <= set(texts)
    with pytest.raises(ValueError, match="klingon"):
        chatterbot_texts(["klingon"])


def test_default_corpus(tmp_path):
    train, eval_ = default_corpus(tmp_path / "data")
    train_lines, eval_lines = read_lines(train), read_lines(eval_)
    n = len(train_lines) + len(eval_lines)
    assert n == len(chatterbot_texts())
    assert 0.03 < len(eval_lines) / n < 0.07
    # Many languages / scripts made it into the training split.
    train_set = set(train_lines)
    langs = [
        lang
        for lang in chatterbot_languages()
        if len(set(chatterbot_texts([lang])) & train_set) > 10
    ]
    assert len(langs) >= 25
    scripts = {"Cyrillic": "а", "Hiragana": "の", "Devanagari": "क", "Thai": "ก", "Hebrew": "ה"}
    text = "".join(train_lines)
    assert all(ch in text for ch in scripts.values())
    # Existing files are kept (a second call is a no-op).
    mtime = (tmp_path / "data" / "train.txt").stat().st_mtime_ns
    assert default_corpus(tmp_path / "data") == [train, eval_]
    assert (tmp_path / "data" / "train.txt").stat().st_mtime_ns == mtime


def test_read_lines_ok(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_bytes("\ufeffone\r\n\n  two  \nthree".encode())
    assert read_lines(path) == ["one", "two", "three"]


def test_read_lines_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt: file not found"):
        read_lines(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: empty"):
        read_lines(empty)
    nul = tmp_path / "nul.bin"
    nul.write_bytes(b"fine\nalso fine\nbad\x00bytes\n")
    with pytest.raises(DataError, match=r"nul.bin:3: binary"):
        read_lines(nul)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: invalid UTF-8") as info:
        read_lines(latin1)
    assert "\n" not in str(info.value)
    assert issubclass(DataError, ValueError)
