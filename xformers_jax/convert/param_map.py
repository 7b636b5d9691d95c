"""ParamMap and Rule: the name-map machinery every family's HF <-> ours converter is built from.

A family's convert module describes its checkpoint as a `ParamMap`: one `Rule` per param of ours,
naming the HF tensor (with `{i}` standing for the layer index of params stacked on the `nn.scan`
axis) and how the layout differs (a torch `Linear` weight is `[out, in]`, our kernels are
`[*in_dims, *out_dims]`, e.g. `[embed, heads, head_dim]`). `hf_to_params` and `params_to_hf` here
then do the renaming, the transposes and reshapes, the (un)stacking of layers, the `roberta.`-style
prefix of head models, tied weights, and the checks: every missing, unexpected or mis-shaped tensor
is reported by its HF name with both shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from xformers_jax.config_lib import UserError

log = logging.getLogger(__name__)

# How many names an error lists before it says "... and N more".
_MAX_LISTED = 12


class ConversionError(UserError, ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One param of ours and the HF tensor(s) it comes from.

    Attributes:
      path: our param path inside the `params` collection, e.g. `('model', 'layers', 'mlp', 'wi',
        'kernel')`.
      hf: the HF key, with `{i}` for the layer index when the param is stacked on the scan axis
        (its leading `[num_layers]` dim is then built from one HF tensor per layer).
      kind: `'copy'` (same shape), `'linear'` (torch Linear weight `[out, in]` <-> our kernel
        `[*in_dims, *out_dims]`), `'bias'` (flat `[out]` <-> our `[*out_dims]`), `'conv'`
        (torch Conv2d `[out, in, kh, kw]` <-> our HWIO `[kh, kw, in, out]`) or
        `'conv_transpose'` (torch ConvTranspose2d `[in, out, kh, kw]` <-> our HWIO).
      n_in: for `'linear'`, how many leading dims of our (per-layer) kernel are inputs.
      aliases: other HF keys that hold the same tensor (tied weights, old names). Accepted on load,
        where they must equal the tensor found under `hf`; never written.
      init: for params HF itself initialises fresh when a checkpoint lacks them (a pooler or a
        classifier loaded from a pretraining checkpoint): `'normal'`, `'zeros'` or `'ones'`.
        `None` makes a missing tensor an error.
    """

    path: tuple[str, ...]
    hf: str
    kind: str = "copy"
    n_in: int = 1
    aliases: tuple[str, ...] = ()
    init: str | None = None

    def __post_init__(self):
        if self.kind not in ("copy", "linear", "bias", "conv", "conv_transpose"):
            raise ValueError(f"unknown rule kind {self.kind!r} for {self.hf}")

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """A family's whole name map for one architecture and config.

    Attributes:
      rules: one per param of ours.
      num_layers: length of the scan axis (the range of `{i}`).
      prefix: the prefix of the base model's keys in this architecture's checkpoints, e.g.
        `'roberta.'` for HF head models, `''` for the bare base model.
      base_prefix: the family's HF `base_model_prefix` plus a dot (`'roberta.'`), used to load a
        bare-model checkpoint into a head model and the other way round, as transformers does.
      ignore: regexes of HF keys dropped silently (non-persistent buffers some versions save).
      unused: HF tensors our model has no use for, by key -> shape: dropped on load, written as
        zeros on save so transformers loads the export without "newly initialised" warnings
        (e.g. the absolute position table of a relative-position model).
      init_std: the std of `'normal'` fresh inits (the config's `initializer_range`).
      root: where the base model's params sit in our tree: `()` for a bare model, the body
        module's name for a head model (`('model',)`, `('transformer',)`, `('beit',)`). Loading
        one of our own checkpoints into another head matches the base model by this place.
    """

    rules: tuple[Rule, ...]
    num_layers: int
    prefix: str = ""
    base_prefix: str = ""
    ignore: tuple[str, ...] = ()
    unused: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    init_std: float = 0.02
    root: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Layout transforms between one HF tensor and one (per-layer) param of ours.
# --------------------------------------------------------------------------------------------------


def hf_shape(rule: Rule, shape: Sequence[int]) -> tuple[int, ...]:
    """The HF tensor shape that our (per-layer) param of `shape` corresponds to."""
    shape = tuple(int(d) for d in shape)
    if rule.kind == "linear":
        return (math.prod(shape[rule.n_in :]), math.prod(shape[: rule.n_in]))
    if rule.kind == "bias":
        return (math.prod(shape),)
    if rule.kind in _CONV_TO_HF:
        return tuple(shape[a] for a in _CONV_TO_HF[rule.kind])
    return shape


# Axis permutations from our HWIO conv kernels to torch's layouts (and back, below).
_CONV_TO_HF = {"conv": (3, 2, 0, 1), "conv_transpose": (2, 3, 0, 1)}
_CONV_TO_OURS = {"conv": (2, 3, 1, 0), "conv_transpose": (2, 3, 0, 1)}


def to_ours(rule: Rule, x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """HF tensor -> our (per-layer) param of `shape`; a torch Linear `[out, in]` is transposed."""
    if rule.kind == "linear":
        x = x.T
    elif rule.kind in _CONV_TO_OURS:
        x = np.transpose(x, _CONV_TO_OURS[rule.kind])
    return np.ascontiguousarray(x.reshape(tuple(shape)))


def to_hf(rule: Rule, x: np.ndarray) -> np.ndarray:
    """Our (per-layer) param -> the HF tensor (a kernel `[*in, *out]` -> Linear `[out, in]`)."""
    x = np.asarray(x)
    if rule.kind == "linear":
        x = x.reshape(math.prod(x.shape[: rule.n_in]), -1).T
    elif rule.kind == "bias":
        x = x.reshape(-1)
    elif rule.kind in _CONV_TO_HF:
        x = np.transpose(x, _CONV_TO_HF[rule.kind])
    return np.ascontiguousarray(x)


def unstack_layers(x: np.ndarray) -> list[np.ndarray]:
    """A `[num_layers, ...]` scanned param -> one array per layer."""
    return [x[i] for i in range(x.shape[0])]


# --------------------------------------------------------------------------------------------------
# Nested-dict helpers.
# --------------------------------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """`{'a': {'b': x}}` -> `{('a', 'b'): x}` (leaves are anything that is not a Mapping)."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def path_str(path: Sequence[str]) -> str:
    return "/".join(path)


def listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------------------------------
# Prefixes: HF head models keep the base model under `base_model_prefix`.
# --------------------------------------------------------------------------------------------------


def adapt_prefix(state_dict: Mapping[str, Any], pmap: ParamMap) -> dict[str, Any]:
    """Renames keys so a bare-model checkpoint loads into a head model and vice versa.

    transformers does the same: a head model (prefix `'roberta.'`) given a checkpoint without any
    `roberta.` key takes it as the base model's weights; a bare model given a head checkpoint takes
    the `roberta.*` tensors and drops the head's (logged, as transformers warns).
    """
    base = pmap.base_prefix
    if not base:
        return dict(state_dict)
    has_base = any(k.startswith(base) for k in state_dict)
    if pmap.prefix and not has_base:
        head_roots = {r.hf.split(".", 1)[0] + "." for r in pmap.rules if not r.hf.startswith(base)}
        return {
            (k if any(k.startswith(h) for h in head_roots) else base + k): v
            for k, v in state_dict.items()
        }
    if not pmap.prefix and has_base:
        dropped = [k for k in state_dict if not k.startswith(base)]
        if dropped:
            log.info("base model: ignoring %d head tensors: %s", len(dropped), listing(dropped))
        return {k[len(base) :]: v for k, v in state_dict.items() if k.startswith(base)}
    return dict(state_dict)


# --------------------------------------------------------------------------------------------------
# The two directions.
# --------------------------------------------------------------------------------------------------


_OPTIONS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "xformers_jax_loading_options", default=None
)


@contextlib.contextmanager
def loading_options(**options: Any) -> Iterator[None]:
    """Defaults for `hf_to_params`' `keep_missing` / `drop_unexpected` inside the block, so that
    they reach it through a family's own `hf_to_params` (which takes neither)."""
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def hf_to_params(
    state_dict: Mapping[str, Any],
    pmap: ParamMap,
    shapes: Mapping[str, Any],
    *,
    keep_missing: Callable[[Rule], bool] | None = None,
    drop_unexpected: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """HF tensors -> our params (nested dict, scan layout).

    Args:
      state_dict: HF key -> tensor (torch layout): numpy arrays, or `lazy.Lazy` tensors that are
        read later, a slice at a time (`hf_files.open_state_dict`).
      pmap: the family's map for this architecture and config.
      shapes: our params' expected shapes: a nested dict whose leaves have `.shape` (e.g. the
        unboxed `jax.eval_shape(module.init, ...)['params']`).
      keep_missing: params (by rule) the checkpoint may lack entirely: their leaf is None (the
        caller keeps its own init, e.g. a run's fresh head). Default: none.
      drop_unexpected: which tensors the map does not know are dropped (logged) rather than an
        error. Default: none.
      Both default to `loading_options`' when a family's converter calls this.

    Returns:
      Our params: numpy arrays in the checkpoint's dtype when every tensor of `state_dict` is in
      memory; `lazy.ParamPlan`s (shape and dtype known, nothing read yet) when any is lazy.
      Nothing is read to build the plans: shapes come from the files' headers.

    Raises:
      ConversionError: naming every missing or unexpected HF key, or the first tensor whose shape
        does not fit the config (with both shapes).
    """
    from xformers_jax.convert import lazy

    opts = _OPTIONS.get() or {}
    keep_missing = keep_missing or opts.get("keep_missing")
    drop_unexpected = drop_unexpected or opts.get("drop_unexpected")
    materialise = not any(lazy.is_lazy(v) for v in state_dict.values())
    sd = {
        k: v if lazy.is_lazy(v) else lazy.ArrayRef(v)
        for k, v in adapt_prefix(state_dict, pmap).items()
    }
    ignore = [re.compile(p) for p in pmap.ignore]
    unused_keys = set(k for k in sd if any(p.fullmatch(k) for p in ignore))
    unused_keys |= set(pmap.unused) & set(sd)
    expected = {path: tuple(leaf.shape) for path, leaf in flatten(shapes).items()}

    params: dict[tuple[str, ...], Any] = {}
    used: set[str] = set()
    missing: list[str] = []
    fresh: list[str] = []
    kept: list[str] = []
    for rule in pmap.rules:
        if rule.path not in expected:
            raise ConversionError(f"converter names {path_str(rule.path)}, which the model lacks")
        shape = expected[rule.path]
        per_layer = shape[1:] if rule.stacked else shape
        layers = range(pmap.num_layers) if rule.stacked else [None]
        if rule.stacked and shape[0] != pmap.num_layers:
            raise ConversionError(
                f"{path_str(rule.path)} has {shape[0]} layers, the config {pmap.num_layers}"
            )
        sources: list[list[Any] | None] = []
        names: list[list[str] | None] = []
        absent: list[str] = []
        for i in layers:
            keys = [k.format(i=i) for k in (rule.hf, *rule.aliases)]
            found = [k for k in keys if k in sd]
            used.update(found)
            if not found:
                absent.append(keys[0])
                sources.append(None)
                names.append(None)
                continue
            want = hf_shape(rule, per_layer)
            for k in found:
                got = tuple(sd[k].shape)
                if got != want:
                    raise ConversionError(
                        f"HF tensor {k} has shape {got} but the config expects {want} "
                        f"(our param {path_str(rule.path)}, shape {shape})"
                    )
            sources.append([sd[k] for k in found])
            names.append(found)
        if absent and len(absent) == len(sources) and keep_missing and keep_missing(rule):
            kept += absent
            params[rule.path] = None
            continue
        if absent and rule.init is None:
            missing += absent
            continue
        fresh += absent
        params[rule.path] = lazy.ParamPlan(rule, shape, sources, pmap.init_std, names=names)

    unexpected = sorted(set(sd) - used - unused_keys)
    dropped = [k for k in unexpected if drop_unexpected and drop_unexpected(k)]
    if dropped:
        log.info("dropped %d tensors of other heads: %s", len(dropped), listing(dropped))
        unexpected = sorted(set(unexpected) - set(dropped))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {listing(unexpected)}")
    if problems:
        raise ConversionError("checkpoint does not match the model: " + "; ".join(problems))
    uncovered = sorted(path_str(p) for p in set(expected) - set(params))
    if uncovered:
        raise ConversionError(f"no conversion rule for params {listing(uncovered)}")
    if fresh:
        # transformers warns the same way: these are heads to be fine-tuned.
        log.warning("not in the checkpoint, newly initialised: %s", listing(fresh))
    if kept:
        log.info("not in the checkpoint, left to the caller's init: %s", listing(kept))
    if materialise:
        params = {p: x if x is None else x.read() for p, x in params.items()}
    return unflatten(params)


def params_to_hf(params: Mapping[str, Any], pmap: ParamMap) -> dict[str, np.ndarray]:
    """Our params -> HF tensors (torch layout), keyed the way transformers saves them.

    Tied aliases are not written (transformers' own `save_pretrained` drops them too); `unused`
    HF tensors are written as zeros.

    Args:
      params: our params, nested dicts of arrays (numpy or jax, on host), or of `lazy.Stored`
        (arrays on their devices, left there: the result then holds `lazy.HFView`s, each
        gathered when it is read, one HF tensor at a time).
      pmap: the family's map for this architecture and config.

    Returns:
      HF key -> numpy array (or `lazy.HFView`), in the order of the map's rules.
    """
    from xformers_jax.convert import lazy

    flat = flatten(params)
    out: dict[str, Any] = {}
    streamed = False
    for rule in pmap.rules:
        if rule.path not in flat:
            raise ConversionError(f"params lack {path_str(rule.path)}")
        x = flat[rule.path]
        if isinstance(x, lazy.Stored):
            # Our param stays where it is: each HF tensor is gathered when it is written.
            streamed = True
            layers = range(x.shape[0]) if rule.stacked else [None]
            for i in layers:
                out[rule.hf.format(i=i)] = lazy.HFView(x, rule, i)
            continue
        x = np.asarray(x)
        if rule.stacked:
            for i, layer in enumerate(unstack_layers(x)):
                out[rule.hf.format(i=i)] = to_hf(rule, layer)
        else:
            out[rule.hf] = to_hf(rule, x)
    extra = sorted(path_str(p) for p in set(flat) - {r.path for r in pmap.rules})
    if extra:
        raise ConversionError(f"params not in the HF format: {listing(extra)}")
    dtype = next(iter(out.values())).dtype if out else np.float32
    for key, shape in pmap.unused.items():
        out[key] = lazy.Zeros(tuple(shape), np.dtype(dtype)) if streamed else np.zeros(shape, dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Shared pieces of rule tables.
# --------------------------------------------------------------------------------------------------


def dense_rules(path: tuple[str, ...], hf: str, n_in: int = 1, **kw) -> list[Rule]:
    """A torch `Linear` named `hf` (`hf.weight`, `hf.bias`) <-> our DenseGeneral at `path`."""
    return [
        Rule((*path, "kernel"), f"{hf}.weight", "linear", n_in=n_in, **kw),
        Rule((*path, "bias"), f"{hf}.bias", "bias", **kw),
    ]


def norm_rules(path: tuple[str, ...], hf: str, **kw) -> list[Rule]:
    """A torch `LayerNorm` (`weight`, `bias`) <-> our LayerNorm (`scale`, `bias`)."""
    return [
        Rule((*path, "scale"), f"{hf}.weight", **kw),
        Rule((*path, "bias"), f"{hf}.bias", **kw),
    ]


def embed_rule(path: tuple[str, ...], hf: str, **kw) -> Rule:
    """A torch `Embedding` (`weight`) <-> our Embed (`embedding`)."""
    return Rule((*path, "embedding"), f"{hf}.weight", **kw)


def encoder_map(
    config: Any,
    rules: Sequence[Rule],
    prefix: str,
    base_prefix: str,
    root: tuple[str, ...],
    ignore: Sequence[str],
    position_rows: int,
) -> ParamMap:
    """The map of a BERT-style encoder config (`num_hidden_layers`, `initializer_range`, ...).

    transformers builds the absolute position table (`position_rows` rows) even for relative
    position models and never reads it: it is `unused` there (dropped on load, zeros on save).
    """
    unused = {}
    if config.position_embedding_type != "absolute":
        shape = (position_rows, config.hidden_size)
        unused[f"{prefix}embeddings.position_embeddings.weight"] = shape
    return ParamMap(
        rules=tuple(rules),
        num_layers=config.num_hidden_layers,
        prefix=prefix,
        base_prefix=base_prefix,
        ignore=tuple(ignore),
        unused=unused,
        init_std=config.initializer_range,
        root=root,
    )


def token_inputs(multiple_choice: bool) -> dict[str, np.ndarray]:
    """The smallest `input_ids` that `init` a text head (`[batch, choices, length]` for multiple
    choice)."""
    return {"input_ids": np.zeros((1, 1, 2) if multiple_choice else (1, 2), np.int32)}


def check_tree(params: Mapping[str, Any], shapes: Mapping[str, Any]) -> None:
    """Raises ConversionError unless `params` has exactly the paths and shapes of `shapes`.

    Args:
      params: nested dict of arrays.
      shapes: nested dict whose leaves have `.shape` (e.g. `jax.eval_shape` of the init).
    """
    got, want = flatten(params), flatten(shapes)
    missing = sorted(path_str(p) for p in set(want) - set(got))
    extra = sorted(path_str(p) for p in set(got) - set(want))
    if missing or extra:
        raise ConversionError(
            f"params do not match the model: missing {listing(missing) or 'none'}; "
            f"unexpected {listing(extra) or 'none'}"
        )
    for p in sorted(want):
        if tuple(np.shape(got[p])) != tuple(want[p].shape):
            raise ConversionError(
                f"param {path_str(p)} has shape {tuple(np.shape(got[p]))} but the model expects "
                f"{tuple(want[p].shape)}"
            )
