"""Shared config pieces: the base training ConfigDict, presets, CLI overrides, validation, JSON.

Every config file under `configs/<family>/<job>.py` defines `get_config(arg)` that starts from
`base_config()`, picks a preset with `parse_arg(arg, PRESETS, default)` and fills the family's
model fields. `load_config("configs/xlm_roberta/pretrain.py:tiny", ["--config.optim.lr=1e-4"])`
imports such a file by path, applies command-line overrides, validates and locks the result.

Bad input (an unknown key, a wrong type, an unknown preset, a missing file) raises `ConfigError`
with a one-line message naming the offending key, before anything expensive runs.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

__all__ = [
    "ConfigError",
    "OPTIMIZERS",
    "SCHEDULES",
    "UserError",
    "apply_overrides",
    "base_config",
    "config_from_json",
    "config_module",
    "finetune_config",
    "load_config",
    "parse_arg",
    "preset_config",
    "save_config",
    "to_dict",
    "validate",
    "variant",
]

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
# AdamW's first-moment dtype; '' = the params' dtype.
MU_DTYPES = ("", "float32", "bfloat16")
MESH_AXES = ("data", "fsdp", "tensor")

_TRUE = ("true", "1")
_FALSE = ("false", "0")


class UserError(Exception):
    """An error caused by user input; the CLI prints its message on one line, no traceback."""


class ConfigError(UserError, ValueError):
    """A bad config, spec or override; the message names the offending key."""


# --------------------------------------------------------------------------------------------------
# Base config and presets
# --------------------------------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
    """Returns the keys every training config has, with defaults for a small CPU run.

    Family configs set `model.*` (including free model fields), `task` and the sizes; every other
    key keeps its name across families so the same `--config.K=V` works everywhere.

    Returns:
        An unlocked `ConfigDict`.
    """
    c = ml_collections.ConfigDict()
    c.task = "mlm"

    c.model = ml_collections.ConfigDict()
    c.model.family = ""
    c.model.preset = ""
    c.model.scan_unroll = 1  # layers per iteration of the layer scan (the layer count: unrolled)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = None  # None = the bundled default corpus.
    c.data.eval_files = None  # None = a held-out slice of the training data.
    c.data.seq_len = 128
    c.data.tokenizer = ""  # '' = train a sentencepiece model on the training data.
    c.data.vocab_size = 8000
    c.data.mask_prob = 0.15
    c.data.num_workers = 0  # grain worker processes tokenising / making examples (0 = threads)
    c.data.text_field = "text"  # the text of a .jsonl record / .parquet column
    c.data.prepared_dir = ""  # '' = read data.train_files; else `xformers-jax prepare`'s --out
    c.data.streaming = False  # stream data.train_files (lazily, tokenised in grain workers)
    c.data.mixture = None  # {name: {"files": [...], "weight": w}}: sources sampled together
    c.data.mixture_alpha = 0.3  # source weight ~ token share ** alpha (when no "weight")

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0  # 0 = no clipping.
    # Micro-batches per optimizer step (train.batch_size stays the examples per step).
    c.optim.grad_accum_steps = 1
    c.optim.mu_dtype = ""  # AdamW's first moment: '' = the params' dtype, float32, bfloat16.
    c.optim.layer_decay = 1.0  # 1 = no layer-wise lr decay.

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.seed = 0
    c.train.eval_every_steps = 500
    c.train.eval_steps = 10
    c.train.skip_nonfinite = False
    # XLA's persistent compilation cache, so a restarted pod run does not recompile: "auto" =
    # `<workdir>/compile_cache` on TPU / GPU and off on CPU (where compiles are quick and the
    # cache would hold host-specific code), "" = off, else a directory (local or gs://).
    c.train.compilation_cache_dir = "auto"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.tensorboard = True
    c.log.progress = True

    # `profile.steps = [first, end]`: steps first .. end-1 run inside a jax.profiler trace written
    # to `<workdir>/profile` (TensorBoard's profiler / Perfetto); [] = no trace.
    c.profile = ml_collections.ConfigDict()
    c.profile.steps = []

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices left after the other axes.
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Multi-slice: this many slices (TPU slices joined by the data-center network; GPU / CPU
    # processes) each hold the `data x fsdp x tensor` mesh above, and multiply its `data` axis.
    c.mesh.dcn_data = 1
    # (logical axis name, mesh axis | list of mesh axes | None) pairs that override the defaults.
    c.mesh.rules = []

    c.init_from = ""  # An HF dir or an Orbax export; '' = from scratch.
    return c


def parse_arg(arg: str | None, presets: Mapping[str, Any], default: str) -> str:
    """Returns the preset named by a config file's `:arg`.

    Args:
        arg: the text after `:` in the config spec; `None` or `''` selects `default`.
        presets: the known presets (only the keys are used).
        default: the preset used when `arg` is empty.

    Returns:
        The preset name, a key of `presets`.

    Raises:
        ConfigError: `arg` names no known preset.
    """
    name = (arg or "").strip() or default
    if name not in presets:
        known = ", ".join(sorted(presets))
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
    return name


def _set(group: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for k, v in values.items():
        group[k] = v


def attention_kernel_for(dtype: str) -> str:
    """A preset's `model.attention_kernel`: `auto` (the fused kernel of a TPU or GPU) for the
    accelerator-sized (bfloat16) presets, `einsum` for the float32 CPU-sized ones (on a CPU
    `auto` is einsum too: the fastest path there)."""
    return "einsum" if dtype == "float32" else "auto"


def preset_config(
    task: str,
    family: str,
    run: Mapping[str, Any],
    *,
    optim: Mapping[str, Any],
    eval_steps: int,
    max_to_keep: int | None = None,
    param_dtype: str | None = "float32",
) -> ml_collections.ConfigDict:
    """`base_config()` with the fields of a training config file's preset `run`.

    A preset is a dict with the keys every `configs/<family>/*.py` uses: `model` (the family
    preset), `dtype`, `lr`, `warmup`, `steps`, `batch_size`, `every` (eval and checkpoint
    interval) and optionally `remat` (`model.remat_policy`), `vocab_size` (`model.vocab_size`),
    `seq_len` (`data.seq_len`) and `mesh` (`(data, fsdp, tensor)`). The file then sets what is
    its own (model, data and task fields).

    Args:
        optim: the `optim.*` fields besides `lr` and `warmup_steps` (name, schedule, ...).
        eval_steps: `train.eval_steps`.
        max_to_keep: `checkpoint.max_to_keep` (None keeps the default).
        param_dtype: `model.param_dtype` (None leaves the field to the family's default).

    Returns:
        An unlocked `ConfigDict`.
    """
    c = base_config()
    c.task = task
    c.model.family = family
    c.model.preset = run["model"]
    c.model.dtype = run["dtype"]
    c.model.attention_kernel = attention_kernel_for(run["dtype"])
    if param_dtype:
        c.model.param_dtype = param_dtype
    if "remat" in run:
        c.model.remat_policy = run["remat"]
    if "vocab_size" in run:
        c.model.vocab_size = run["vocab_size"]
    if "seq_len" in run:
        c.data.seq_len = run["seq_len"]
    c.optim.lr = run["lr"]
    c.optim.warmup_steps = run["warmup"]
    _set(c.optim, optim)
    c.train.steps = run["steps"]
    c.train.batch_size = run["batch_size"]
    c.train.eval_every_steps = run["every"]
    c.train.eval_steps = eval_steps
    c.checkpoint.every_steps = run["every"]
    if max_to_keep is not None:
        c.checkpoint.max_to_keep = max_to_keep
    if "mesh" in run:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = run["mesh"]
    return c


VISUAL_TOKENIZERS = ("kmeans", "dalle")


def add_image_data(c: ml_collections.ConfigDict, visual_tokenizer: bool = False) -> None:
    """The `data.*` keys of an image task (BEiT MIM, image classification) on real images.

    With no folder and no prepared dir the bundled images are used (`data/images.py`).
    """
    d = c.data
    d.image_folder = ""  # ImageNet layout root/<class>/<file>, local or gs://; '' = bundled
    d.eval_image_folder = ""  # '' = the image_folder images whose path hash is in eval_percent
    d.eval_percent = 2.0
    if "prepared_dir" not in d:
        d.prepared_dir = ""  # ArrayRecord shards written by `xformers-jax prepare`
    d.augment = True  # BEiT's random resized crop, flip and colour jitter on real images
    d.min_crop_scale = 0.08
    d.color_jitter = 0.4
    if visual_tokenizer:
        d.visual_tokenizer = "kmeans"  # or 'dalle' (data.tokenizer = the dVAE's encoder.pkl)


def _validate_image_data(config) -> None:
    if "image_folder" not in config.data:
        return
    for key in ("image_folder", "eval_image_folder", "prepared_dir"):
        _check_type(config, f"data.{key}", (str,), "a string (a path or gs:// URL)")
    _check_num(config, "data.eval_percent", 0.0, 100.0, hi_open=True)
    _check_type(config, "data.augment", (bool,), "a bool")
    _check_num(config, "data.min_crop_scale", 0.0, 1.0)
    if not _get(config, "data.min_crop_scale") > 0:
        raise ConfigError("config key 'data.min_crop_scale' must be in (0, 1]")
    _check_num(config, "data.color_jitter", 0.0, 1.0)
    if "visual_tokenizer" in config.data:
        _check_choice(config, "data.visual_tokenizer", VISUAL_TOKENIZERS)
        if _get(config, "data.visual_tokenizer") == "dalle" and not _get(config, "data.tokenizer"):
            raise ConfigError(
                "config key 'data.tokenizer' must name the DALL-E encoder.pkl (local or gs://) "
                "when data.visual_tokenizer is 'dalle'"
            )


# Fine-tuning task -> (model.num_labels, data.seq_len, optim.lr) on the generated datasets of
# `data/finetune_data.py`.
FINETUNE_TASKS = {
    "classification": (4, 48, 1e-3),
    "token_classification": (4, 48, 1e-3),
    "qa": (2, 64, 1e-3),
    "multiple_choice": (1, 48, 1e-3),
}


def finetune_config(
    task: str,
    family: str,
    run: Mapping[str, Any],
    *,
    model: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    optim: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """A fine-tuning run on a generated dataset (`FINETUNE_TASKS`): the warmup is the first tenth
    of `run["steps"]`, a linear decay, four evals, one checkpoint at the end.

    Args:
        run: the config file's preset: `model`, `batch_size`, `steps`, `dtype` and optionally
            `lr` (default: the task's).
        model, data, optim: the config file's other fields of these groups.

    Returns:
        An unlocked `ConfigDict`.
    """
    num_labels, seq_len, task_lr = FINETUNE_TASKS[task]
    steps = run["steps"]
    c = base_config()
    c.task = task
    c.model.family = family
    c.model.preset = run["model"]
    c.model.num_labels = num_labels
    c.model.dtype = run["dtype"]
    c.model.attention_kernel = attention_kernel_for(run["dtype"])
    _set(c.model, model or {})
    c.data.seq_len = seq_len
    _set(c.data, data or {})
    c.optim.lr = run.get("lr", task_lr)
    c.optim.warmup_steps = steps // 10
    c.optim.schedule = "linear"
    _set(c.optim, optim or {})
    c.train.steps = steps
    c.train.batch_size = run["batch_size"]
    c.train.eval_every_steps = max(steps // 4, 1)
    c.train.eval_steps = 10
    c.checkpoint.every_steps = steps
    return c


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_SPEC_RE = re.compile(r"^(?P<path>.+?\.py)(?::(?P<arg>[^/\\]*))?$")


def _split_spec(spec: str) -> tuple[str, str | None]:
    """Splits `path/to/file.py[:arg]` into the path and the arg (None when no `:` is given)."""
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise ConfigError(f"config spec {spec!r} is not of the form path/to/file.py[:arg]")
    return m.group("path"), m.group("arg")


def _import_file(path: str):
    """Imports a python file by path under a unique module name."""
    abspath = os.path.abspath(path)
    digest = hashlib.sha1(abspath.encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"_xformers_jax_config_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, abspath)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so dataclasses / pickling inside the config file can find it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def config_module(path: str, relative_to: str | None = None):
    """Imports a config file by path, e.g. the preset table of a sibling config file.

    Args:
        path: the config file; relative to the directory of `relative_to` (a config file's
            `__file__`) when given.
    """
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    return _import_file(os.path.normpath(path))


def variant(base: str, relative_to: str, **kwargs) -> tuple[Any, Any]:
    """`(RUNS, get_config)` of a config file that is a variant of another: the config file
    `base` (relative to the directory of `relative_to`, the variant's `__file__`) with `kwargs`
    passed to its `get_config(arg, **kwargs)`; its presets are the variant's."""
    module = config_module(base, relative_to)

    def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
        return module.get_config(arg, **kwargs)

    return module.RUNS, get_config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Builds a config from a `path/to/file.py[:arg]` spec plus command-line overrides.

    Args:
        spec: config file path, optionally followed by `:arg` (usually a preset name); the file
            must define `get_config(arg)`, which receives `None` when no `:arg` is given.
        overrides: `key.path=value` strings (see `apply_overrides`).

    Returns:
        The validated config, locked (no new keys; existing fields stay settable).

    Raises:
        ConfigError: missing file, no `get_config`, bad preset, bad override or invalid value.
    """
    path, arg = _split_spec(spec)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"config path is not a file: {path}")
    module = _import_file(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path} defines no get_config(arg) function")
    try:
        takes_arg = bool(inspect.signature(get_config).parameters)
    except (TypeError, ValueError):  # Builtins / C callables: just try with the arg.
        takes_arg = True
    if takes_arg:
        config = get_config(arg)
    elif arg:
        raise ConfigError(f"config file {path} takes no argument but ':{arg}' was given")
    else:
        config = get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config in {path} returned {type(config).__name__}, expected a ConfigDict"
        )
    apply_overrides(config, overrides)
    validate(config)
    config.lock()
    return config


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a ConfigDict (groups are not overridable, so not suggested)."""
    keys = []
    for k in config.keys():
        full = f"{prefix}{k}"
        v = config[k]
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _suggest(key: str, config: ml_collections.ConfigDict) -> str:
    """A ' (did you mean ...?)' suffix with the closest known keys, or ''."""
    known = _all_keys(config)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    # Also match on the last component: `--config.lr` should suggest `optim.lr`.
    by_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known], n=3)
    for k in known:
        if k.rsplit(".", 1)[-1] in by_leaf and k not in close and len(close) < 3:
            close.append(k)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _normalize_key(key: str, config: ml_collections.ConfigDict) -> str:
    """Strips the CLI spellings `--config.` / `config.` from an override key."""
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if key.startswith("config.") and "config" not in config:
        key = key[len("config.") :]
    return key


def _locate(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """Returns (parent ConfigDict, leaf name) of a dotted key that must already exist."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"bad config key {key!r}")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, config)}")
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; override one of its fields instead")
    return node, parts[-1]


def _literal(raw: str) -> Any:
    """`ast.literal_eval`, falling back to the raw string (so `--config.task=mlm` works)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(key: str, raw: str, node: ml_collections.ConfigDict, leaf: str) -> Any:
    """Parses `raw` for the field `node.leaf`, checking it against the field's type."""
    field = node._fields[leaf]  # Private, but the only way to see a placeholder.
    is_ref = isinstance(field, config_dict.FieldReference)
    current = field.get() if is_ref else field
    expected = node.get_type(leaf)
    value = _literal(raw)

    def mismatch() -> ConfigError:
        return ConfigError(
            f"config key {key!r} expects {_type_name(expected)}, "
            f"got {type(value).__name__} ({raw!r})"
        )

    if value is None and (current is None or is_ref or expected in (list, tuple)):
        # Placeholders and optional fields (None-valued, file lists) may be unset again.
        return None
    if expected is type(None):  # An unset optional field takes any value.
        return value
    if expected is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"config key {key!r} expects bool (true/false/1/0), got {raw!r}")
    if expected is str:
        # A str field keeps the text as typed unless it was a quoted literal: `--config.x=123`
        # means the string '123', not a type error.
        return value if isinstance(value, str) else raw
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise mismatch()
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise mismatch()
    if expected in (list, tuple):
        if isinstance(value, (list, tuple)):
            return expected(value)
        raise mismatch()
    if isinstance(expected, type) and isinstance(value, expected):
        return value
    raise mismatch()


def _split_override(override: str) -> tuple[str, str]:
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    return key, raw


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies `key.path=value` overrides in place, checking keys and types.

    Keys may be spelled `optim.lr`, `config.optim.lr` or `--config.optim.lr`. Values are parsed
    with `ast.literal_eval`, falling back to the raw string. Type rules, by the field's type:
    bool takes true/false/True/False/1/0; int takes ints only; float takes ints and floats; str
    takes the text as typed; list/tuple take a list or tuple literal (or None); a None-valued
    field or an `ml_collections` placeholder takes anything its declared type allows.

    Args:
        config: the config to modify (may be locked).
        overrides: the override strings, applied in order.

    Returns:
        `config`, for chaining.

    Raises:
        ConfigError: unknown key (with suggestions), a group key, or a value of the wrong type.
    """
    if isinstance(overrides, str):  # A lone string would otherwise be iterated per character.
        overrides = [overrides]
    for override in overrides:
        raw_key, raw = _split_override(override)
        key = _normalize_key(raw_key, config)
        node, leaf = _locate(config, key)
        value = _coerce(key, raw, node, leaf)
        try:
            # Setting an existing field is allowed on a locked ConfigDict; no unlocking needed.
            setattr(node, leaf, value)
        except (TypeError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"config key {key!r}: cannot set {raw!r}: {msg}") from None
    return config


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"config is missing the required key {key!r}")
        node = node[part]
    return node


def get_opt(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
    """`config`'s dotted `key`, or `default` where a config from before the key lacks it."""
    try:
        return _get(config, key)
    except ConfigError:
        return default


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(config, key: str, minimum: int) -> None:
    v = _get(config, key)
    if not _is_int(v) or v < minimum:
        raise ConfigError(f"config key {key!r} must be an int >= {minimum}, got {v!r}")


def _check_num(config, key: str, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    v = _get(config, key)
    ok = _is_num(v) and lo <= v and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"in [{lo}, {hi}{')' if hi_open else ']'}" if hi != math.inf else f">= {lo}"
        raise ConfigError(f"config key {key!r} must be a number {rng}, got {v!r}")


def _check_choice(config, key: str, choices: Sequence[str]) -> None:
    v = _get(config, key)
    if v not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {v!r}")


def _check_type(config, key: str, types: tuple[type, ...], what: str) -> None:
    v = _get(config, key)
    if not isinstance(v, types):
        raise ConfigError(f"config key {key!r} must be {what}, got {v!r}")


def _check_files(config, key: str) -> None:
    v = _get(config, key)
    if v is None:
        return
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise ConfigError(f"config key {key!r} must be a list of paths or None, got {v!r}")
    if not v or not all(isinstance(p, str) and p for p in v):
        raise ConfigError(f"config key {key!r} must be a non-empty list of paths, got {v!r}")


def _check_data_sources(config) -> None:
    """The keys of prepared / streamed / mixed data (absent in configs saved before them)."""
    data = config.data
    for key in ("text_field", "prepared_dir"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"config key 'data.{key}' must be a string, got {data[key]!r}")
    if data.get("text_field", "x") == "":
        raise ConfigError("config key 'data.text_field' must be a non-empty string")
    if "streaming" in data and not isinstance(data.streaming, bool):
        raise ConfigError(
            f"config key 'data.streaming' must be true or false, got {data.streaming!r}"
        )
    if "mixture_alpha" in data:
        _check_num(config, "data.mixture_alpha", 0.0, 1.0)
    mixture = data.get("mixture")
    if mixture is None:
        return
    if not hasattr(mixture, "items") or not mixture:
        raise ConfigError(
            "config key 'data.mixture' must map source names to {'files': [...], 'weight': w}, "
            f"got {mixture!r}"
        )
    for name, spec in mixture.items():
        files = spec.get("files") if hasattr(spec, "get") else None
        if isinstance(files, str):
            files = [files]
        if not files or not all(isinstance(f, str) and f for f in files):
            raise ConfigError(f"config key 'data.mixture.{name}' needs 'files': a list of paths")
        weight = spec.get("weight")
        if weight is not None and (not _is_num(weight) or weight < 0):
            raise ConfigError(
                f"config key 'data.mixture.{name}.weight' must be >= 0, got {weight!r}"
            )


def _check_mesh(config) -> None:
    auto = []
    for axis in MESH_AXES:
        key = f"mesh.{axis}"
        v = _get(config, key)
        if not _is_int(v) or (v < 1 and v != -1):
            raise ConfigError(f"config key {key!r} must be a positive int or -1, got {v!r}")
        if v == -1:
            auto.append(key)
    if len(auto) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join(auto)}")
    dcn = get_opt(config, "mesh.dcn_data", 1)
    if not _is_int(dcn) or dcn < 1:
        raise ConfigError(f"config key 'mesh.dcn_data' must be a positive int, got {dcn!r}")
    rules = _get(config, "mesh.rules")
    if not isinstance(rules, (list, tuple)):
        raise ConfigError(f"config key 'mesh.rules' must be a list of pairs, got {rules!r}")
    for rule in rules:
        ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
        target = rule[1] if ok else None
        if ok and target is not None and not isinstance(target, str):
            ok = isinstance(target, (list, tuple)) and all(t in MESH_AXES for t in target)
        elif ok and isinstance(target, str):
            ok = target in MESH_AXES
        if not ok:
            raise ConfigError(
                f"config key 'mesh.rules' entry {rule!r} must be (logical_name, mesh axis | "
                f"list of mesh axes | None) with mesh axes in {', '.join(MESH_AXES)}"
            )


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the shared keys early, with a message naming the bad key.

    Family-specific model fields are checked by the family's config dataclass, not here.

    Args:
        config: a config built on `base_config()`.

    Returns:
        `config`, for chaining.

    Raises:
        ConfigError: a required key is missing or has a bad value.
    """
    for key in ("task", "model.family", "model.preset", "data.tokenizer", "init_from"):
        _check_type(config, key, (str,), "a string")
    if not _get(config, "task"):
        raise ConfigError("config key 'task' must be a non-empty string")
    _check_files(config, "data.train_files")
    _check_files(config, "data.eval_files")
    _check_int(config, "data.seq_len", 1)
    _check_int(config, "data.vocab_size", 1)
    _check_num(config, "data.mask_prob", 0.0, 1.0, hi_open=True)
    _check_int(config, "data.num_workers", 0)
    _check_data_sources(config)
    _validate_image_data(config)

    _check_choice(config, "optim.name", OPTIMIZERS)
    _check_choice(config, "optim.schedule", SCHEDULES)
    _check_num(config, "optim.lr", 0.0)
    _check_int(config, "optim.warmup_steps", 0)
    _check_num(config, "optim.end_lr_factor", 0.0)
    _check_num(config, "optim.b1", 0.0, 1.0, hi_open=True)
    _check_num(config, "optim.b2", 0.0, 1.0, hi_open=True)
    _check_num(config, "optim.eps", 0.0)
    _check_num(config, "optim.weight_decay", 0.0)
    _check_num(config, "optim.clip_norm", 0.0)
    _check_int(config, "optim.grad_accum_steps", 1)
    if "mu_dtype" in _get(config, "optim"):
        mu = _get(config, "optim.mu_dtype")
        if mu not in MU_DTYPES:
            raise ConfigError(
                f"config key 'optim.mu_dtype' must be '' (the params' dtype), float32 or "
                f"bfloat16; got {mu!r}"
            )
        if _get(config, "optim.mu_dtype") and _get(config, "optim.name") == "adafactor":
            raise ConfigError(
                "config key 'optim.mu_dtype' is AdamW's first-moment dtype; adafactor keeps no "
                "first moment (set it to '')"
            )
    layer_decay = _get(config, "optim.layer_decay")
    if not _is_num(layer_decay) or not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"config key 'optim.layer_decay' must be in (0, 1], got {layer_decay!r}")

    _check_int(config, "train.steps", 1)
    _check_int(config, "train.batch_size", 1)
    _check_int(config, "train.seed", 0)
    _check_int(config, "train.eval_every_steps", 1)
    _check_int(config, "train.eval_steps", 0)
    _check_type(config, "train.skip_nonfinite", (bool,), "a bool")

    _check_int(config, "checkpoint.every_steps", 1)
    _check_int(config, "checkpoint.max_to_keep", 1)
    _check_type(config, "checkpoint.async_save", (bool,), "a bool")

    _check_int(config, "log.every_steps", 1)
    _check_type(config, "log.tensorboard", (bool,), "a bool")
    _check_type(config, "log.progress", (bool,), "a bool")

    cache = get_opt(config, "train.compilation_cache_dir", "")
    if not isinstance(cache, str):
        raise ConfigError(
            f"config key 'train.compilation_cache_dir' must be a string, got {cache!r}"
        )
    steps = get_opt(config, "profile.steps", [])
    if not isinstance(steps, (list, tuple)) or (
        steps and (len(steps) != 2 or not all(_is_int(s) for s in steps) or
                   not 1 <= steps[0] < steps[1])
    ):  # fmt: skip
        raise ConfigError(
            f"config key 'profile.steps' must be [] or [first, end] with 1 <= first < end, "
            f"got {steps!r}"
        )

    _check_mesh(config)
    return config


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / jax scalars.
        return v.item()
    return str(v)  # dtypes, enums, ...: recorded for humans, not round-tripped.


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config (references followed) as plain JSON-compatible python values.

    Tuples become lists; non-JSON values (dtypes, ...) become their `str`.
    """
    return _jsonable(config.to_dict())


def save_config(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """Writes the resolved config as indented JSON (parent directories are created)."""
    from xformers_jax import paths

    # Whole-file write: a crash never leaves a half-written config.json (local or gs://).
    paths.write_text(path, json.dumps(to_dict(config), indent=2) + "\n")


def config_from_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads a config written by `save_config` back into an (unlocked) ConfigDict."""
    from xformers_jax import paths

    try:
        data = json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {os.fspath(path)} does not hold a JSON object")
    return ml_collections.ConfigDict(data)
