"""The DALL-E dVAE encoder in JAX: BEiT v1's visual tokenizer.

BEiT v1 labels each 16 px patch of a 224 px image with the code the DALL-E discrete VAE's encoder
gives the matching 8 px cell of a 112 px view of the same crop: the argmax over 8192 logits of a
ResNet of four groups (three 2x max-pools, so the 112 px view gives a 14 x 14 grid of codes).

`load_encoder` reads the `dall_e` package's `encoder.pkl` (a `torch.save`d `Encoder` module, a zip
of `data.pkl` plus raw tensor storages) without torch and without running what the file contains:
its pickle goes through `SafeUnpickler`, which admits only tensors and storages, the dall_e module
classes and the few torch / standard containers a pickled module holds, each built as an inert
stand-in. Anything else (`os.system`, `builtins.eval`, another package's class) refuses the file
with a one-line error. The weights become a pytree of float32 arrays (conv kernels HWIO) and
`encode` is a jitted function of it.

Inputs follow dall_e: pixels in [0, 1], mapped by `map_pixels` (the logit-Laplace epsilon)
before the encoder; `DalleTokenizer.tokenize` does that mapping itself.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax import paths
from xformers_jax.config_lib import UserError

LOGIT_LAPLACE_EPS = 0.1
DOWNSAMPLE = 8  # three 2x max-pools
GROUPS = 4


class UnsafeFileError(UserError, ValueError):
    """A pickle references something other than tensors and the expected classes."""


class EncoderFileError(UserError, ValueError):
    """A file that is not a DALL-E encoder (wrong format, missing weights, bad shapes)."""


def map_pixels(x):
    """dall_e's input mapping: `[0, 1]` pixels -> `[eps, 1 - eps]` (eps = 0.1)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


# ------------------------------------------------------------------------------ safe unpickling


class _Module:
    """An inert stand-in for a pickled `nn.Module`: keeps its class name and its state."""

    type_name = "module"

    def __setstate__(self, state):
        # BUILD: a module's state is its `__dict__` (never call anything the file names).
        if not isinstance(state, dict):
            raise UnsafeFileError(f"{self.type_name} has a non-dict state")
        self.__dict__.update(state)


_MODULE_CLASSES = {
    ("dall_e.encoder", "Encoder"),
    ("dall_e.encoder", "EncoderBlock"),
    ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.linear", "Identity"),
}
_STANDINS = {
    key: type(key[1], (_Module,), {"type_name": f"{key[0]}.{key[1]}"}) for key in _MODULE_CLASSES
}
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "BFloat16Storage": None,  # decoded from uint16 bits below
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


class _StorageType:
    """What `torch.FloatStorage` etc. unpickle to: the dtype of a storage's raw bytes."""

    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *args):
    """`torch._utils._rebuild_tensor_v2` on a numpy storage: a strided view, copied."""
    del args  # requires_grad, backward hooks, metadata
    if not isinstance(storage, np.ndarray):
        raise UnsafeFileError("a tensor refers to something other than a storage")
    item = storage.itemsize
    if any(int(n) < 0 for n in size) or any(int(s) < 0 for s in stride) or offset < 0:
        raise EncoderFileError("a tensor has a negative size, stride or offset")
    if size and (offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size):
        raise EncoderFileError(f"a tensor of shape {tuple(size)} overruns its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, *args):
    del args  # requires_grad, backward hooks (and state, in newer files)
    return data


def _device(*args):
    return "device"


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch-saved DALL-E encoder and nothing else.

    `find_class` is the only way a pickle reaches code; it answers with the stand-ins and tensor
    rebuilders above and refuses every other name. Storages (persistent ids) are read from the
    zip archive as numpy arrays.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, where: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._where = archive, prefix, where
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STANDINS:
            return _STANDINS[(module, name)]
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeFileError(
            f"{self._where}: refusing to load: its pickle references {module}.{name}, which is "
            "neither a tensor nor a DALL-E encoder class (a pickle can run code)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeFileError(f"{self._where}: refusing to load: unknown persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafeFileError(f"{self._where}: refusing to load: a storage of unknown type")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise EncoderFileError(f"{self._where}: storage {key} is missing") from None
            if storage_type.name == "BFloat16Storage":
                bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                arr = np.frombuffer(
                    raw, np.dtype(_STORAGE_DTYPES[storage_type.name]).newbyteorder("<")
                )
            self._storages[key] = arr
        return self._storages[key]


def _unpickle(blob: bytes, where: str) -> Any:
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile:
        raise EncoderFileError(
            f"{where}: not a torch zip archive (the DALL-E encoder.pkl format); legacy or other "
            "pickles are not read"
        ) from None
    names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(names) != 1:
        raise EncoderFileError(f"{where}: no data.pkl in the archive")
    prefix = names[0][: -len("data.pkl")]
    if prefix + "byteorder" in archive.namelist():
        order = archive.read(prefix + "byteorder").decode().strip()
        if order != "little":
            raise EncoderFileError(f"{where}: {order}-endian tensors are not supported")
    try:
        return SafeUnpickler(archive.read(names[0]), archive, prefix, where).load()
    except (UnsafeFileError, EncoderFileError):
        raise
    except Exception as e:  # a malformed pickle: one line, not a traceback
        raise EncoderFileError(
            f"{where}: cannot read its pickle ({type(e).__name__}: {e})"
        ) from None


# ------------------------------------------------------------------------------ weights


def _children(module: _Module, where: str) -> dict[str, Any]:
    modules = module.__dict__.get("_modules")
    if not isinstance(modules, dict):
        raise EncoderFileError(f"{where}: {module.type_name} has no submodules")
    return modules


def _conv(module: Any, where: str, name: str) -> dict[str, np.ndarray]:
    if not isinstance(module, _STANDINS[("dall_e.utils", "Conv2d")]):
        raise EncoderFileError(f"{where}: {name} is not a dall_e Conv2d")
    params = module.__dict__.get("_parameters", {})
    w, b = params.get("w"), params.get("b")
    if not isinstance(w, np.ndarray) or not isinstance(b, np.ndarray) or w.ndim != 4:
        raise EncoderFileError(f"{where}: {name} lacks its weights")
    if w.shape[0] != b.shape[0] or w.shape[2] != w.shape[3] or w.shape[2] % 2 != 1:
        raise EncoderFileError(f"{where}: {name} has weights {w.shape} and bias {b.shape}")
    # [out, in, kh, kw] -> HWIO
    return {
        "w": np.ascontiguousarray(w.transpose(2, 3, 1, 0), np.float32),
        "b": b.astype(np.float32),
    }


def _encoder_params(root: Any, where: str) -> tuple[dict, dict]:
    if not isinstance(root, _STANDINS[("dall_e.encoder", "Encoder")]):
        got = getattr(root, "type_name", type(root).__name__)
        raise EncoderFileError(f"{where}: holds a {got}, not a dall_e Encoder")
    blocks = _children(_children(root, where).get("blocks") or _Module(), where)
    params: dict[str, Any] = {"input": _conv(blocks.get("input"), where, "blocks.input")}
    n_layers = None
    for g in range(1, GROUPS + 1):
        group = blocks.get(f"group_{g}")
        if group is None:
            raise EncoderFileError(f"{where}: blocks.group_{g} is missing")
        params[f"group_{g}"] = {}
        for bname, block in _children(group, where).items():
            if not bname.startswith("block_"):
                continue
            sub = _children(block, where)
            res = _children(sub["res_path"], where)
            p = {
                f"conv_{i}": _conv(res.get(f"conv_{i}"), where, f"{bname}.conv_{i}")
                for i in (1, 2, 3, 4)
            }
            if isinstance(sub.get("id_path"), _STANDINS[("dall_e.utils", "Conv2d")]):
                p["id_path"] = _conv(sub["id_path"], where, f"{bname}.id_path")
            n_layers = block.__dict__.get("n_layers", n_layers)
            params[f"group_{g}"][bname] = p
        if not params[f"group_{g}"]:
            raise EncoderFileError(f"{where}: blocks.group_{g} has no blocks")
    output = _children(blocks.get("output") or _Module(), where)
    params["output"] = _conv(output.get("conv"), where, "blocks.output.conv")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise EncoderFileError(f"{where}: the encoder blocks do not record n_layers")
    info = {
        "vocab_size": int(params["output"]["w"].shape[-1]),
        "input_channels": int(params["input"]["w"].shape[2]),
        "n_hid": int(params["input"]["w"].shape[-1]),
        "post_gain": 1.0 / n_layers**2,
    }
    return params, info


def load_encoder(path: str) -> tuple[dict, dict]:
    """Reads a DALL-E `encoder.pkl` (local or gs://) safely.

    Returns:
      `(params, info)`: a pytree of float32 numpy arrays (conv kernels HWIO) and
      `{'vocab_size', 'input_channels', 'n_hid', 'post_gain'}`.

    Raises:
      UnsafeFileError: the pickle names anything but tensors and the encoder's classes.
      EncoderFileError: not a torch zip archive, or not an encoder.
    """
    where = paths.resolve(path)
    if not paths.exists(where):
        raise EncoderFileError(f"{where}: no such DALL-E encoder file")
    return _encoder_params(_unpickle(paths.read_bytes(where), where), where)


# ------------------------------------------------------------------------------ the encoder


def _conv2d(x: jax.Array, p: dict) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return y + p["b"]


def _block(x: jax.Array, p: dict, post_gain: float) -> jax.Array:
    h = x
    for i in (1, 2, 3, 4):
        h = _conv2d(jax.nn.relu(h), p[f"conv_{i}"])
    shortcut = _conv2d(x, p["id_path"]) if "id_path" in p else x
    return shortcut + post_gain * h


def _max_pool(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def encode(params: dict, x: jax.Array, post_gain: float) -> jax.Array:
    """The encoder's logits.

    Args:
      params: `load_encoder`'s pytree.
      x: float32 `[b, H, W, C]` pixels already `map_pixels`-ed (H, W multiples of 8).
      post_gain: `1 / n_layers**2` (`info['post_gain']`).

    Returns:
      float32 `[b, H/8, W/8, vocab_size]`.
    """
    h = _conv2d(x.astype(jnp.float32), params["input"])
    for g in range(1, GROUPS + 1):
        group = params[f"group_{g}"]
        for name in sorted(group, key=lambda n: int(n.split("_")[1])):
            h = _block(h, group[name], post_gain)
        if g < GROUPS:
            h = _max_pool(h)
    return _conv2d(jax.nn.relu(h), params["output"])


class DalleTokenizer:
    """BEiT v1's visual tokenizer: the code of each 8 px cell of a `[0, 1]` view.

    Args:
      params, info: from `load_encoder`.
      input_size: the side of the view it reads (`8 * grid`; BEiT: 112 for a 14 x 14 grid).
    """

    def __init__(self, params: dict, info: dict, input_size: int):
        if input_size % DOWNSAMPLE:
            raise ValueError(f"input_size must be a multiple of {DOWNSAMPLE}, got {input_size}")
        self.params = jax.tree.map(jnp.asarray, params)
        self.info, self.input_size = info, input_size
        self.vocab_size = info["vocab_size"]
        self._logits = jax.jit(
            lambda p, x: encode(p, map_pixels(jnp.transpose(x, (0, 2, 3, 1))), info["post_gain"])
        )

    @classmethod
    def load(cls, path: str, input_size: int) -> DalleTokenizer:
        return cls(*load_encoder(path), input_size)

    def __repr__(self) -> str:
        return f"DalleTokenizer(vocab_size={self.vocab_size}, input_size={self.input_size})"

    def logits(self, pixels: np.ndarray) -> jax.Array:
        """`[b, C, s, s]` in [0, 1] -> float32 `[b, s/8, s/8, vocab_size]`."""
        x = np.asarray(pixels, np.float32)
        if x.ndim != 4 or x.shape[1] != self.info["input_channels"]:
            raise ValueError(
                f"pixels have shape {x.shape}; expected [batch, {self.info['input_channels']}, "
                "height, width]"
            )
        if x.shape[2] % DOWNSAMPLE or x.shape[3] % DOWNSAMPLE:
            raise ValueError(f"pixels have shape {x.shape}: sides must be multiples of 8")
        return self._logits(self.params, x)

    def tokenize(self, pixels: np.ndarray) -> np.ndarray:
        """`[b, C, s, s]` in [0, 1] -> int32 `[b, (s/8)**2]` codes, row-major."""
        codes = jnp.argmax(self.logits(pixels), axis=-1)
        return np.asarray(codes, np.int32).reshape(codes.shape[0], -1)
