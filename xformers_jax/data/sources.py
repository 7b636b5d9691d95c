"""Text sources: paths, globs (`**` recursive) and gs:// URLs of .txt / .jsonl / .parquet files,
each optionally .gz or .zst compressed, read lazily.

    files = expand_files(["gs://bucket/cc100/en/**/*.jsonl.zst", "local/*.txt"])
    for text in iter_texts(files[0], text_field="text"):   # streamed, never the whole file
        ...

Every way an input can be unusable (no file matches, not UTF-8, bad JSON, a missing field or
column, a corrupt archive) is a one-line `DataError` naming the file and the line or row.
Files are opened through `xformers_jax.paths` (local or gs://, streamed by the backend).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence

from xformers_jax import paths
from xformers_jax.data.corpus import DataError

FORMATS = ("txt", "jsonl", "parquet")
COMPRESSIONS = ("gz", "zst")
# Rows read from a parquet file at a time: bounded memory whatever the row-group size.
_PARQUET_BATCH = 1024


def file_format(path: str) -> tuple[str, str | None]:
    """`(format, compression)` from the name: `x.jsonl.gz` -> `("jsonl", "gz")`.

    Raises:
      DataError: an extension other than .txt / .jsonl / .parquet (+ .gz / .zst).
    """
    name = os.fspath(path).rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    comp = parts.pop() if len(parts) > 2 and parts[-1] in COMPRESSIONS else None
    if len(parts) >= 2 and parts[-1] in FORMATS:
        return parts[-1], comp
    if len(parts) >= 2 and parts[-1] == "json":
        return "jsonl", comp
    raise DataError(
        f"{path}: unknown format; expected a name ending in .txt, .jsonl or .parquet, optionally "
        f"followed by .gz or .zst"
    )


def expand_files(patterns: str | Sequence[str]) -> list[str]:
    """Paths, globs (`*`, `?`, `[...]`, `**` recursive) and gs:// URLs -> the files, in order.

    Each pattern's matches are sorted; patterns keep their order; a file named twice is kept once.

    Raises:
      DataError: a pattern matches no file, or a match has an unknown format.
    """
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    out: list[str] = []
    for pattern in patterns:
        for m in match_files(pattern):
            file_format(m)
            if m not in out:
                out.append(m)
    return out


def match_files(pattern: str | os.PathLike) -> list[str]:
    """The files of one path, glob or gs:// URL, sorted; a DataError naming it if none."""
    pattern = os.fspath(pattern)
    try:
        matches = paths.glob(pattern)
    except ValueError as e:
        raise DataError(f"{pattern}: {e}") from None
    if not matches:
        what = "no file matches" if any(c in pattern for c in "*?[") else "file not found"
        raise DataError(f"{pattern}: {what}")
    return matches


@contextlib.contextmanager
def _open_binary(path: str, compression: str | None) -> Iterator[io.BufferedIOBase]:
    """The decompressed byte stream of a file (local or gs://)."""
    try:
        raw = paths.open_file(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with raw:
        if compression == "gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        elif compression == "zst":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
                yield io.BufferedReader(f, 1 << 20)
        else:
            yield raw


def _lines(path: str, stream) -> Iterator[tuple[int, str]]:
    """`(1-based line number, decoded line)`, decoding incrementally (a bad byte names its line)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    number, tail = 0, ""
    while True:
        try:
            chunk = stream.read(1 << 20)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}:{number + 1}: corrupt compressed data ({e})") from None
        except Exception as e:  # zstd errors have their own class
            raise DataError(f"{path}:{number + 1}: cannot read ({e})") from None
        final = not chunk
        try:
            text = tail + decoder.decode(chunk, final=final)
        except UnicodeDecodeError as e:
            bad = number + 1 + chunk[: e.start].count(b"\n")
            raise DataError(f"{path}:{bad}: invalid UTF-8 ({e.reason}), expected text") from None
        lines = text.split("\n")
        tail = "" if final else lines.pop()
        for line in lines:
            number += 1
            if "\x00" in line:
                raise DataError(f"{path}:{number}: binary content (NUL byte), expected text")
            yield number, line
        if final:
            return


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """`(1-based line number, line)` of any UTF-8 text file (local or gs://), streamed; a name
    ending in `.gz` or `.zst` is decompressed. Errors name the file and line."""
    ext = os.fspath(path).rsplit(".", 1)[-1].lower()
    with _open_binary(path, ext if ext in COMPRESSIONS else None) as stream:
        yield from _lines(path, stream)


def _jsonl(path: str, stream, field: str) -> Iterator[str]:
    for number, line in _lines(path, stream):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}:{number}: no field {field!r} (data.text_field)")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {field!r} is {type(value).__name__}, not text")
        yield value


def _parquet(path: str, stream, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not stream.seekable():
        # A compressed parquet file: its footer is at the end, so it is spooled (to disk past
        # 64 MB) rather than held in memory.
        import tempfile

        spool = tempfile.SpooledTemporaryFile(64 << 20)
        while chunk := stream.read(1 << 20):
            spool.write(chunk)
        spool.seek(0)
        stream = spool
    try:
        pf = pq.ParquetFile(stream)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no column {field!r} (data.text_field); columns: {pf.schema_arrow.names}"
        )
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: column {field!r} is not text")
            yield value


def iter_texts(path: str, text_field: str = "text") -> Iterator[str]:
    """The examples of one file, streamed: whitespace-stripped, blank ones dropped.

    `.txt`: one example per line; `.jsonl`: the string `text_field` of each JSON object;
    `.parquet`: the string column `text_field` (nulls skipped).

    Raises:
      DataError: naming the file and the line (or row) that is unusable.
    """
    fmt, comp = file_format(path)
    with _open_binary(path, comp) as stream:
        if fmt == "txt":
            items = (line for _, line in _lines(path, stream))
        elif fmt == "jsonl":
            items = _jsonl(path, stream, text_field)
        else:
            items = _parquet(path, stream, text_field)
        for text in items:
            text = text.strip()
            if text:
                yield text


def iter_corpus(files: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """`iter_texts` of each file in turn."""
    for path in files:
        yield from iter_texts(path, text_field)


def is_holdout(text: str) -> bool:
    """The held-out eval slice of a corpus without eval files: ~5% of the examples by a content
    hash (stable under reordering; duplicates land in the same split), as the bundled corpus."""
    return zlib.crc32(text.encode("utf-8")) % 20 == 0


def read_texts(
    files: str | Sequence[str], text_field: str = "text", holdout: str | None = None
) -> list[str]:
    """Every example of the expanded `files` in a list (for the small in-memory pipelines).

    Args:
      holdout: `"train"` drops the held-out slice (`is_holdout`), `"eval"` keeps only it.

    Raises:
      DataError: as `expand_files` / `iter_texts`, or no example at all.
    """
    expanded = expand_files(files)
    texts = iter_corpus(expanded, text_field)
    if holdout is not None:
        texts = (t for t in texts if is_holdout(t) == (holdout == "eval"))
    texts = list(texts)
    if not texts:
        raise DataError(f"{', '.join(expanded)}: no text (every example is blank)")
    return texts
