"""Hugging Face checkpoints in and out: `from_pretrained`, `save_pretrained`, `PretrainedModel`.

    model = from_pretrained("path/to/hf_dir")            # config.json + model.safetensors
    out = model(input_ids=ids, attention_mask=mask)      # HF argument and output names
    save_pretrained(model, "path/to/out")                # transformers loads it back unchanged

Formats read: an HF model directory (`config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` / its index when torch is installed).
Formats written:

* HF directory: `config.json` (the config's HF fields, `architectures`, `model_type`,
  `torch_dtype: float32`, `transformers_version`) and float32 `model.safetensors` (sharded with an
  index above `max_shard_size`), tied weights stored once as transformers stores them.
* Params-only Orbax export (`convert_hf_to_orbax`): `<dir>/params` (our param tree, Orbax
  `StandardCheckpointer`, via `checkpoint.save_params`) and `<dir>/config.json` (the same HF config
  as above, so the family, head and sizes are known without the trainer's config).

`export_orbax_to_hf` reads either a params-only export or a trainer checkpoint
(`<workdir>/checkpoints/<step>/state` + `<workdir>/config.json`, see
`load_params_from_checkpoint`) and writes an HF directory.
"""

from __future__ import annotations

import errno
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xformers_jax import convert
from xformers_jax.config_lib import UserError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
PARAMS_DIR = "params"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' default "5GB"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: bad JSON, corrupt weights, unsupported architecture."""


# ==================================================================================================
# The model wrapper.
# ==================================================================================================


class PretrainedModel:
    """A Flax head module with its config and params, called like a transformers model.

    Attributes:
      config: the family's frozen config dataclass.
      module: the (unbound) Flax head module, e.g. `XLMRobertaForMaskedLM(config)`.
      params: our param tree (plain arrays, no logical-partitioning boxes).
      architecture: the transformers class name, e.g. `'XLMRobertaXLForMaskedLM'`.
      mesh: the mesh the params are sharded over, or None (one device).
      collections: variables outside `params` the module reads, e.g. BatchNorm running statistics
        `{'batch_stats': ...}` (empty for most families); passed to `apply`, never updated.
    """

    def __init__(
        self,
        config: Any,
        module: Any,
        params: Any,
        architecture: str,
        mesh: Any = None,
        rules: Sequence | None = None,
        collections: Mapping[str, Any] | None = None,
    ):
        self.config = config
        self.collections = dict(collections or {})
        self.module = module
        self.params = params
        self.architecture = architecture
        self.mesh = mesh
        self.rules = rules
        self._fns: dict[tuple, Any] = {}
        self.decoding_cache: Any = None  # generate()'s compiled functions (decoding.DecodingCache)

    def __repr__(self) -> str:
        return (
            f"PretrainedModel({self.architecture}, {self.num_params / 1e6:.2f}M params, "
            f"dtype={getattr(self.config, 'dtype', '?')})"
        )

    @property
    def num_params(self) -> int:
        import jax

        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def __call__(self, *args, dropout_rng: Any = None, **kwargs) -> Any:
        """Runs the module under a cached `jax.jit`, with transformers' argument names.

        Array arguments (numpy, jax, nested lists, torch tensors) become jax arrays; python
        bools, numbers, strings and None (`output_hidden_states=True`, ...) are static, one compiled
        function per combination. Positional args fill the module's parameters in order.

        Args:
          *args: positional inputs, e.g. `input_ids` `[batch, length]`.
          dropout_rng: a PRNG key, required with `deterministic=False` (dropout on).
          **kwargs: the head's inputs, e.g. `attention_mask` `[batch, length]`, `labels`.

        Returns:
          The head's output dataclass (`MaskedLMOutput`, ...) with HF field names.
        """
        kwargs = self._bind_positional(args, kwargs)
        static, arrays = _split_inputs(kwargs)
        if static.get("deterministic") is False and dropout_rng is None:
            raise ValueError(
                "deterministic=False (dropout on) needs dropout_rng=jax.random.key(...)"
            )
        key = tuple(sorted(static.items()))
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._jit(dict(static))
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        if self.mesh is None:
            return fn(self.params, self.collections, arrays, rngs)
        import flax.linen as nn
        import jax

        from xformers_jax import sharding

        rules = sharding.DEFAULT_RULES if self.rules is None else self.rules
        # jax >= 0.7 spells the mesh context `jax.set_mesh`; older versions use the Mesh itself.
        mesh_context = jax.set_mesh(self.mesh) if hasattr(jax, "set_mesh") else self.mesh
        with mesh_context, nn.logical_axis_rules(rules):
            return fn(self.params, self.collections, arrays, rngs)

    def _bind_positional(self, args: tuple, kwargs: dict) -> dict:
        if not args:
            return kwargs
        names = [
            n
            for n, p in inspect.signature(type(self.module).__call__).parameters.items()
            if n != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(args) > len(names):
            raise TypeError(f"{self.architecture} takes at most {len(names)} positional inputs")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{name} given both positionally and by keyword")
            kwargs[name] = value
        return kwargs

    def _jit(self, static: dict[str, Any]) -> Any:
        import jax

        module = self.module

        def run(params, collections, arrays, rngs):
            variables = {"params": params, **collections}
            return module.apply(variables, **arrays, **static, rngs=rngs)

        return jax.jit(run)

    def generate(self, input_ids: Any, **kwargs) -> Any:
        """Autoregressive decoding (greedy / sampling / beam search) for heads that generate.

        Heads that can generate set the class attribute `can_generate = True` (MT5, XLNet,
        causal LMs); the decoding itself lives in `xformers_jax.decoding`.

        Raises:
          TypeError: this head does not generate (encoders such as masked LMs).
        """
        if not getattr(type(self.module), "can_generate", False):
            raise TypeError(
                f"{self.architecture} does not support generate(); use a generative head "
                "(e.g. MT5ForConditionalGeneration, XLNetLMHeadModel, a *ForCausalLM)"
            )
        try:
            from xformers_jax import decoding
        except ImportError as e:
            raise ImportError(f"generate() needs xformers_jax.decoding: {e}") from e
        return decoding.generate(self, input_ids, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Same as `save_pretrained(self, path, **kwargs)`."""
        save_pretrained(self, path, **kwargs)


def _to_array(x: Any) -> Any:
    import jax.numpy as jnp

    if type(x).__module__.split(".")[0] == "torch":  # duck-typed: torch is never imported here
        x = x.detach().cpu()
        x = x.float() if str(x.dtype) == "torch.bfloat16" else x
        x = x.numpy()
    return jnp.asarray(x)


def _split_inputs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(static python values, array pytrees) of a call's keyword arguments."""
    import jax

    static, arrays = {}, {}
    for k, v in kwargs.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            static[k] = v
        elif isinstance(v, (tuple, dict)):  # e.g. past_key_values: a pytree of arrays
            arrays[k] = jax.tree.map(_to_array, v)
        else:
            arrays[k] = _to_array(v)
    return static, arrays


# ==================================================================================================
# Reading HF directories.
# ==================================================================================================


def _not_found(what: str, path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, what, path)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of an HF model directory as a dict.

    Raises:
      FileNotFoundError: the directory or its config.json does not exist (naming the path).
      CheckpointError: config.json is not a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _not_found("No such checkpoint directory", path)
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise _not_found("No config.json in the checkpoint directory", file)
    return _read_json(file)


def _read_json(file: str) -> dict[str, Any]:
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
            weight_map = _read_json(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{os.path.join(path, index)} has no weight_map")
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not os.path.isfile(f):
                    raise _not_found(f"Shard named by {index} is missing", f)
            return files
    raise _not_found(
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
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
    }  # fmt: skip
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
# from_pretrained
# ==================================================================================================


def resolve(
    hf_config: Mapping[str, Any], head: str | None = None, source: str = "config.json"
) -> tuple[Any, str]:
    """(our config, HF architecture name) for an HF config dict and an optional head.

    The head is `head`, else config.json's `architectures[0]`, else the family's default; it is
    normalised to the class name transformers uses for the config's `model_type`.

    Raises:
      CheckpointError: no or unknown `model_type`, or an architecture the family lacks.
    """
    from xformers_jax.models import family_for_model_type

    model_type = hf_config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{source} has no model_type")
    try:
        family = family_for_model_type(model_type)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    archs = hf_config.get("architectures") or [family.default_head]
    architecture = head or archs[0]
    if architecture not in family.heads:
        where = "head=" if head else f"{source} architectures"
        raise CheckpointError(
            f"unknown architecture {architecture!r} (from {where}) for model_type "
            f"{model_type!r}; supported: {sorted(family.heads)}"
        )
    try:
        config = family.config_cls().from_hf_config(dict(hf_config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    return config, convert.hf_architecture(config, architecture)


def _dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def _with_overrides(config: Any, dtype: Any, hf_compat: bool, overrides: dict[str, Any]) -> Any:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CheckpointError(
            f"unknown config fields {unknown} for {type(config).__name__}; known: {sorted(fields)}"
        )
    kw = dict(overrides)
    if dtype is not None:
        kw["dtype"] = _dtype_name(dtype)
    if "hf_compat" in fields:
        kw["hf_compat"] = hf_compat
    elif hf_compat:
        log.info("%s has no HF defect to reproduce; hf_compat has no effect", type(config).__name__)
    return dataclasses.replace(config, **kw) if kw else config


def from_pretrained(
    path: str | os.PathLike,
    head: str | None = None,
    dtype: Any = None,
    mesh: Any = None,
    hf_compat: bool = False,
    *,
    rules: Sequence | None = None,
    **config_overrides: Any,
) -> PretrainedModel:
    """Loads a local HF-format directory (never downloads).

    Args:
      path: a directory with `config.json` and `model.safetensors` (or a sharded index, or
        `pytorch_model.bin` when torch is installed).
      head: transformers class name of the head to build, e.g. `'XLMRobertaXLForMaskedLM'`;
        default: config.json's `architectures[0]`. A base-model head loads a head checkpoint
        (dropping the head's weights) and a head missing from the checkpoint that transformers
        would also initialise fresh (pooler, classifiers) is initialised and logged.
      dtype: compute dtype (`'bfloat16'`, `jnp.bfloat16`, ...); params keep `param_dtype`.
      mesh: a `jax.sharding.Mesh`: params are placed with the shardings of their logical axis names
        (`sharding.logical_shardings`); calls then run on that mesh. None: the default device.
      hf_compat: reproduce transformers' known defects where the family has any (see README).
      rules: logical-axis rules for `mesh` (default `sharding.DEFAULT_RULES`).
      **config_overrides: config fields to change, e.g. `remat_policy='full'`,
        `attention_probs_dropout_prob=0.0`.

    Returns:
      A `PretrainedModel`.

    Raises:
      FileNotFoundError: no such directory, no config.json, no weights.
      CheckpointError: invalid config.json, unknown model_type / architecture, corrupt weights.
      ConversionError: missing, unexpected or mis-shaped tensors (each named, with both shapes).
    """
    path = os.fspath(path)
    hf_config = read_hf_config(path)
    config, architecture = resolve(hf_config, head, source=os.path.join(path, CONFIG_NAME))
    config = _with_overrides(config, dtype, hf_compat, config_overrides)
    architecture = convert.hf_architecture(config, architecture)  # overrides may change the variant
    state_dict = load_state_dict(path)
    return from_state_dict(state_dict, config, architecture, mesh=mesh, rules=rules)


def from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: Any,
    architecture: str,
    mesh: Any = None,
    rules: Sequence | None = None,
) -> PretrainedModel:
    """A `PretrainedModel` from HF tensors already in memory (see `from_pretrained`)."""
    shapes = convert.abstract_params(config, architecture)
    params = convert.hf_to_params(state_dict, config, architecture, shapes)
    convert.check_tree(params, shapes)
    collections = convert.hf_to_collections(state_dict, config, architecture)
    return _build(params, config, architecture, mesh, rules, collections)


def _build(
    params: Any, config: Any, architecture: str, mesh: Any, rules: Any, collections: Any = None
) -> PretrainedModel:
    import jax
    import jax.numpy as jnp

    params = place_params(params, config, architecture, mesh, rules)
    # Non-param collections (BatchNorm statistics) are small: replicated / default device.
    collections = jax.tree.map(jnp.asarray, dict(collections or {}))
    module = convert.init_module(config, architecture)
    return PretrainedModel(
        config, module, params, architecture, mesh=mesh, rules=rules, collections=collections
    )


def place_params(
    params: Any, config: Any, architecture: str, mesh: Any = None, rules: Sequence | None = None
) -> Any:
    """Host params -> device arrays in the config's `param_dtype`.

    With a mesh each array is built from its shards (`make_array_from_callback`), so a host only
    transfers what its devices hold and multi-host meshes work.
    """
    import jax
    import jax.numpy as jnp

    from xformers_jax.models.base import dtype_from_name

    pdtype = np.dtype(dtype_from_name(getattr(config, "param_dtype", "float32")))

    def cast(x):
        x = np.asarray(x)
        return x.astype(pdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    params = jax.tree.map(cast, params)
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    from xformers_jax import sharding

    boxed = convert.abstract_params(config, architecture, boxed=True)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
        params,
        shardings,
    )


# ==================================================================================================
# save_pretrained
# ==================================================================================================


def hf_config_dict(config: Any, architecture: str) -> dict[str, Any]:
    """The config.json transformers expects for `config` and head `architecture`."""
    d = dict(config.to_hf_config())
    d["architectures"] = [convert.hf_architecture(config, architecture)]
    d["model_type"] = config.model_type
    d["torch_dtype"] = "float32"
    try:
        d["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return d


def _to_host(x: Any) -> np.ndarray:
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save_pretrained(
    model: PretrainedModel, path: str | os.PathLike, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> None:
    """Writes `model` as an HF directory that transformers' `from_pretrained` loads unchanged.

    Files: `config.json` and float32 `model.safetensors` (or `model-0000k-of-0000n.safetensors`
    shards plus `model.safetensors.index.json` above `max_shard_size` bytes). Tied weights are
    written once, as transformers writes them. The files are written to a temporary directory
    beside `path` first: a new `path` appears complete or not at all; into an existing `path`
    each file is replaced atomically (other files, e.g. a tokenizer, are kept; stale weight
    files that would shadow the new ones are removed). On multi-host runs every process must
    call this (arrays are gathered), process 0 writes.

    Args:
      model: a `PretrainedModel`.
      path: the output directory.
      max_shard_size: the largest shard in bytes.
    """
    import jax
    import jax.numpy as jnp

    path = os.path.abspath(os.fspath(path))
    params = jax.tree.map(_to_host, model.params)
    state = convert.params_to_hf(params, model.config, model.architecture)
    collections = jax.tree.map(_to_host, getattr(model, "collections", {}))
    state.update(convert.collections_to_hf(collections, model.config, model.architecture))
    # float32 whatever param_dtype was (jnp.issubdtype also knows ml_dtypes' bfloat16).
    state = {
        k: np.ascontiguousarray(v, np.float32 if jnp.issubdtype(v.dtype, jnp.floating) else None)
        for k, v in state.items()
    }
    if jax.process_index() != 0:
        return
    config = hf_config_dict(model.config, model.architecture)
    _write_hf_dir(path, config, state, max_shard_size)


def _shards(state: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    return shards


def _write_hf_dir(
    path: str, config: dict[str, Any], state: Mapping[str, np.ndarray], max_shard_size: int
) -> None:
    from safetensors.numpy import save_file

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        shards = _shards(state, max_shard_size)
        names = [SAFE_WEIGHTS] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]  # fmt: skip
        for name, shard in zip(names, shards):
            # transformers refuses safetensors files without a "format" entry.
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
                "weight_map": {k: n for n, s in zip(names, shards) for k in sorted(s)},
            }
            _dump_json(index, os.path.join(tmp, SAFE_INDEX))
        _dump_json(config, os.path.join(tmp, CONFIG_NAME))
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


def _dump_json(obj: Any, file: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ==================================================================================================
# Orbax: params-only exports and trainer checkpoints.
# ==================================================================================================


def convert_hf_to_orbax(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, head: str | None = None
) -> None:
    """HF directory -> params-only Orbax export (`out_dir/params` + `out_dir/config.json`).

    Raises:
      FileExistsError: `out_dir` already holds an export.
      (and everything `from_pretrained` raises)
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(os.path.join(out_dir, PARAMS_DIR)):
        raise FileExistsError(errno.EEXIST, "An Orbax export already exists", out_dir)
    model = from_pretrained(hf_dir, head=head)
    save_orbax(model, out_dir)


def save_orbax(model: PretrainedModel, out_dir: str | os.PathLike) -> None:
    """Writes the params-only export format (see the module docstring)."""
    from xformers_jax import checkpoint

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save_params(out_dir, model.params)
    tmp = os.path.join(out_dir, f".{CONFIG_NAME}.tmp")
    _dump_json(hf_config_dict(model.config, model.architecture), tmp)
    os.replace(tmp, os.path.join(out_dir, CONFIG_NAME))


def _cpu_abstract(shapes: Any) -> Any:
    """Restore targets on the host CPU device: exports are read to be written out again."""
    import jax

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), shapes)


def load_orbax(checkpoint_dir: str | os.PathLike, step: int | None = None) -> PretrainedModel:
    """A `PretrainedModel` (on the host CPU) from a params-only export or a trainer checkpoint.

    Args:
      checkpoint_dir: a params-only export (`params/` + `config.json`), or anything
        `load_params_from_checkpoint` accepts.
      step: for trainer checkpoints, the step (default: the latest).
    """
    from xformers_jax import checkpoint

    path = os.path.abspath(os.fspath(checkpoint_dir))
    if not os.path.isdir(path):
        raise _not_found("No such checkpoint directory", path)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        config, architecture = resolve(read_hf_config(path), source=os.path.join(path, CONFIG_NAME))
        shapes = convert.abstract_params(config, architecture)
        params = checkpoint.load_params(path, _cpu_abstract(shapes))
    else:
        params, config, architecture = load_params_from_checkpoint(path, step)
        shapes = convert.abstract_params(config, architecture)
    convert.check_tree(params, shapes)
    module = convert.init_module(config, architecture)
    # Params-only exports hold params only: other collections (BatchNorm statistics) take their
    # init values; a trainer checkpoint also has them (`TrainState.model_state`).
    collections = convert.hf_to_collections({}, config, architecture)
    if collections and not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        _, step_dir = _locate_trainer_checkpoint(path, step)
        saved = checkpoint.load_model_state(os.path.join(step_dir, "state"), collections)
        collections = {**collections, **saved}
    return PretrainedModel(config, module, params, architecture, collections=collections)


def export_orbax_to_hf(checkpoint_dir: str | os.PathLike, hf_out: str | os.PathLike) -> None:
    """Params-only export or trainer checkpoint -> HF directory (`save_pretrained`)."""
    save_pretrained(load_orbax(checkpoint_dir), hf_out)


def _steps(ckpt_dir: str) -> list[int]:
    # Orbax finalises a step by renaming its tmp dir to the bare step number.
    return sorted(
        int(n)
        for n in os.listdir(ckpt_dir)
        if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state"))
    )


def _locate_trainer_checkpoint(path: str, step: int | None) -> tuple[str, str]:
    """(workdir, step dir) for a workdir, its `checkpoints/` dir, or one `<step>/` dir."""
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(os.path.dirname(path)), path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        workdir, ckpt_dir = path, os.path.join(path, "checkpoints")
    elif any(n.isdigit() for n in os.listdir(path)):
        workdir, ckpt_dir = os.path.dirname(path), path
    else:
        raise _not_found(
            "Neither a params-only export (params/ + config.json) nor a trainer workdir "
            "(checkpoints/<step>/state)",
            path,
        )
    steps = _steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no step {step} in {ckpt_dir}; steps: {steps}")
    return workdir, os.path.join(ckpt_dir, str(step))


def load_params_from_checkpoint(
    checkpoint_dir: str | os.PathLike, step: int | None = None
) -> tuple[Any, Any, str]:
    """Our params, config and head from a trainer checkpoint, on the host CPU.

    The trainer (`train.py` via `checkpoint.Checkpointer`) writes `<workdir>/config.json` (the
    resolved run config: `task`, and `model` with `family`, `preset` and field overrides) and
    Orbax step directories `<workdir>/checkpoints/<step>/` whose item `state` is the `TrainState`
    (`step`, `params`, `opt_state`, `extra`). Only `state.params` is read (a partial restore: the
    optimizer state never leaves the disk).

    Args:
      checkpoint_dir: the workdir, its `checkpoints/` directory, or one `<step>/` directory.
      step: which step (default: the latest complete one; ignored for a `<step>/` directory).

    Returns:
      `(params, config, architecture)`: plain arrays in our layout, the family config, and the
      transformers class name of the trained head.
    """
    import jax
    import orbax.checkpoint as ocp

    from xformers_jax.models import build_model

    path = os.path.abspath(os.fspath(checkpoint_dir))
    workdir, step_dir = _locate_trainer_checkpoint(path, step)
    run_file = os.path.join(workdir, CONFIG_NAME)
    if not os.path.isfile(run_file):
        raise _not_found("No run config next to the checkpoints", run_file)
    run = _read_json(run_file)
    if not isinstance(run.get("model"), dict) or "family" not in run["model"]:
        raise CheckpointError(f"{run_file} has no model.family: not a trainer config")
    try:
        _, config, architecture = build_model(run["model"], task=run.get("task", "mlm"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_file}: {e}") from None
    target = _cpu_abstract(convert.abstract_params(config, architecture))
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target,
    )
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args={"params": restore_args},
                partial_restore=True,
            ),
        )
    return restored["params"], config, architecture
