"""HF <-> ours checkpoint conversion, dispatched through the model registry.

Each family has a module `xformers_jax.convert.<family name>` exposing

  param_map(config, architecture) -> param_map.ParamMap  the name map
  hf_to_params(state_dict, config, architecture, shapes) -> params   (optional) for families
  params_to_hf(params, config, architecture) -> state_dict           with more than one map or
                                                          checks of their own; by default the
                                                          family's map goes through `param_map`
  hf_architecture(config, architecture) -> str           (optional) HF's class name to save as
  example_inputs(config, architecture) -> dict           (optional) kwargs that `init` the head
  adjust_hf_config(hf_config, state, config, architecture)  (optional) edits config.json for state
  hf_to_collections(state_dict, config, architecture) -> {collection: tree}   (optional) variables
  collections_to_hf(collections, config, architecture) -> state_dict          outside `params`,
                                                          e.g. BatchNorm's `batch_stats`

so adding a family adds one file here and its `Family` entry in `models/__init__.py`. The functions
below find that module from the config's `model_type`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from xformers_jax.convert import param_map as pm
from xformers_jax.convert.param_map import ConversionError, ParamMap, Rule, check_tree

__all__ = [
    "ConversionError",
    "ParamMap",
    "Rule",
    "abstract_params",
    "adjust_hf_config",
    "check_tree",
    "collections_to_hf",
    "converter",
    "example_inputs",
    "hf_architecture",
    "hf_to_collections",
    "head_layout",
    "hf_to_params",
    "init_module",
    "params_to_hf",
    "plan_params",
]


def converter(config: Any) -> ModuleType:
    """The convert module of the config's family (found by its `model_type`)."""
    from xformers_jax.models import family_for_model_type

    family = family_for_model_type(config.model_type)
    try:
        return importlib.import_module(f"xformers_jax.convert.{family.name}")
    except ModuleNotFoundError as e:
        if e.name == f"xformers_jax.convert.{family.name}":
            raise ConversionError(f"no HF converter for the {family.name} family yet") from None
        raise


def init_module(config: Any, architecture: str) -> Any:
    """Our (unbound) head module for an HF architecture name, built from `config`."""
    from xformers_jax.models import family_for_model_type

    family = family_for_model_type(config.model_type)
    if architecture not in family.heads:
        raise ValueError(
            f"unknown architecture {architecture!r} for model_type {config.model_type!r}; "
            f"supported: {sorted(family.heads)}"
        )
    return family.head_module(architecture)(config)


def example_inputs(config: Any, architecture: str) -> dict[str, Any]:
    """Smallest inputs that initialise the head (the family may override: images, decoders)."""
    conv = converter(config)
    if hasattr(conv, "example_inputs"):
        return conv.example_inputs(config, architecture)
    return pm.token_inputs(architecture.endswith("ForMultipleChoice"))


def _trace(config: Any, architecture: str) -> Any:
    import jax

    module = init_module(config, architecture)
    inputs = example_inputs(config, architecture)
    # Every collection (params, batch_stats, ...): abstract_params picks `params`.
    return jax.eval_shape(lambda rng: module.init(rng, **inputs), jax.random.key(0))


# Tracing a 3.5B-param init takes seconds; from_pretrained and save both need the shapes.
_cached_trace = functools.lru_cache(maxsize=16)(_trace)


def abstract_params(config: Any, architecture: str, boxed: bool = False) -> Any:
    """Our params as `jax.ShapeDtypeStruct`s (no memory), from `jax.eval_shape` of the init.

    Args:
      config: a family config (frozen dataclass, so it is hashable and the trace is cached).
      architecture: the HF class name of the head.
      boxed: keep the `nn.LogicallyPartitioned` boxes (logical axis names, for shardings).

    Returns:
      The `params` collection as nested dicts.
    """
    import flax.linen as nn

    try:
        hash(config)
    except TypeError:  # a config with dict fields: trace every time
        tree = _trace(config, architecture)["params"]
    else:
        tree = _cached_trace(config, architecture)["params"]
    return tree if boxed else nn.meta.unbox(tree)


def hf_to_collections(
    state_dict: Mapping[str, np.ndarray], config: Any, architecture: str
) -> dict[str, Any]:
    """Variables outside `params` (e.g. `{'batch_stats': ...}`) from HF tensors; `{}` for
    families that have none. Missing tensors take the module's init values (logged)."""
    conv = converter(config)
    if not hasattr(conv, "hf_to_collections"):
        return {}
    return conv.hf_to_collections(state_dict, config, architecture)


def collections_to_hf(
    collections: Mapping[str, Any], config: Any, architecture: str
) -> dict[str, np.ndarray]:
    """The HF tensors of the variables outside `params` (e.g. BatchNorm running stats)."""
    conv = converter(config)
    if not collections or not hasattr(conv, "collections_to_hf"):
        return {}
    return conv.collections_to_hf(collections, config, architecture)


def head_layout(
    config: Any, architecture: str
) -> tuple[tuple[str, ...], frozenset[tuple[str, ...]]]:
    """Where a head keeps what in our param tree, for loading our own checkpoints across heads.

    Returns:
      `(root, fresh)`: the path of the base model's params (`ParamMap.root`: `()` for a bare model,
      e.g. `('model',)` for a head) and the paths of params transformers initialises fresh when a
      checkpoint lacks them (poolers, classifiers; the rules marked `init`).
    """
    pmap = converter(config).param_map(config, architecture)
    return pmap.root, frozenset(r.path for r in pmap.rules if r.init is not None)


def hf_architecture(config: Any, architecture: str) -> str:
    """The HF class name transformers expects for this head and config (what save writes)."""
    from xformers_jax.models import family_for_model_type

    conv = converter(config)
    if hasattr(conv, "hf_architecture"):
        return conv.hf_architecture(config, architecture)
    family = family_for_model_type(config.model_type)
    module = family.load()
    if hasattr(module, "architecture_name") and architecture in family.heads:
        # e.g. XLMRobertaForMaskedLM with an xlm-roberta-xl config -> XLMRobertaXLForMaskedLM.
        return module.architecture_name(config, family.heads[architecture])
    return architecture


def adjust_hf_config(
    hf_config: dict[str, Any], state: Mapping[str, np.ndarray], config: Any, architecture: str
) -> None:
    """Edits the config.json dict to describe `state` (`params_to_hf`'s output), in place: e.g.
    mT5 saved untied when its tied encoder and decoder were trained apart."""
    conv = converter(config)
    if hasattr(conv, "adjust_hf_config"):
        conv.adjust_hf_config(hf_config, state, config, architecture)


def hf_to_params(
    state_dict: Mapping[str, np.ndarray],
    config: Any,
    architecture: str,
    shapes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """HF state dict (torch layouts) -> our params (nested dict of numpy arrays, scan layout).

    Args:
      state_dict: HF key -> array, e.g. from `safetensors.numpy.load_file`.
      config: the family config.
      architecture: the HF class name of the head.
      shapes: our params' shapes (`abstract_params(config, architecture)` when None).

    Raises:
      ConversionError: missing / unexpected / mis-shaped tensors, each named.
    """
    conv = converter(config)
    shapes = abstract_params(config, architecture) if shapes is None else shapes
    if hasattr(conv, "hf_to_params"):
        return conv.hf_to_params(state_dict, config, architecture, shapes)
    return pm.hf_to_params(state_dict, conv.param_map(config, architecture), shapes)


def plan_params(
    state_dict: Mapping[str, Any],
    config: Any,
    architecture: str,
    shapes: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`hf_to_params` of lazy tensors (`hf_files.open_state_dict`): our params as
    `lazy.ParamPlan`s (None where `keep_missing` leaves a param to the caller), nothing read.

    Args:
      options: `keep_missing` / `drop_unexpected` of `param_map.hf_to_params`.
    """
    from xformers_jax.convert import lazy

    sd = {k: v if lazy.is_lazy(v) else lazy.ArrayRef(v) for k, v in state_dict.items()}
    with pm.loading_options(**options):
        return hf_to_params(sd, config, architecture, shapes)


def params_to_hf(
    params: Mapping[str, Any], config: Any, architecture: str
) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (HF names, torch Linear `[out, in]`, tied weights once)."""
    conv = converter(config)
    if hasattr(conv, "params_to_hf"):
        return conv.params_to_hf(params, config, architecture)
    return pm.params_to_hf(params, conv.param_map(config, architecture))
