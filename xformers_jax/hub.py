"""The model wrapper: `PretrainedModel`, `from_pretrained`, `save_pretrained`.

    model = from_pretrained("path/to/hf_dir")            # config.json + model.safetensors
    out = model(input_ids=ids, attention_mask=mask)      # HF argument and output names
    save_pretrained(model, "path/to/out")                # transformers loads it back unchanged

An HF model directory (`config.json` plus `model.safetensors`, a sharded index, or
`pytorch_model.bin` when torch is installed) is read and written by `hf_files`; `convert` maps its
tensors to our params and back. `save_pretrained` writes `config.json` (the config's HF fields,
`architectures`, `model_type`, `torch_dtype: float32`, `transformers_version`) and float32
`model.safetensors`, tied weights stored once as transformers stores them. Orbax exports and
trainer checkpoints are `checkpoint`'s.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xformers_jax import convert, hf_files, paths
from xformers_jax.hf_files import CheckpointError

log = logging.getLogger(__name__)


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
        kwargs = self._config_defaults(self._bind_positional(args, kwargs))
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

    def _config_defaults(self, kwargs: dict) -> dict:
        """transformers' config-level defaults for arguments the call leaves out:
        `output_hidden_states` / `output_attentions` from config.json, and `use_cache` (decoders
        and encoder-decoders return `past_key_values` unless told not to, or given labels)."""
        params = inspect.signature(type(self.module).__call__).parameters
        cfg = self.config
        for name in ("output_hidden_states", "output_attentions"):
            if name in params and kwargs.get(name) is None and getattr(cfg, name, False):
                kwargs[name] = True
        decoder = getattr(cfg, "is_decoder", False) or getattr(cfg, "model_type", "") == "mt5"
        if "use_cache" in params and kwargs.get("use_cache") is None and "labels" not in kwargs:
            if decoder and getattr(cfg, "use_cache", False):
                kwargs["use_cache"] = True
        return kwargs

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
        from xformers_jax import decoding

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
        if hasattr(v, "to_legacy_cache"):  # a transformers Cache: its legacy per-layer tuples
            v = tuple(tuple(x for x in layer if x is not None) for layer in v.to_legacy_cache())
        if v is None or isinstance(v, (bool, int, float, str)):
            static[k] = v
        elif isinstance(v, (tuple, dict)):  # e.g. past_key_values: a pytree of arrays
            arrays[k] = jax.tree.map(_to_array, v)
        else:
            arrays[k] = _to_array(v)
    return static, arrays


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
    """Loads an HF-format directory, local or gs:// (never downloads from the hub).

    Nothing is read whole: each param is built shard by shard on its target devices, each shard
    from the slices of the checkpoint's tensors it covers (a row range of a safetensors tensor is
    one ranged read), converted and cast as it is read. Host memory beyond the loaded params stays
    about one shard plus one checkpoint tensor (docs/checkpoints.md has the measurements).

    Args:
      path: a directory (or gs:// URL) with `config.json` and `model.safetensors` (or a sharded
        index, or `pytorch_model.bin` / its index when torch is installed).
      head: transformers class name of the head to build, e.g. `'XLMRobertaXLForMaskedLM'`;
        default: config.json's `architectures[0]`. A base-model head loads a head checkpoint
        (dropping the head's weights) and a head missing from the checkpoint that transformers
        would also initialise fresh (pooler, classifiers) is initialised and logged.
      dtype: compute dtype (`'bfloat16'`, `jnp.bfloat16`, ...); params keep `param_dtype`.
      mesh: a `jax.sharding.Mesh`: params are placed with the shardings of their logical axis names
        (`sharding.logical_shardings`), each host reading only the slices its devices hold; calls
        then run on that mesh. None: the default device.
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
    path = paths.resolve(path)
    hf_config = hf_files.read_hf_config(path)
    source = paths.join(path, hf_files.CONFIG_NAME)
    config, architecture = resolve(hf_config, head, source=source)
    config = _with_overrides(config, dtype, hf_compat, config_overrides)
    architecture = convert.hf_architecture(config, architecture)  # overrides may change the variant
    state_dict = hf_files.open_state_dict(path)
    return from_state_dict(state_dict, config, architecture, mesh=mesh, rules=rules)


def from_state_dict(
    state_dict: Mapping[str, Any],
    config: Any,
    architecture: str,
    mesh: Any = None,
    rules: Sequence | None = None,
) -> PretrainedModel:
    """A `PretrainedModel` from HF tensors: numpy arrays, or lazy tensors read slice by slice as
    they are placed (`hf_files.open_state_dict`; see `from_pretrained`)."""
    shapes = convert.abstract_params(config, architecture)
    params = convert.plan_params(state_dict, config, architecture, shapes)
    convert.check_tree(params, shapes)
    # Non-param collections (BatchNorm statistics) are small: read whole.
    collections = convert.hf_to_collections(state_dict, config, architecture)
    return _build(params, config, architecture, mesh, rules, collections)


def _build(
    params: Any, config: Any, architecture: str, mesh: Any, rules: Any, collections: Any = None
) -> PretrainedModel:
    import jax
    import jax.numpy as jnp

    params = place_params(params, config, architecture, mesh, rules)
    collections = jax.tree.map(jnp.asarray, dict(collections or {}))
    module = convert.init_module(config, architecture)
    return PretrainedModel(
        config, module, params, architecture, mesh=mesh, rules=rules, collections=collections
    )


def param_shardings(
    config: Any, architecture: str, mesh: Any = None, rules: Sequence | None = None
) -> Any:
    """The sharding of every param: by its logical axis names on `mesh`, else the default
    device."""
    import jax

    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, convert.abstract_params(config, architecture))
    from xformers_jax import sharding

    boxed = convert.abstract_params(config, architecture, boxed=True)
    return sharding.logical_shardings(boxed, mesh, rules)


def place_params(
    params: Any, config: Any, architecture: str, mesh: Any = None, rules: Sequence | None = None
) -> Any:
    """Host arrays or lazy params (`convert.plan_params`) -> device arrays in `param_dtype`.

    Each array is built shard by shard (`convert.lazy.place`): a host reads, converts and
    transfers only what its devices hold, one shard at a time, and a lazy param reads only the
    slices of the checkpoint's tensors those shards cover. Fresh params (heads the checkpoint
    lacks) are initialised on their devices.
    """
    from xformers_jax.convert import lazy
    from xformers_jax.models.base import dtype_from_name

    pdtype = np.dtype(dtype_from_name(getattr(config, "param_dtype", "float32")))
    shardings = param_shardings(config, architecture, mesh, rules)
    return lazy.place(params, shardings, pdtype)


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


def to_host(x: Any) -> np.ndarray:
    """A (possibly multi-host sharded) array as one host numpy array; every process must call."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save_pretrained(
    model: PretrainedModel,
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    max_shard_size: int = hf_files.DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Writes `model` as an HF directory that transformers' `from_pretrained` loads unchanged.

    Files: `config.json` (`torch_dtype` = `dtype`) and `model.safetensors` (or
    `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json` above
    `max_shard_size` bytes), floating tensors in `dtype`. Tied weights are written once, as
    transformers writes them. The params stay on their devices: each HF tensor is gathered on its
    own (one layer of a scanned param at a time, cast on the device), written and dropped, so no
    host ever holds the model. Locally the files go to a temporary directory beside `path` first:
    a new `path` appears complete or not at all; into an existing `path` each file is replaced
    atomically (other files, e.g. a tokenizer, are kept; stale weight files that would shadow the
    new ones are removed). On gs:// each object is uploaded whole, `config.json` last. On
    multi-host runs every process must call this (each tensor is gathered once, one at a time;
    process 0 copies it to its host and writes).

    Args:
      model: a `PretrainedModel`.
      path: the output directory (local or gs://).
      dtype: `'float32'` (default), `'bfloat16'` or `'float16'`.
      max_shard_size: the largest shard in bytes.
    """
    import jax

    from xformers_jax.convert import lazy

    out_dtype = _export_dtype(dtype)
    stored = jax.tree.map(lambda a: lazy.Stored(a, out_dtype), model.params)
    state = convert.params_to_hf(stored, model.config, model.architecture)
    # BatchNorm statistics are small and stay float32, as transformers keeps buffers.
    collections = jax.tree.map(to_host, getattr(model, "collections", {}))
    state.update(convert.collections_to_hf(collections, model.config, model.architecture))
    config = hf_config_dict(model.config, model.architecture)
    convert.adjust_hf_config(config, state, model.config, model.architecture)
    config["torch_dtype"] = out_dtype.name
    write = jax.process_index() == 0
    hf_files.write_hf_dir(paths.resolve(path), config, state, max_shard_size, write=write)


_EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _export_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of an export dtype name (or dtype); a one-line error for others."""
    import ml_dtypes

    name = _dtype_name(dtype) if not isinstance(dtype, str) else dtype
    name = name.removeprefix("torch.")
    if name not in _EXPORT_DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; choose one of {_EXPORT_DTYPES}")
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
