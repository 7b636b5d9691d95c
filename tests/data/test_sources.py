"""Text sources: every format x compression, globs, gs:// and the one-line errors."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from xformers_jax import paths
from xformers_jax.data.corpus import DataError
from xformers_jax.data.sources import expand_files, file_format, iter_texts, read_texts

TEXTS = ["hello world", "привет мир", "こんにちは世界", "a third line"]


def _compress(data: bytes, comp: str | None) -> bytes:
    if comp == "gz":
        return gzip.compress(data, mtime=0)
    if comp == "zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _encode(fmt: str, texts, field="text") -> bytes:
    if fmt == "txt":
        return ("\n".join(texts) + "\n\n").encode()
    if fmt == "jsonl":
        return "".join(json.dumps({field: t, "lang": "x"}) + "\n" for t in texts).encode()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), sink, row_group_size=2)
    return sink.getvalue().to_pybytes()


def _write(root: str, name: str, texts, field="text") -> str:
    fmt, comp = file_format(name)
    target = paths.join(root, name)
    paths.write_bytes(target, _compress(_encode(fmt, texts, field), comp))
    return target


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
@pytest.mark.parametrize("comp", [None, "gz", "zst"])
def test_every_format_and_compression(tmp_path, fmt, comp):
    name = f"part.{fmt}" + (f".{comp}" if comp else "")
    path = _write(str(tmp_path), name, TEXTS, field="body")
    field = "body"
    assert list(iter_texts(path, text_field=field)) == TEXTS


def test_globs_recursive_and_order(tmp_path):
    root = str(tmp_path)
    _write(root, "en/a/1.txt", ["en1"])
    _write(root, "en/b/c/2.jsonl.gz", ["en2"])
    _write(root, "fr/3.txt.zst", ["fr3"])
    files = expand_files([f"{root}/en/**/*", f"{root}/fr/*.txt.zst", f"{root}/en/a/1.txt"])
    assert [f.removeprefix(root) for f in files] == [
        "/en/a/1.txt",
        "/en/b/c/2.jsonl.gz",
        "/fr/3.txt.zst",
    ]
    assert read_texts(files) == ["en1", "en2", "fr3"]


def test_gcs_sources(bucket):
    _write(bucket, "corpus/x/1.jsonl.zst", TEXTS[:2])
    _write(bucket, "corpus/y/2.parquet.gz", TEXTS[2:])
    _write(bucket, "corpus/y/3.txt", ["last"])
    files = expand_files(bucket + "/corpus/**/*")
    assert files == [
        bucket + p for p in ("/corpus/x/1.jsonl.zst", "/corpus/y/2.parquet.gz", "/corpus/y/3.txt")
    ]
    assert read_texts(files) == TEXTS + ["last"]


def test_streamed_not_read_whole(tmp_path):
    # A generator: the first example arrives before the (broken) end of the file is reached.
    path = tmp_path / "big.txt.gz"
    path.write_bytes(gzip.compress(b"first\n" + b"x" * 3_000_000 + b"\n")[:-200])
    it = iter_texts(str(path))
    assert next(it) == "first"
    with pytest.raises(DataError, match=r"big.txt.gz:2: corrupt compressed data"):
        list(it)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("a.txt", b"ok\nfine\n\xff\xfe\n", r"a.txt:3: invalid UTF-8"),
        ("a.txt.gz", gzip.compress(b"ok\n\x00\n", mtime=0), r"a.txt.gz:2: binary content"),
        ("a.jsonl", b'{"text": "ok"}\n{"text": \n', r"a.jsonl:2: invalid JSON"),
        (
            "a.jsonl.zst",
            _compress(b'{"text": "ok"}\n{"other": 1}\n', "zst"),
            r"a.jsonl.zst:2: no field 'text'",
        ),
        ("a.jsonl", b'{"text": 3}\n', r"a.jsonl:1: field 'text' is int"),
        ("a.parquet", b"not parquet at all", r"a.parquet: not a parquet file"),
        ("a.txt.zst", b"garbage", r"a.txt.zst:1: cannot read"),
    ],
    ids=lambda v: v if isinstance(v, str) and "\n" not in v else "",
)
def test_bad_input_names_file_and_line(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        list(iter_texts(str(path)))


def test_bad_names_and_columns(tmp_path):
    with pytest.raises(DataError, match=r"\*\.txt: no file matches"):
        expand_files(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match=r"missing.txt: file not found"):
        expand_files(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match=r"x.csv: unknown format"):
        expand_files(str(tmp_path / "x.csv"))
    path = _write(str(tmp_path), "p.parquet", TEXTS, field="body")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text'"):
        list(iter_texts(path))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"blank.txt: no text"):
        read_texts(str(tmp_path / "blank.txt"))


def test_holdout_split_by_content_hash(tmp_path):
    from xformers_jax.data import chatterbot_texts
    from xformers_jax.data.sources import is_holdout

    texts = chatterbot_texts(["english", "french"])
    path = _write(str(tmp_path), "c.jsonl.gz", texts)
    train, held = read_texts(path, holdout="train"), read_texts(path, holdout="eval")
    assert sorted(train + held) == sorted(texts) and not set(train) & set(held)
    assert 0.02 < len(held) / len(texts) < 0.09 and all(map(is_holdout, held))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.mixture", "'x'", "data.mixture' must map"),
        ("data.mixture", "{'en': {'weight': 1}}", "data.mixture.en' needs 'files'"),
        ("data.mixture", "{'en': {'files': ['a'], 'weight': -1}}", "weight' must be >= 0"),
        ("data.mixture_alpha", "2.0", "data.mixture_alpha' must be a number"),
        ("data.text_field", "''", "data.text_field' must be a non-empty"),
    ],
)
def test_data_config_errors(key, value, message):
    from tests.helpers import TINY_CONFIG
    from xformers_jax import config_lib

    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config_lib.load_config(TINY_CONFIG, [f"{key}={value}"]))
