"""Text corpora: the bundled chatterbot dialog corpus and a validating line reader.

The default run must work offline, so the default text corpus is the `chatterbot-corpus` package
(28 languages of short dialog utterances, installed as a dependency). `default_corpus` turns it
into two plain text files (train / eval, one utterance per line) that the pipelines read like any
user corpus. `read_lines` is the one entry point for user text files and turns every way a file
can be unusable into a one-line `DataError` naming the file (and line, where there is one).
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import yaml

from xformers_jax import paths
from xformers_jax.config_lib import UserError

# One utterance in `_EVAL_BUCKETS` goes to eval: ~5% of the corpus.
_EVAL_BUCKETS = 20


class DataError(UserError, ValueError):
    """A data file is missing, empty or not UTF-8 text; the message names the file (and line)."""


def _chatterbot_root() -> Path:
    try:
        import chatterbot_corpus
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise DataError(
            "the default corpus needs the package: pip install chatterbot-corpus"
        ) from e
    return Path(chatterbot_corpus.__file__).parent / "data"


def chatterbot_languages() -> list[str]:
    """Names of the languages bundled with `chatterbot-corpus` (sorted directory names)."""
    root = _chatterbot_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.yml")))


def _utterance(item) -> str | None:
    if item is None:
        return None
    # One utterance per line downstream: fold newlines and runs of blanks into single spaces.
    text = " ".join(str(item).split())
    return text or None


@functools.lru_cache(maxsize=8)
def _load_texts(languages: tuple[str, ...]) -> tuple[str, ...]:
    root = _chatterbot_root()
    # The C loader parses the same safe YAML subset ~10x faster than the pure-python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    texts = []
    for lang in languages:
        for path in sorted((root / lang).glob("*.yml")):
            with open(path, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=loader)
            if not isinstance(doc, dict):
                continue
            for conv in doc.get("conversations") or []:
                # A few files hold a bare string where a list of turns is expected.
                items = conv if isinstance(conv, list) else [conv]
                texts.extend(t for t in map(_utterance, items) if t is not None)
    return tuple(texts)


def chatterbot_texts(languages: Sequence[str] | None = None) -> list[str]:
    """Every dialog utterance of the installed `chatterbot-corpus`, in a deterministic order.

    Args:
        languages: language directory names (`"english"`, `"japanese"`, ...); all 28 by default.

    Returns:
        Stripped, non-empty utterances, ordered by language (as given, or sorted) then file path.

    Raises:
        ValueError: an unknown language name.
    """
    available = chatterbot_languages()
    if languages is None:
        languages = available
    elif isinstance(languages, str):
        languages = [languages]
    unknown = sorted(set(languages) - set(available))
    if unknown:
        raise ValueError(f"languages: unknown {unknown}; available: {', '.join(available)}")
    return list(_load_texts(tuple(languages)))


def _is_eval(text: str) -> bool:
    # A content hash, not the index: duplicate utterances land in the same split (no leakage) and
    # the split does not move when the package adds files.
    return zlib.crc32(text.encode("utf-8")) % _EVAL_BUCKETS == 0


def _write_atomic(path: str, lines: Sequence[str]) -> None:
    # Whole-file writes (a rename locally, one upload on GCS), so concurrent hosts / an
    # interrupted run never see a half-written file.
    paths.write_text(path, "".join(line + "\n" for line in lines))


def default_corpus(
    directory: str | os.PathLike, languages: Sequence[str] | None = None
) -> list[str]:
    """Writes the bundled chatterbot corpus as `train.txt` / `eval.txt` (if missing).

    The split is ~95/5 by a hash of each utterance, one utterance per line, no download.

    Args:
        directory: where to write (created if needed); existing files are kept as they are.
        languages: as in `chatterbot_texts`; all languages by default.

    Returns:
        `[train_path, eval_path]` as strings.
    """
    train_path, eval_path = paths.join(directory, "train.txt"), paths.join(directory, "eval.txt")
    if not (paths.exists(train_path) and paths.exists(eval_path)):
        texts = chatterbot_texts(languages)
        _write_atomic(train_path, [t for t in texts if not _is_eval(t)])
        _write_atomic(eval_path, [t for t in texts if _is_eval(t)])
    return [str(train_path), str(eval_path)]


def read_lines(path: str | os.PathLike) -> list[str]:
    """Reads a UTF-8 text file into its stripped, non-blank lines.

    Args:
        path: a text file, one example (utterance, sentence, document) per line.

    Returns:
        The lines in file order, whitespace-stripped, blank lines dropped.

    Raises:
        DataError: the file is missing or not a file, has no non-blank line, or is binary (a NUL
            byte or invalid UTF-8; the message names the 1-based line number).
    """
    path = paths.resolve(path)
    try:
        data = paths.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: binary content (NUL byte), expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # `utf-8-sig` drops a BOM before decoding, which shifts e.start by 3 bytes at most;
        # counting newlines is unaffected because the BOM holds none.
        line = data.count(b"\n", 0, e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason}), expected UTF-8 text") from None
    lines = [s for s in (raw.strip() for raw in text.split("\n")) if s]
    if not lines:
        raise DataError(f"{path}: empty file (no non-blank lines)")
    return lines
