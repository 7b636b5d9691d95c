"""Hugging Face model directories, local or gs://: reading and writing their files, nothing else.

Read: `config.json`; weights from `model.safetensors`, a sharded `model.safetensors.index.json`,
or `pytorch_model.bin` / its index (torch with `weights_only=True`: a file's pickled code never
runs). `open_state_dict` reads only headers and returns lazy tensors (`convert.lazy`): a
safetensors tensor reads a box of itself with one ranged read of the rows it covers (the header
gives every tensor's byte offsets; on gs:// this is an HTTP range request, never a whole-object
download), a `.bin` tensor through torch's mmap of its shard, one shard open at a time.
bfloat16 / float16 stay in their dtype until the caller casts a slice.

Written: `config.json` and `model.safetensors` (sharded with an index above `max_shard_size`) in
float32 or the dtype asked for, streamed tensor by tensor (a tensor is fetched, written and
dropped before the next), atomically for local directories. Tensors are keyed by HF names in
torch layouts; what they mean for our params is `convert`'s business, and the model wrapper is
`hub`'s.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from xformers_jax import paths
from xformers_jax.config_lib import UserError
from xformers_jax.convert import lazy

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' default "5GB"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: bad JSON, corrupt weights, unsupported architecture."""


# ==================================================================================================
# Reading
# ==================================================================================================


def not_found(what: str, path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, what, path)


def has_weights(path: str | os.PathLike) -> bool:
    """Whether `path` holds HF weights (any of `WEIGHT_FILES`)."""
    return any(paths.isfile(paths.join(path, f)) for f in WEIGHT_FILES)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of an HF model directory (local or gs://) as a dict.

    Raises:
      FileNotFoundError: the directory or its config.json does not exist (naming the path).
      CheckpointError: config.json is not a JSON object.
    """
    path = paths.resolve(path)
    file = paths.join(path, CONFIG_NAME)
    if not paths.isfile(file):
        if not paths.isdir(path):
            raise not_found("No such checkpoint directory", path)
        raise not_found("No config.json in the checkpoint directory", file)
    return read_json(file)


def read_json(file: str) -> dict[str, Any]:
    try:
        data = json.loads(paths.read_bytes(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return data


def weight_files(path: str | os.PathLike) -> list[str]:
    """The weight files of an HF directory, in transformers' order of preference.

    `model.safetensors` > `model.safetensors.index.json` (its shards) > `pytorch_model.bin` >
    `pytorch_model.bin.index.json`.

    Raises:
      FileNotFoundError: none of these (or a shard an index names) exists.
    """
    path = paths.resolve(path)
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (TORCH_WEIGHTS, TORCH_INDEX)):
        if paths.isfile(paths.join(path, single)):
            return [paths.join(path, single)]
        if paths.isfile(paths.join(path, index)):
            weight_map = read_json(paths.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{paths.join(path, index)} has no weight_map")
            files = [paths.join(path, f) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not paths.isfile(f):
                    raise not_found(f"Shard named by {index} is missing", f)
            return files
    raise not_found(
        f"No weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or {TORCH_INDEX}) in", path
    )


def open_state_dict(path: str | os.PathLike) -> dict[str, lazy.Lazy]:
    """Every tensor of an HF directory (HF names, torch layouts) as a lazy tensor: only the
    files' headers are read here; `tensor.read(index)` reads a box of one tensor.

    Raises:
      FileNotFoundError: no weights (see `weight_files`).
      CheckpointError: a weight file is corrupt, or is a PyTorch file and torch is not installed.
    """
    state: dict[str, lazy.Lazy] = {}
    for file in weight_files(path):
        state.update(_open_torch(file) if file.endswith(".bin") else _open_safetensors(file))
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as numpy arrays in their stored dtype (bfloat16 from
    ml_dtypes). Holds the whole model: loaders use `open_state_dict`."""
    return {k: v.read() for k, v in open_state_dict(path).items()}


# safetensors dtype names <-> numpy dtypes (bfloat16 / float8 from ml_dtypes, a jax dependency).
def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    table = {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    return {k: np.dtype(v) for k, v in table.items()}


@dataclasses.dataclass(eq=False, repr=False)
class SafetensorsTensor(lazy.Lazy):
    """One tensor of a safetensors file: `start` is the absolute byte offset of its data."""

    file: str
    key: str
    start: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def _read(self, index: lazy.Index) -> np.ndarray:
        if not self.shape:
            raw = paths.read_range(self.file, self.start, self.start + self.dtype.itemsize)
            return np.frombuffer(raw, self.dtype).reshape(())
        # Rows [a, b) of the leading axis are one contiguous byte range: read just those.
        a, b = index[0].start, index[0].stop
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if b <= a or row == 0:
            return np.zeros(lazy.box_shape(index), self.dtype)
        rest = (slice(None), *index[1:])
        if all(s.stop - s.start == n for s, n in zip(index[1:], self.shape[1:])):
            return self._rows(a, b, row)[rest]
        # A box narrower than the rows (an embedding sharded on its columns): read the rows in
        # chunks of about _CHUNK bytes and keep the columns, so the raw bytes held stay small.
        out = np.empty(lazy.box_shape(index), self.dtype)
        step = max(1, _CHUNK // row)
        for c in range(a, b, step):
            out[c - a : min(b, c + step) - a] = self._rows(c, min(b, c + step), row)[rest]
        return out

    def _rows(self, a: int, b: int, row: int) -> np.ndarray:
        try:
            raw = paths.read_range(self.file, self.start + a * row, self.start + b * row)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.key} from {self.file}: {e}") from e
        return np.frombuffer(raw, self.dtype).reshape((b - a, *self.shape[1:]))


_CHUNK = 16 << 20  # bytes of rows read at once for a narrow box


def _open_safetensors(file: str) -> dict[str, SafetensorsTensor]:
    """Lazy tensors of a safetensors file, from its header (u64 size, JSON, then the data)."""
    try:
        n = int.from_bytes(paths.read_range(file, 0, 8), "little")
        if not 2 <= n <= 10**9:
            raise ValueError(f"header size {n} is implausible")
        header = json.loads(paths.read_range(file, 8, 8 + n))
        dtypes = _safetensors_dtypes()
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = dtypes[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ValueError(f"{key}: data_offsets do not match its shape and dtype")
            out[key] = SafetensorsTensor(file, key, 8 + n + begin, shape, dtype)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (corrupt or not a safetensors file)") from e


class _TorchFiles:
    """The one `.bin` shard open at a time (torch mmap; a gs:// shard is copied to a temporary
    file first): tensors are read in map order, so shards open one after the other."""

    file: str | None = None
    state: Mapping[str, Any] | None = None
    tmp: Any = None

    @classmethod
    def get(cls, file: str) -> Mapping[str, Any]:
        if cls.file != file:
            cls.close()
            cls.state, cls.tmp = _torch_load(file)
            cls.file = file
        return cls.state

    @classmethod
    def close(cls) -> None:
        cls.file, cls.state = None, None
        if cls.tmp is not None:
            cls.tmp.cleanup()
            cls.tmp = None


def _torch_load(file: str) -> tuple[Mapping[str, Any], Any]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{file} is a PyTorch checkpoint and reading it needs torch (pip install torch); "
            "or save the model with safe_serialization=True"
        ) from None
    tmp, local = None, file
    if paths.is_remote(file):
        tmp = tempfile.TemporaryDirectory()
        local = os.path.join(tmp.name, "shard.bin")
        with paths.open_file(file, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    try:
        try:
            state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # The legacy (pre-zip) format cannot be mapped: it is read whole, one shard at a time.
            state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:
        if tmp is not None:
            tmp.cleanup()
        raise CheckpointError(f"cannot read {file}: {e} (corrupt or not a PyTorch file)") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} does not hold a state dict")
    return state, tmp


def _numpy_dtype(torch_dtype: Any) -> np.dtype:
    import ml_dtypes

    name = str(torch_dtype).removeprefix("torch.")
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


@dataclasses.dataclass(eq=False, repr=False)
class TorchTensor(lazy.Lazy):
    """One tensor of a `.bin` shard, read through torch's mmap of the shard."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def _read(self, index: lazy.Index) -> np.ndarray:
        import torch

        t = _TorchFiles.get(self.file)[self.key].detach()[index].contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits, ml_dtypes' type
            return t.view(torch.int16).numpy().view(self.dtype).copy()
        return t.numpy().copy()


def _open_torch(file: str) -> dict[str, TorchTensor]:
    state = _TorchFiles.get(file)
    return {
        k: TorchTensor(file, k, tuple(v.shape), _numpy_dtype(v.dtype))
        for k, v in state.items()
        if hasattr(v, "shape")
    }


# ==================================================================================================
# Writing
# ==================================================================================================


def split_shards(state: Mapping[str, Any], max_bytes: int) -> list[list[str]]:
    """The keys of `state` cut into shards of at most `max_bytes` each (a larger tensor is one
    shard), in the state's order: tensors of one param stay together."""
    out: list[list[str]] = [[]]
    size = 0
    for k, v in state.items():
        n = int(v.nbytes)
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return out


def _cast(v: Any, dtype: np.dtype | None) -> Any:
    """`v` in `dtype` when it is floating (integer buffers keep theirs)."""
    if dtype is None or not lazy.is_float(v.dtype) or np.dtype(v.dtype) == dtype:
        return v
    if lazy.is_lazy(v):
        return lazy._Cast(v, dtype)
    return np.asarray(v).astype(dtype)


def write_safetensors(file: str, tensors: Mapping[str, Any], write: bool = True) -> None:
    """Streams `tensors` (arrays or lazy tensors) into one safetensors file: the header from their
    shapes and dtypes first, then each tensor fetched, written and dropped in turn.

    With `write=False` the tensors are fetched (every process takes part in gathers) but nothing
    is written.
    """
    names = {v: k for k, v in _safetensors_dtypes().items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires it
    offset = 0
    for k, v in tensors.items():
        n = int(v.nbytes)
        header[k] = {
            "dtype": names[np.dtype(v.dtype)],
            "shape": [int(d) for d in v.shape],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    f = paths.open_file(file, "wb") if write else None
    try:
        if f is not None:
            f.write(len(blob).to_bytes(8, "little") + blob)
        for k, v in tensors.items():
            x = v.read() if lazy.is_lazy(v) else v
            if f is None or x is None:
                continue
            x = np.asarray(x, np.dtype(v.dtype))
            x = x if x.flags.c_contiguous else x.copy()  # (ascontiguousarray makes 0-d 1-d)
            if x.shape != tuple(v.shape):
                raise ValueError(f"{k}: got shape {x.shape}, header says {tuple(v.shape)}")
            f.write(x.reshape(-1).view(np.uint8).data)
            del x
    finally:
        if f is not None:
            f.close()


def write_hf_dir(
    path: str,
    config: dict[str, Any],
    state: Mapping[str, Any],
    max_shard_size: int,
    dtype: Any = None,
    write: bool = True,
) -> None:
    """Writes `config.json` and `state` (safetensors, sharded above `max_shard_size` bytes).

    `state` maps HF keys to arrays or lazy tensors (`convert.lazy`): shards are streamed one
    tensor at a time, so the host holds one tensor, not the model. Floating tensors are written
    in `dtype` (None: as they are). Locally the files go to a temporary directory beside `path`
    first: a new `path` appears complete or not at all; into an existing `path` each file is
    replaced atomically (other files, e.g. a tokenizer, are kept; stale weight files that would
    shadow the new ones are removed). On gs:// every object is uploaded whole, weights before
    `config.json`. `write=False` (processes other than the writer) fetches every tensor so that
    gathers run everywhere, and writes nothing.
    """
    dtype = None if dtype is None else np.dtype(dtype)
    state = {k: _cast(v, dtype) for k, v in state.items()}
    shards = split_shards(state, max_shard_size)
    count = len(shards)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    names = [SAFE_WEIGHTS] if count == 1 else names
    path = paths.resolve(path)
    if not write:
        for shard in shards:
            write_safetensors("", {k: state[k] for k in shard}, write=False)
        return
    index = None
    if count > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
    if paths.is_remote(path):
        return _write_remote(path, config, state, shards, names, index)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        for name, shard in zip(names, shards):
            write_safetensors(os.path.join(tmp, name), {k: state[k] for k in shard})
        if index is not None:
            dump_json(index, os.path.join(tmp, SAFE_INDEX))
        dump_json(config, os.path.join(tmp, CONFIG_NAME))
        written = sorted(os.listdir(tmp))
        if not os.path.exists(path):
            os.rename(tmp, path)
            return
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
        _remove_stale_weights(path, keep=set(written))
        # Weights before config.json: a reader never sees a new config with old weights.
        for name in sorted(written, key=lambda n: n == CONFIG_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_remote(path, config, state, shards, names, index) -> None:
    written = set(names) | {CONFIG_NAME} | ({SAFE_INDEX} if index else set())
    if paths.isdir(path):
        for name in paths.listdir(path):
            if name not in written and _is_weight_file(name):
                log.info("removing stale weight file %s", paths.join(path, name))
                paths.remove(paths.join(path, name))
    for name, shard in zip(names, shards):
        write_safetensors(paths.join(path, name), {k: state[k] for k in shard})
    if index is not None:
        paths.write_text(paths.join(path, SAFE_INDEX), _json_text(index))
    paths.write_text(paths.join(path, CONFIG_NAME), _json_text(config))


def _is_weight_file(name: str) -> bool:
    stale_shard = name.startswith("model-") and name.endswith(".safetensors")
    stale_torch = name.startswith("pytorch_model") and name.endswith((".bin", ".json"))
    return stale_shard or stale_torch or name in (SAFE_INDEX, SAFE_WEIGHTS)


def _remove_stale_weights(path: str, keep: set[str]) -> None:
    for name in os.listdir(path):
        if name not in keep and _is_weight_file(name):
            log.info("removing stale weight file %s", os.path.join(path, name))
            os.remove(os.path.join(path, name))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def dump_json(obj: Any, file: str) -> None:
    paths.write_text(file, _json_text(obj))
