"""Every file and directory the project touches, local or `gs://`, through `etils.epath`.

Orbax and tensorstore take `gs://` URLs as they are, so a URL is never made absolute or joined with
`os.path` (that is how `gs://bucket/run` silently becomes a local folder named `gs:`). Local paths
are made absolute once. Schemes other than `gs://` are refused with a one-line error.

Object stores have no rename and no append: `write_text` / `write_bytes` upload a whole object (an
upload is atomic on GCS), and locally write a temporary file and rename it, so a reader never sees
half a file either way.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from etils import epath

SUPPORTED_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

PathLike = str | os.PathLike


def scheme(path: PathLike) -> str | None:
    """`"gs"` for `gs://b/x`, None for a local path; unknown schemes raise ValueError."""
    m = _SCHEME.match(os.fspath(path))
    if m is None:
        return None
    s = m.group(1).lower()
    if s not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"unsupported URL scheme {s + '://'!r} in {os.fspath(path)!r}: use a local path or gs://"
        )
    if not os.fspath(path)[len(s) + 3 :].strip("/"):
        raise ValueError(f"{os.fspath(path)!r} names no bucket")
    return s


def is_remote(path: PathLike) -> bool:
    return scheme(path) is not None


def resolve(path: PathLike) -> str:
    """The canonical string form: absolute for local paths, the URL unchanged for gs://."""
    p = os.fspath(path)
    if scheme(p) is not None:
        return p.rstrip("/") if len(p.rstrip("/")) > len("gs://") else p
    return os.path.abspath(os.path.expanduser(p))


def path(p: PathLike) -> epath.Path:
    """An `epath.Path` for a local path (made absolute) or a gs:// URL (kept as it is)."""
    if isinstance(p, epath.Path) and not isinstance(p, os.PathLike | str):
        return p
    return epath.Path(resolve(p))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, without `os.path` (which would mangle `gs://`)."""
    out = resolve(base)
    for part in parts:
        out = out.rstrip("/") + "/" + part.strip("/")
    return out


def bucket_exists(url: PathLike) -> bool:
    """Whether the bucket of a gs:// URL exists and can be listed (True for local paths)."""
    target = resolve(url)
    if not is_remote(target):
        return True
    import gcsfs

    bucket = target.removeprefix("gs://").split("/", 1)[0]
    try:
        gcsfs.GCSFileSystem().ls(bucket, detail=False)
    except (FileNotFoundError, PermissionError, OSError):
        return False
    return True


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: PathLike) -> bool:
    return path(p).is_file()


def listdir(p: PathLike) -> list[str]:
    """Names (not paths) of a directory's entries, sorted."""
    return sorted(c.name for c in path(p).iterdir())


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes the whole file so that readers see the old one or the new one, never a part."""
    target = resolve(p)
    if is_remote(target):
        path(target).write_bytes(data)  # one upload: atomic on GCS
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode())


def remove(p: PathLike) -> None:
    """Removes a file or a whole directory tree; a missing path is not an error."""
    q = path(p)
    if q.is_dir():
        q.rmtree()
    elif q.exists():
        q.unlink()


def copy(src: PathLike, dst: PathLike) -> None:
    """Copies one file between any two locations (local or gs://)."""
    write_bytes(dst, read_bytes(src))


def _pattern_regex(pattern: str) -> re.Pattern:
    """`**/` matches any number of directories, `*` / `?` / `[...]` stay inside one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]*/)*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _all_files(base: str) -> list[str]:
    """Every file under a directory (recursively), as full paths / URLs."""
    if not is_remote(base):
        return [os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs]
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    return ["gs://" + f for f in fs.find(base.removeprefix("gs://"))]


def glob(pattern: PathLike) -> list[str]:
    """Files matching a pattern (`*`, `?`, `[...]`, `**` recursive), local or gs://, sorted.

    The directory before the first wildcard is listed recursively once (one listing call on
    GCS, however deep the pattern); a pattern without wildcards returns itself if it is a file.
    """
    pat = resolve(pattern)
    if not any(c in pat for c in "*?["):
        return [pat] if isfile(pat) else []
    head = pat[: min(pat.index(c) for c in "*?[" if c in pat)]
    base = head.rsplit("/", 1)[0]
    if not isdir(base):
        return []
    rx = _pattern_regex(pat[len(base) + 1 :])
    return sorted(f for f in _all_files(base) if rx.match(f[len(base) + 1 :]))


@contextlib.contextmanager
def local_file(p: PathLike, suffix: str = "") -> Iterator[str]:
    """A local filename for libraries that only open local files: the file itself when local,
    a temporary copy of a gs:// object otherwise."""
    target = resolve(p)
    if not is_remote(target):
        yield target
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(target) + suffix)
        with open(local, "wb") as f:
            f.write(read_bytes(target))
        yield local


@contextlib.contextmanager
def local_dir_for_writing(p: PathLike) -> Iterator[str]:
    """A local directory whose files end up in `p`: `p` itself when local; a temporary directory
    uploaded file by file (recursively) into the gs:// prefix when the block exits normally."""
    target = resolve(p)
    if not is_remote(target):
        os.makedirs(target, exist_ok=True)
        yield target
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        upload_tree(tmp, target)


@contextlib.contextmanager
def local_prefix(prefix: PathLike) -> Iterator[str]:
    """A local file prefix for tools that write `<prefix>.<ext>` files themselves (sentencepiece
    training): `prefix` itself when local (its directory created); a temporary one whose files
    are uploaded next to the gs:// prefix when the block exits normally."""
    target = resolve(prefix)
    if not is_remote(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        yield target
        return
    parent, stem = target.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        yield os.path.join(tmp, stem)
        upload_tree(tmp, parent)


def upload_tree(local_dir: str, dst: PathLike) -> None:
    """Copies every file under a local directory to `dst/<relative path>`."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(join(dst, rel), f.read())


def open_file(p: PathLike, mode: str = "rb") -> Any:
    """A file object for reading or writing (local or gs://, streamed by the backend)."""
    return path(p).open(mode)


def read_range(p: PathLike, start: int, stop: int) -> bytes:
    """Bytes `[start, stop)` of a file: one ranged read (an HTTP range request on gs://), so a
    slice of a large object is read without downloading the rest."""
    target = resolve(p)
    if stop <= start:
        return b""
    if not is_remote(target):
        with open(target, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
    else:
        data = _gcs().cat_file(target.removeprefix("gs://"), start=start, end=stop)
    if len(data) != stop - start:
        end = start + len(data)
        raise OSError(f"{target}: wanted bytes {start}..{stop}, the file ends at {end}")
    return data


_GCS: list = []


def _gcs() -> Any:
    if not _GCS:
        import gcsfs

        _GCS.append(gcsfs.GCSFileSystem())
    return _GCS[0]
