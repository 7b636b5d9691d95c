"""Hugging Face model directories on disk: reading and writing their files, nothing else.

Read: `config.json`; weights from `model.safetensors`, a sharded `model.safetensors.index.json`,
or `pytorch_model.bin` / its index (torch with `weights_only=True`: a file's pickled code never
runs). Written: `config.json` and float32 `model.safetensors` (sharded with an index above
`max_shard_size`), atomically. Tensors are numpy arrays keyed by HF names in torch layouts; what
they mean for our params is `convert`'s business, and the model wrapper is `hub`'s.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from xformers_jax.config_lib import UserError

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
    return any(os.path.isfile(os.path.join(os.fspath(path), f)) for f in WEIGHT_FILES)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of an HF model directory as a dict.

    Raises:
      FileNotFoundError: the directory or its config.json does not exist (naming the path).
      CheckpointError: config.json is not a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise not_found("No such checkpoint directory", path)
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise not_found("No config.json in the checkpoint directory", file)
    return read_json(file)


def read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
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
    path = os.fspath(path)
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (TORCH_WEIGHTS, TORCH_INDEX)):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        if os.path.isfile(os.path.join(path, index)):
            weight_map = read_json(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{os.path.join(path, index)} has no weight_map")
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not os.path.isfile(f):
                    raise not_found(f"Shard named by {index} is missing", f)
            return files
    raise not_found(
        f"No weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or {TORCH_INDEX}) in", path
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (HF names, torch layouts) as numpy arrays.

    Raises:
      FileNotFoundError: no weights (see `weight_files`).
      CheckpointError: a weight file is corrupt, or is a PyTorch file and torch is not installed.
    """
    state: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        part = _read_torch(file) if file.endswith(".bin") else _read_safetensors(file)
        state.update(part)
    return state


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(file)
    except TypeError:
        # numpy has no bfloat16: read the raw buffers with ml_dtypes instead.
        return _read_safetensors_raw(file)
    except Exception as e:  # SafetensorError and OSError: say which file, not just "header"
        raise CheckpointError(f"cannot read {file}: {e} (corrupt or not a safetensors file)") from e


# safetensors dtype names -> numpy dtypes (bfloat16 / float8 from ml_dtypes, a jax dependency).
def _safetensors_dtype(name: str) -> np.dtype:
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
    return np.dtype(table[name])


def _read_safetensors_raw(file: str) -> dict[str, np.ndarray]:
    """Reads a safetensors file by its documented layout: u64 header size, JSON header, data."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = _safetensors_dtype(info["dtype"])
            out[key] = np.array(data[start:end].view(dtype).reshape(info["shape"]))
        return out
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e} (corrupt or not a safetensors file)") from e


def _read_torch(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{file} is a PyTorch checkpoint and reading it needs torch (pip install torch); "
            "or save the model with safe_serialization=True"
        ) from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e} (corrupt or not a PyTorch file)") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} does not hold a state dict")
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


# ==================================================================================================
# Writing
# ==================================================================================================


def split_shards(state: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """`state` cut into shards of at most `max_bytes` each (a larger tensor is one shard), in key
    order, as transformers shards."""
    out: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].nbytes
        if out[-1] and size + n > max_bytes:
            out.append({})
            size = 0
        out[-1][k] = state[k]
        size += n
    return out


def write_hf_dir(
    path: str, config: dict[str, Any], state: Mapping[str, np.ndarray], max_shard_size: int
) -> None:
    """Writes `config.json` and `state` (safetensors, sharded above `max_shard_size` bytes).

    The files go to a temporary directory beside `path` first: a new `path` appears complete or
    not at all; into an existing `path` each file is replaced atomically (other files, e.g. a
    tokenizer, are kept; stale weight files that would shadow the new ones are removed).
    """
    from safetensors.numpy import save_file

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        shards = split_shards(state, max_shard_size)
        count = len(shards)
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        names = [SAFE_WEIGHTS] if count == 1 else names
        for name, shard in zip(names, shards):
            # transformers refuses safetensors files without a "format" entry.
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if count > 1:
            index = {
                "metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
                "weight_map": {k: name for name, s in zip(names, shards) for k in sorted(s)},
            }
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


def _remove_stale_weights(path: str, keep: set[str]) -> None:
    for name in os.listdir(path):
        stale_shard = name.startswith("model-") and name.endswith(".safetensors")
        stale_torch = name.startswith("pytorch_model") and name.endswith((".bin", ".json"))
        if name not in keep and (stale_shard or stale_torch or name == SAFE_INDEX):
            log.info("removing stale weight file %s", os.path.join(path, name))
            os.remove(os.path.join(path, name))


def dump_json(obj: Any, file: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
