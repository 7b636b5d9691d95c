"""Tensors that are read (or written) a slice at a time: how a checkpoint moves without the model.

A `Lazy` tensor knows its shape and dtype and reads any box of itself (`read(index)`, a tuple of
slices, as `jax.make_array_from_callback` asks for a device's shard). Three kinds:

- `ArrayRef`: an array already in memory (state dicts handed to us as numpy).
- file tensors (`hf_files`): one tensor of a safetensors file, read by byte ranges, or of a
  `.bin` shard, read through torch's mmap.
- `ParamPlan`: one param of ours (scan layout) made from HF tensors by a `param_map.Rule`: a box of
  it reads only the box of each per-layer HF tensor it needs (a row range of a torch Linear
  weight when the box is contiguous in HF's layout, else that one HF tensor), transposed and
  cast per slice.

`place` puts a tree of them onto shardings device by device (each host reads what its devices
hold, one shard at a time), so host memory beyond the placed model stays a shard plus one HF
tensor, whatever the model's size.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Index = tuple[slice, ...]


class Lazy:
    """A tensor read on demand. Subclasses set `shape`, `dtype` and implement `_read`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def read(self, index: Any = None) -> np.ndarray:
        """The box `index` (a tuple of slices, None: everything) as a numpy array."""
        return self._read(normalize(index, self.shape))

    def _read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.read()
        return x if dtype is None else x.astype(dtype)

    def copy(self) -> Lazy:
        return self  # read-only: a copy is the same tensor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shape}, {np.dtype(self.dtype).name})"


def is_lazy(x: Any) -> bool:
    return isinstance(x, Lazy)


def is_float(dtype: Any) -> bool:
    """Floating, bfloat16 included (numpy alone does not know ml_dtypes' floats)."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


def normalize(index: Any, shape: Sequence[int]) -> Index:
    """A full tuple of `slice(start, stop)` (step 1) for `index` (None, slices, a short tuple)."""
    if index is None:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    out = []
    for k, n in enumerate(shape):
        s = index[k] if k < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided reads are not supported: {s}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def box_shape(index: Index) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


def flat_range(index: Index, shape: Sequence[int]) -> tuple[int, int] | None:
    """`(start, stop)` of the C-order flat positions a box covers, when they are contiguous."""
    if not index:
        return (0, 1)
    lengths = box_shape(index)
    if 0 in lengths:
        return (0, 0)
    first = int(np.ravel_multi_index([s.start for s in index], shape))
    last = int(np.ravel_multi_index([s.stop - 1 for s in index], shape))
    return (first, last + 1) if last + 1 - first == math.prod(lengths) else None


@dataclasses.dataclass(eq=False, repr=False)
class ArrayRef(Lazy):
    """An in-memory array, read box by box."""

    array: np.ndarray

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.shape = tuple(self.array.shape)
        self.dtype = self.array.dtype

    def _read(self, index: Index) -> np.ndarray:
        return self.array[index]


# --------------------------------------------------------------------------------------------------
# One param of ours from HF tensors.
# --------------------------------------------------------------------------------------------------

# Axis permutations of `param_map`'s conv kinds: ours axis j is HF axis _CONV_TO_OURS[j].
_CONV_TO_OURS = {"conv": (2, 3, 1, 0), "conv_transpose": (2, 3, 0, 1)}


def read_as_ours(rule: Any, src: Lazy, shape: tuple[int, ...], index: Index) -> np.ndarray:
    """The box `index` of our (per-layer) param of `shape`, read from the HF tensor `src`.

    Only the HF region the box maps to is read where that region is a box of the HF tensor
    (copies, conv kernels, row ranges of a Linear weight and contiguous biases); otherwise the one
    HF tensor is read and converted whole.
    """
    from xformers_jax.convert import param_map as pm

    want = box_shape(index)
    if rule.kind == "copy":
        return np.asarray(src.read(index))
    if rule.kind in _CONV_TO_OURS:
        perm = _CONV_TO_OURS[rule.kind]
        hf_index = [slice(None)] * len(perm)
        for j, a in enumerate(perm):
            hf_index[a] = index[j]
        return np.transpose(src.read(tuple(hf_index)), perm)
    if rule.kind == "bias":
        rng = flat_range(index, shape)
        if rng is not None:
            return np.asarray(src.read((slice(*rng),))).reshape(want)
    if rule.kind == "linear":
        rin = flat_range(index[: rule.n_in], shape[: rule.n_in])
        rout = flat_range(index[rule.n_in :], shape[rule.n_in :])
        if rin is not None and rout is not None:
            return np.asarray(src.read((slice(*rout), slice(*rin)))).T.reshape(want)
    return pm.to_ours(rule, src.read(), shape)[index]


def fresh_values(rule: Any, shape: tuple[int, ...], std: float, seed: Sequence[int]) -> np.ndarray:
    """A fresh init of `rule.init` kind (`normal` / `zeros` / `ones`), deterministic in `seed`."""
    if rule.init == "normal":
        rng = np.random.default_rng(list(seed))
        return rng.normal(0.0, std, size=shape).astype(np.float32)
    return (np.ones if rule.init == "ones" else np.zeros)(shape, np.float32)


def path_seed(path: Sequence[str]) -> int:
    return zlib.crc32("/".join(path).encode())


@dataclasses.dataclass(eq=False, repr=False)
class ParamPlan(Lazy):
    """Our param at `rule.path` (full `shape`, the scan layout when stacked) from HF tensors.

    Attributes:
      rule: the `param_map.Rule`.
      shape: our param's shape (`[num_layers, ...]` when stacked).
      sources: per layer (one entry when not stacked): the HF tensors holding it (the first, then
        tied aliases that must hold the same values), or None where it is initialised fresh.
      std: the std of a `normal` fresh init.
      dtype: what `read` returns (the HF dtype until `astype`).
    """

    rule: Any
    shape: tuple[int, ...]
    sources: list[list[Lazy] | None]
    std: float = 0.02
    dtype: Any = None
    names: list[list[str] | None] | None = None

    def __post_init__(self):
        if self.dtype is None:
            found = [s[0].dtype for s in self.sources if s]
            self.dtype = np.dtype(found[0] if found else np.float32)

    @property
    def stacked(self) -> bool:
        return self.rule.stacked

    @property
    def fresh(self) -> bool:
        """Nothing of it is in the checkpoint: it is initialised (`rule.init`)."""
        return all(s is None for s in self.sources)

    def astype(self, dtype: Any) -> ParamPlan:
        return dataclasses.replace(self, dtype=np.dtype(dtype))

    def _read(self, index: Index) -> np.ndarray:
        if not self.stacked:
            return self._layer(0, index)
        out = np.empty(box_shape(index), self.dtype)
        for j, i in enumerate(range(index[0].start, index[0].stop)):
            out[j] = self._layer(i, index[1:])
        return out

    def _layer(self, i: int, index: Index) -> np.ndarray:
        from xformers_jax.convert.param_map import ConversionError, path_str

        per_layer = self.shape[1:] if self.stacked else self.shape
        srcs = self.sources[i]
        if srcs is None:
            seed = (path_seed(self.rule.path), i)
            x = fresh_values(self.rule, per_layer, self.std, seed)[index]
        else:
            x = read_as_ours(self.rule, srcs[0], per_layer, index)
            for k, alias in enumerate(srcs[1:], 1):
                # Tied weights: we keep one tensor, so every name must hold the same values.
                if not np.array_equal(x, read_as_ours(self.rule, alias, per_layer, index)):
                    names = (self.names or [None] * len(self.sources))[i] or ["?", "?"]
                    raise ConversionError(
                        f"HF tensors {names[0]} and {names[k]} differ, but this model ties them "
                        f"(untied output weights are not supported; our param "
                        f"{path_str(self.rule.path)})"
                    )
        return x.astype(self.dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# Placement onto shardings.
# --------------------------------------------------------------------------------------------------


def _fresh_on_device(plan: ParamPlan, sharding: Any, dtype: Any) -> Any:
    """A fresh param generated on its devices (no host copy, no gather)."""
    import jax
    import jax.numpy as jnp

    shape, kind, std = plan.shape, plan.rule.init, plan.std

    def init():
        if kind == "normal":
            key = jax.random.key(path_seed(plan.rule.path))
            return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)

    return jax.jit(init, out_shardings=sharding)()


def place_one(x: Lazy | np.ndarray, sharding: Any, dtype: Any = None) -> Any:
    """One lazy (or host) tensor as a `jax.Array` with `sharding`, read shard by shard.

    Each distinct box of this process's devices is read once, put on its devices and dropped
    before the next is read: the host holds one shard at a time (plus what reading it needs).
    Floating tensors are cast to `dtype` (when given) as they are read.
    """
    import jax

    if not is_lazy(x):
        x = ArrayRef(np.asarray(x))
    if dtype is not None and is_float(x.dtype):
        x = x.astype(dtype) if isinstance(x, ParamPlan) else _Cast(x, np.dtype(dtype))
    if isinstance(x, ParamPlan) and x.fresh and x.rule.init is not None:
        return _fresh_on_device(x, sharding, x.dtype)
    shape = tuple(x.shape)
    by_box: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        box = normalize(index, shape)
        by_box.setdefault(tuple((s.start, s.stop) for s in box), []).append(device)
    arrays = {}
    for box, devices in by_box.items():
        host = x.read(tuple(slice(a, b) for a, b in box))
        for d in devices:
            arrays[d] = jax.device_put(host, d)
        del host
    ordered = [arrays[d] for d in sharding.addressable_devices_indices_map(shape)]
    out = jax.make_array_from_single_device_arrays(shape, sharding, ordered)
    release_freed_memory()
    return out


_LIBC: list = []


def release_freed_memory() -> None:
    """Hands memory freed by the last shard's reads back to the OS (glibc keeps freed blocks of
    its heap otherwise, and a process's footprint would grow with every param it reads)."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


@dataclasses.dataclass(eq=False, repr=False)
class _Cast(Lazy):
    src: Lazy
    dtype: Any

    def __post_init__(self):
        self.shape = tuple(self.src.shape)

    def _read(self, index: Index) -> np.ndarray:
        return np.asarray(self.src.read(index)).astype(self.dtype, copy=False)


def place(tree: Any, shardings: Any, dtype: Callable[[Any], Any] | Any = None) -> Any:
    """`place_one` over a nested dict of lazy tensors and a matching tree of shardings.

    Args:
      tree: nested dicts whose leaves are `Lazy` tensors or arrays.
      shardings: the same nested dicts of `jax.sharding.Sharding`s.
      dtype: the floating dtype of the placed arrays (one for all, or a function of the leaf's
        path tuple); None keeps each tensor's.
    """
    from xformers_jax.convert.param_map import flatten, unflatten

    flat, sh = flatten(tree), flatten(shardings)
    out = {}
    for path, x in flat.items():
        d = dtype(path) if callable(dtype) else dtype
        out[path] = place_one(x, sh[path], d)
    return unflatten(out)


# --------------------------------------------------------------------------------------------------
# Export: HF tensors gathered from our (sharded) params one at a time.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, repr=False)
class Stored(Lazy):
    """Our param where it lives (a `jax.Array` on its devices, or a host array), to be read one
    layer at a time in `out_dtype` (floating params; None keeps the dtype)."""

    array: Any
    out_dtype: Any = None

    def __post_init__(self):
        self.shape = tuple(self.array.shape)
        src = np.dtype(self.array.dtype)
        self.dtype = np.dtype(self.out_dtype) if self.out_dtype and is_float(src) else src

    def layer(self, i: int | None) -> np.ndarray | None:
        """Layer `i` of the scan axis (None: the whole param) as a host array on process 0;
        None on other processes. Every process must call it (it may gather across hosts)."""
        import jax

        a = self.array
        if not isinstance(a, jax.Array):
            x = np.asarray(a if i is None else a[i])
            return x.astype(self.dtype, copy=False)
        whole, one = _gatherers(a.sharding)
        y = whole(a, self.dtype) if i is None else one(a, np.int32(i), self.dtype)
        if jax.process_index() != 0:
            return None
        # Replicated over the array's devices: process 0 copies its first device's copy.
        return np.asarray(y.addressable_shards[0].data)

    def _read(self, index: Index) -> np.ndarray:
        x = self.layer(None)
        return None if x is None else x[index]


_GATHERERS: dict = {}


def _gatherers(sharding: Any) -> tuple[Any, Any]:
    """Jitted (whole, one layer) reads of an array with `sharding`, replicated over its devices:
    one tensor (a layer of a scanned param) is gathered at a time, cast on the devices first (a
    bfloat16 export moves half the bytes)."""
    import jax
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(sharding, NamedSharding):
        out = NamedSharding(sharding.mesh, PartitionSpec())
    elif len(sharding.device_set) == 1:
        out = sharding
    else:
        devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
        out = NamedSharding(jax.sharding.Mesh(devices, ("all",)), PartitionSpec())
    if out not in _GATHERERS:
        whole = jax.jit(lambda a, dtype: a.astype(dtype), static_argnums=1, out_shardings=out)
        one = jax.jit(
            lambda a, i, dtype: lax.dynamic_index_in_dim(a, i, 0, keepdims=False).astype(dtype),
            static_argnums=2,
            out_shardings=out,
        )
        _GATHERERS[out] = (whole, one)
    return _GATHERERS[out]


@dataclasses.dataclass(eq=False, repr=False)
class HFView(Lazy):
    """One HF tensor (torch layout) of our param `src`: layer `layer` of it (None: all)."""

    src: Stored
    rule: Any
    layer: int | None

    def __post_init__(self):
        from xformers_jax.convert.param_map import hf_shape

        per_layer = self.src.shape[1:] if self.layer is not None else self.src.shape
        self.shape = hf_shape(self.rule, per_layer)
        self.dtype = self.src.dtype

    def _read(self, index: Index) -> np.ndarray | None:
        from xformers_jax.convert.param_map import to_hf

        x = self.src.layer(self.layer)
        return None if x is None else to_hf(self.rule, x)[index]


@dataclasses.dataclass(eq=False, repr=False)
class Zeros(Lazy):
    shape: tuple[int, ...]
    dtype: Any

    def _read(self, index: Index) -> np.ndarray:
        return np.zeros(box_shape(index), self.dtype)
