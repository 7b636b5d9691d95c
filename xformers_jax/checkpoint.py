"""Orbax checkpoints: the trainer's (train state + data-iterator state) and params-only exports.

Each trainer checkpoint is a step directory `<dir>/<step>/` with two items: `state` (the sharded
`TrainState`, written by every host for its shards) and `data` (the JSON iterator state of this
run's input pipeline). Orbax writes into a temporary directory and renames it when complete, so a
killed save never leaves a checkpoint that restore would pick up. Restoring takes an abstract state
carrying the target shardings, so a checkpoint written on one mesh restores onto any other.
`load_model_state` reads a step's model-state collections alone (BatchNorm statistics, for
exports), as `load_params_from_checkpoint` reads its params.

Params-only export (`convert_hf_to_orbax`, `save_orbax`): `<dir>/params` (our param tree, Orbax
`StandardCheckpointer`) and `<dir>/config.json` (the HF config `hub.hf_config_dict` writes, so the
family, head and sizes are known without the trainer's config). `load_orbax` and
`export_orbax_to_hf` read either a params-only export or a trainer workdir
(`<workdir>/checkpoints/<step>/state` + `<workdir>/config.json`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from xformers_jax import convert, hf_files, hub, paths
from xformers_jax.convert import param_map as pm
from xformers_jax.convert.param_map import ConversionError, flatten, listing, path_str, unflatten
from xformers_jax.hf_files import CONFIG_NAME, CheckpointError

log = logging.getLogger(__name__)

PARAMS_DIR = "params"


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree or shapes differ from the state this config builds."""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings restore should place the arrays with."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class Checkpointer:
    """Saves every `every_steps`, keeps `max_to_keep`, restores the latest complete step.

    Args:
      directory: where step directories go (created if missing).
      every_steps: save cadence used by `should_save`.
      max_to_keep: number of step directories retained (oldest deleted first).
      async_save: write in a background thread while training continues.
    """

    def __init__(
        self, directory: str, *, every_steps: int, max_to_keep: int, async_save: bool = True
    ):
        self.directory = paths.resolve(directory)  # a gs:// URL goes to Orbax unchanged
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: Any) -> None:
        """Starts saving `state` (+ JSON `data_state`) as step `step`; returns before it ends
        when async. A save for a step that already exists is skipped."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """Restores step `step` onto the shardings carried by `abstract_state`."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit this run's train state (did the "
                f"model or optimizer config change?): {first}"
            ) from e
        return restored.state, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(directory: str, params: Any) -> None:
    """Params-only export (`<directory>/params`), synchronous; the directory must not exist."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(paths.join(directory, PARAMS_DIR), params)


def params_item(directory: str) -> str:
    """The PyTree item of a params-only export: `<dir>/params`, or `<dir>/params/state` where
    `convert` wrote it param by param (Orbax's partial saves put the tree under `state/`)."""
    item = paths.join(directory, PARAMS_DIR)
    nested = paths.join(item, "state")
    return nested if paths.isfile(paths.join(nested, "_METADATA")) else item


def _saved_tree(state_dir: str) -> Any:
    """The tree metadata (nested dicts of array metadata) of a saved train state."""
    # The item handler reads the tree metadata alone (the step-level metadata file lives one
    # directory up, where the checkpointer's `metadata` would look for it and warn).
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    return getattr(meta, "tree", meta)


def load_model_state(state_dir: str, target: Any) -> dict[str, Any]:
    """The collections of a saved `TrainState.model_state` that `target` names, on the host CPU.

    A partial restore: nothing else (params, optimizer state) is read. Collections the checkpoint
    does not hold (a run whose task has no model state) are left out of the result.

    Args:
      state_dir: a step's `state` item (`<workdir>/checkpoints/<step>/state`).
      target: `{collection: tree}` of arrays or `ShapeDtypeStruct`s with the expected shapes.

    Returns:
      `{collection: tree}` of the saved collections present in both, as host arrays.

    Raises:
      CheckpointMismatchError: a saved collection's tree or shapes differ from `target`'s.
    """
    saved = _saved_tree(state_dir)
    saved = saved.get("model_state") if isinstance(saved, dict) else None
    names = [c for c in target if isinstance(saved, dict) and c in saved]
    if not names:
        return {}
    abstract = _cpu_abstract({c: target[c] for c in names})
    try:
        restored = restore_partial(state_dir, {"model_state": abstract})
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointMismatchError(
            f"the model state in {state_dir} does not fit {sorted(names)}: {first}"
        ) from e
    return dict(restored["model_state"])


def restore_partial(item_dir: str, target: dict[str, Any]) -> dict[str, Any]:
    """Reads only the subtrees `target` names from the Orbax PyTree item `item_dir`.

    Args:
      item_dir: an item directory (a step's `state`, an export's `params`).
      target: nested dicts of `jax.ShapeDtypeStruct`s carrying the shardings (and dtypes) the
        arrays are placed with; a subset of the saved tree. Nothing else leaves the disk.
    """
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target,
    )
    # The item handler, not a checkpointer: a checkpointer also wants the item directory itself
    # marked finalized (commit_success.txt on gs://), which Orbax writes one level up.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(
            epath.Path(item_dir),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    finally:
        handler.close()


def _cpu_abstract(shapes: Any) -> Any:
    """Restore targets on the host CPU device: exports are read to be written out again."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), shapes)


# ==================================================================================================
# Params-only exports and trainer checkpoints as models
# ==================================================================================================


def save_orbax(model: hub.PretrainedModel, out_dir: str | os.PathLike) -> None:
    """Writes the params-only export format (see the module docstring)."""
    out_dir = paths.resolve(out_dir)
    paths.makedirs(out_dir)
    save_params(out_dir, model.params)
    hf_files.dump_json(
        hub.hf_config_dict(model.config, model.architecture), paths.join(out_dir, CONFIG_NAME)
    )


# Params written per partial save of `convert_hf_to_orbax`: what it holds at once beyond one
# param, whatever the model's size.
CONVERT_GROUP_BYTES = 64 << 20


def convert_hf_to_orbax(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    head: str | None = None,
    mesh: Any = None,
    rules: Any = None,
    group_bytes: int = CONVERT_GROUP_BYTES,
) -> None:
    """HF directory -> params-only Orbax export (`out_dir/params` + `out_dir/config.json`),
    streamed: params are read slice by slice onto `mesh` (each host its devices' shards; None:
    one device), a group of about `group_bytes` at a time, and each group is added to the
    checkpoint (Orbax partial saves, every host writing its shards) before the next is read.
    The model is never held whole, on the host or on the devices. Local or gs:// for both: a
    gs:// export is written to a local temporary directory and uploaded file by file (one
    process), or (several processes: partial saves need renames and one shared directory)
    placed whole on the mesh, each host holding its devices' shards, and saved by every host.

    Raises:
      FileExistsError: `out_dir` already holds an export.
      (and everything `hub.from_pretrained` raises)
    """
    from orbax.checkpoint.experimental.v1 import partial

    from xformers_jax.convert import lazy

    hf_dir, out_dir = paths.resolve(hf_dir), paths.resolve(out_dir)
    if paths.exists(paths.join(out_dir, PARAMS_DIR)):
        raise FileExistsError(errno.EEXIST, "An Orbax export already exists", out_dir)
    hf_config = hf_files.read_hf_config(hf_dir)
    config, architecture = hub.resolve(hf_config, head, source=paths.join(hf_dir, CONFIG_NAME))
    shapes = convert.abstract_params(config, architecture)
    plans = flatten(convert.plan_params(hf_files.open_state_dict(hf_dir), config, architecture,
                                        shapes))  # fmt: skip
    shardings = flatten(hub.param_shardings(config, architecture, mesh, rules))
    from xformers_jax.models.base import dtype_from_name

    pdtype = np.dtype(dtype_from_name(getattr(config, "param_dtype", "float32")))
    paths.makedirs(out_dir)
    config_json = hub.hf_config_dict(config, architecture)
    if paths.is_remote(out_dir) and jax.process_count() > 1:
        # Partial saves need renames (no gs:// object has them) and a multi-host save one
        # shared directory: each host holds its devices' shards of the model and writes them.
        params = {p: lazy.place_one(plan, shardings[p], pdtype) for p, plan in plans.items()}
        save_params(out_dir, unflatten(params))
        hf_files.dump_json(config_json, paths.join(out_dir, CONFIG_NAME))
        return
    with paths.local_dir_for_writing(out_dir) as local:
        # On gs:// the groups go to a local directory first (disk, not memory), then upload.
        target = paths.join(local, PARAMS_DIR)
        group: dict[Path, Any] = {}
        size = 0
        for p, plan in plans.items():
            group[p] = lazy.place_one(plan, shardings[p], pdtype)
            size += group[p].nbytes
            if size >= group_bytes:
                partial.save(target, unflatten(group))
                group, size = {}, 0
        if group:
            partial.save(target, unflatten(group))
        partial.finalize(target)
    hf_files.dump_json(config_json, paths.join(out_dir, CONFIG_NAME))


def convert_command(
    hf_dir: str,
    out_dir: str,
    head: str | None = None,
    mesh: str | None = None,
    devices: int | None = None,
) -> None:
    """`xformers-jax convert`: `mesh` as `'fsdp=8'` / `'data=2,fsdp=-1'` (axes default to 1),
    over the first `devices` devices (all when only `mesh` is given); neither: one device."""
    from xformers_jax import sharding

    if mesh is None and devices is None:
        return convert_hf_to_orbax(hf_dir, out_dir, head=head)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1} if mesh else {"data": 1, "fsdp": -1, "tensor": 1}
    for part in (mesh or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise CheckpointError(f"--mesh {mesh!r}: expected AXIS=N,... with axes {sorted(sizes)}")
        sizes[name.strip()] = int(value)
    all_devices = jax.devices()
    if devices is not None and not 1 <= devices <= len(all_devices):
        raise CheckpointError(f"--devices {devices}: this host has {len(all_devices)} devices")
    chosen = all_devices[: devices or len(all_devices)]
    try:
        m = sharding.make_mesh(sizes, chosen)
    except ValueError as e:
        raise CheckpointError(f"--mesh {mesh!r}: {e}") from None
    convert_hf_to_orbax(hf_dir, out_dir, head=head, mesh=m)


def load_orbax(
    checkpoint_dir: str | os.PathLike, step: int | None = None, mesh: Any = None
) -> hub.PretrainedModel:
    """A `PretrainedModel` from a params-only export or a trainer checkpoint: on the host CPU, or
    sharded over `mesh` by the params' logical axes (each host reads its devices' shards).

    From a trainer checkpoint the task's mutable collections (`TrainState.model_state`, e.g.
    BatchNorm running statistics) are read too and become the model's `collections`, so
    `hub.save_pretrained` writes them (HF `running_mean` / `running_var`). A params-only export
    holds params only: other collections take their init values.

    Args:
      checkpoint_dir: a params-only export (`params/` + `config.json`), or anything
        `load_params_from_checkpoint` accepts.
      step: for trainer checkpoints, the step (default: the latest).
      mesh: a `jax.sharding.Mesh`, or None (the host CPU).
    """
    item_dir, key, config, architecture = _find_saved(checkpoint_dir, step)
    shapes = convert.abstract_params(config, architecture)
    if mesh is None:
        target = _cpu_abstract(shapes)
    else:
        target = abstract_with_shardings(shapes, hub.param_shardings(config, architecture, mesh))
    if key is None:
        params = restore_partial(item_dir, target)
    else:
        params = restore_partial(item_dir, {key: target})[key]
    convert.check_tree(params, shapes)
    module = convert.init_module(config, architecture)
    collections = convert.hf_to_collections({}, config, architecture)
    if collections and key is not None:
        collections = {**collections, **load_model_state(item_dir, collections)}
    return hub.PretrainedModel(config, module, params, architecture, collections=collections)


def _find_saved(path: str | os.PathLike, step: int | None) -> tuple[str, str | None, Any, str]:
    """`(item dir, key of the params in it, config, architecture)` of a params-only export (key
    None: the item is the params tree) or a trainer checkpoint (`'params'` of its `state`)."""
    path = paths.resolve(path)
    if not paths.isdir(path):
        raise hf_files.not_found("No such checkpoint directory", path)
    if paths.isdir(paths.join(path, PARAMS_DIR)):
        hf_config = hf_files.read_hf_config(path)
        config, architecture = hub.resolve(hf_config, source=paths.join(path, CONFIG_NAME))
        return params_item(path), None, config, architecture
    workdir, step_dir = _locate_trainer_checkpoint(path, step)
    config, architecture = _trainer_model(workdir)
    return paths.join(step_dir, "state"), "params", config, architecture


def export_orbax_to_hf(
    checkpoint_dir: str | os.PathLike,
    hf_out: str | os.PathLike,
    dtype: Any = "float32",
    max_shard_size: int = hf_files.DEFAULT_MAX_SHARD_SIZE,
    step: int | None = None,
) -> None:
    """Params-only export or trainer checkpoint -> HF directory (`hub.save_pretrained`, tensors
    in `dtype`), written one HF tensor at a time. The params are restored onto the host CPU on one
    CPU-only process; sharded over all devices on accelerators or several processes, so that no
    host holds the model (process 0 writes)."""
    hub._export_dtype(dtype)  # a bad dtype fails before anything is read
    mesh = None
    if jax.process_count() > 1 or jax.default_backend() != "cpu":
        # Sharded over every device (each host reads its shards): no host holds the model.
        from xformers_jax import sharding

        mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = load_orbax(checkpoint_dir, step, mesh=mesh)
    hub.save_pretrained(model, hf_out, dtype=dtype, max_shard_size=max_shard_size)


# ==================================================================================================
# Trainer workdirs: `<workdir>/config.json` + `<workdir>/checkpoints/<step>/state`
# ==================================================================================================


def _steps(ckpt_dir: str) -> list[int]:
    # Orbax finalises a step by renaming its tmp dir to the bare step number.
    return sorted(
        int(n)
        for n in paths.listdir(ckpt_dir)
        if n.isdigit() and paths.isdir(paths.join(ckpt_dir, n, "state"))
    )


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _locate_trainer_checkpoint(path: str, step: int | None) -> tuple[str, str]:
    """(workdir, step dir) for a workdir, its `checkpoints/` dir, or one `<step>/` dir."""
    path = paths.resolve(path)
    if paths.isdir(paths.join(path, "state")):
        return _parent(_parent(path)), path
    if paths.isdir(paths.join(path, "checkpoints")):
        workdir, ckpt_dir = path, paths.join(path, "checkpoints")
    elif any(n.isdigit() for n in paths.listdir(path)):
        workdir, ckpt_dir = _parent(path), path
    else:
        raise hf_files.not_found(
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
    return workdir, paths.join(ckpt_dir, str(step))


def _trainer_model(workdir: str) -> tuple[Any, str]:
    """(family config, head architecture) of the run whose config is `<workdir>/config.json`."""
    from xformers_jax.models import build_model

    run_file = paths.join(workdir, CONFIG_NAME)
    if not paths.isfile(run_file):
        raise hf_files.not_found("No run config next to the checkpoints", run_file)
    run = hf_files.read_json(run_file)
    if not isinstance(run.get("model"), dict) or "family" not in run["model"]:
        raise CheckpointError(f"{run_file} has no model.family: not a trainer config")
    try:
        _, config, architecture = build_model(run["model"], task=run.get("task", "mlm"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_file}: {e}") from None
    return config, architecture


def load_params_from_checkpoint(
    checkpoint_dir: str | os.PathLike, step: int | None = None
) -> tuple[Any, Any, str]:
    """Our params, config and head from a trainer checkpoint, on the host CPU.

    The trainer (`train.py` via `Checkpointer`) writes `<workdir>/config.json` (the resolved run
    config: `task`, and `model` with `family`, `preset` and field overrides) and Orbax step
    directories `<workdir>/checkpoints/<step>/` whose item `state` is the `TrainState` (`step`,
    `params`, `opt_state`, `extra`). Only `state.params` is read (a partial restore: the optimizer
    state never leaves the disk).

    Args:
      checkpoint_dir: the workdir, its `checkpoints/` directory, or one `<step>/` directory.
      step: which step (default: the latest complete one; ignored for a `<step>/` directory).

    Returns:
      `(params, config, architecture)`: plain arrays in our layout, the family config, and the
      transformers class name of the trained head.
    """
    workdir, step_dir = _locate_trainer_checkpoint(paths.resolve(checkpoint_dir), step)
    config, architecture = _trainer_model(workdir)
    target = _cpu_abstract(convert.abstract_params(config, architecture))
    restored = restore_partial(paths.join(step_dir, "state"), {"params": target})
    return restored["params"], config, architecture


# ==================================================================================================
# init_from: an HF directory straight onto a run's shardings
# ==================================================================================================


def load_hf_into(
    path: str | os.PathLike,
    config: Any,
    architecture: str,
    params: Any,
    model_state: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A run's init `params` (and `model_state`) with the tensors of the HF directory at `path`.

    Each param is read slice by slice onto the sharding (and dtype) of its init array
    (`convert.lazy.place`): a host reads only what its devices hold, one shard at a time. A
    pretraining checkpoint initialises a fine-tuning head as transformers does: when the source
    holds the base model, head params it lacks keep the run's init (already on its devices:
    nothing is gathered) and other heads' tensors are dropped. BatchNorm statistics load where
    the source has them; other model state keeps its init.

    Args:
      path: an HF directory (local or gs://).
      config / architecture: the run's family config and head.
      params: the run's initialised params (arrays placed with their shardings).
      model_state: the run's initialised mutable collections, `{collection: tree}`.

    Returns:
      `(params, model_state)` with the same trees, shapes, dtypes and shardings as given.

    Raises:
      ConversionError: missing, unexpected or mis-shaped tensors, each named.
    """
    from xformers_jax.convert import lazy

    state_dict = hf_files.open_state_dict(path)
    pmap = convert.converter(config).param_map(config, architecture)
    options = {}
    base = pm.adapt_prefix({k: None for k in state_dict}, pmap)
    if pmap.prefix and any(k.startswith(pmap.prefix) for k in base):
        head = lambda key: not key.startswith(pmap.prefix)  # noqa: E731
        options = dict(keep_missing=lambda rule: head(rule.hf), drop_unexpected=head)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    plans = convert.plan_params(state_dict, config, architecture, shapes, **options)
    init = flatten(params)
    flat_plans = flatten(plans)
    kept = sorted(path_str(p) for p, x in flat_plans.items() if x is None)
    if kept:
        log.warning("init_from: newly initialised %s", listing(kept))
    loaded = {
        p: init[p] if x is None else lazy.place_one(x, init[p].sharding, init[p].dtype)
        for p, x in flat_plans.items()
    }
    new_state = {}
    stats = convert.hf_to_collections(state_dict, config, architecture)
    for name, tree in (model_state or {}).items():
        src = stats.get(name)
        fits = src is not None and jax.tree.structure(src) == jax.tree.structure(tree)
        if fits and all(
            np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(tree))
        ):
            tree = jax.tree.map(lambda a, b: lazy.place_one(np.asarray(a), b.sharding, b.dtype),
                                src, tree)  # fmt: skip
        new_state[name] = tree
    return unflatten(loaded), new_state


# ==================================================================================================
# init_from: our own checkpoints into a run's freshly initialised state
# ==================================================================================================

Path = tuple[str, ...]


def merge_plan(
    saved: Mapping[Path, Any],
    init: Mapping[Path, Any],
    *,
    exact: bool,
    may_keep_init: Callable[[Path], bool],
    what: str,
) -> tuple[list[Path], list[Path], list[Path]]:
    """Which leaves of a run's tree a checkpoint fills, as big_vision's `merge_params`.

    A saved leaf replaces the init's at the same path; an init leaf the checkpoint lacks keeps its
    init value where `may_keep_init` allows (a fresh head), and a saved leaf the run lacks is
    dropped (another head) unless `exact`.

    Args:
      saved: path -> shape of the saved leaves, in the run's tree paths.
      init: path -> shape of the run's leaves.
      exact: the trees must hold the same paths (a checkpoint of the same head).
      may_keep_init: which run leaves the checkpoint may lack.
      what: the error message's subject.

    Returns:
      `(loaded, kept_init, dropped)` paths.

    Raises:
      ConversionError: one line naming every missing, unexpected and mis-shaped path.
    """
    loaded = sorted(p for p in init if p in saved)
    kept = sorted(p for p in init if p not in saved)
    dropped = sorted(p for p in saved if p not in init)
    missing = [path_str(p) for p in kept if exact or not may_keep_init(p)]
    unexpected = [path_str(p) for p in dropped] if exact else []
    shapes = [
        f"{path_str(p)} {tuple(saved[p])} (model {tuple(init[p])})"
        for p in loaded
        if tuple(saved[p]) != tuple(init[p])
    ]
    problems = [
        f"{name} {listing(paths)}"
        for name, paths in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if paths
    ]
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
    return loaded, kept, dropped


def _rebase(paths: Any, src_root: Path, dst_root: Path) -> dict[Path, Path]:
    """{run path: saved path}: the saved base model (under `src_root`) moved to `dst_root`; saved
    leaves outside it (another head's) are left out when the roots differ."""
    if src_root == dst_root:
        return {p: p for p in paths}
    n = len(src_root)
    return {(*dst_root, *p[n:]): p for p in paths if p[:n] == src_root}


def restore_into(
    path: str | os.PathLike,
    config: Any,
    architecture: str,
    params: Any,
    model_state: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A run's init `params` (and `model_state`) with what our checkpoint at `path` holds.

    The saved leaves are read straight onto the shardings (and dtypes) of the init arrays, no
    detour through HF names. Into the head it was saved from, a checkpoint must fit leaf for leaf.
    Into another head of the family (a pretraining checkpoint into a fine-tuning head) the base
    model is matched by its place (`ParamMap.root`), head params the checkpoint lacks and poolers
    keep their init (transformers initialises them fresh), and other heads' leaves are dropped.
    Model state (BatchNorm statistics) loads where a trainer checkpoint holds it.

    Args:
      path: a params-only export or a trainer workdir (see `load_orbax`).
      config: the run's family config.
      architecture: the run's head (transformers class name).
      params: the run's initialised params (arrays placed with their shardings).
      model_state: the run's initialised mutable collections, `{collection: tree}`.
      step: for trainer checkpoints, the step (default: the latest).

    Returns:
      `(params, model_state)` with the same trees, shapes, dtypes and shardings as given.

    Raises:
      ConversionError: one line naming every missing, unexpected or mis-shaped leaf.
    """
    item_dir, key, src_config, src_arch = _find_saved(path, step)
    saved = flatten(_saved_tree(item_dir))
    src_root = convert.head_layout(src_config, src_arch)[0]
    root, fresh = convert.head_layout(config, architecture)
    # The trees to fill, by where they sit in the saved item: the params, then each collection
    # of the model state a trainer checkpoint holds (leaves it lacks keep their init).
    trees = {("params",) if key else (): params}
    for name, tree in (model_state or {}).items():
        if key and any(p[:2] == ("model_state", name) for p in saved):
            trees[("model_state", name)] = tree
    plans: dict[Path, dict[Path, Path]] = {}  # tree -> {run path: saved path}
    targets = {}
    for at, tree in trees.items():
        is_params = at in ((), ("params",))
        inside = [p[len(at) :] for p in saved if p[: len(at)] == at]
        where = _rebase(inside, src_root, root)
        init = flatten(tree)
        loaded, kept, _ = merge_plan(
            {p: saved[(*at, *s)].shape for p, s in where.items()},
            {p: x.shape for p, x in init.items()},
            exact=is_params and src_arch == architecture,
            may_keep_init=lambda p: not is_params or p in fresh or p[: len(root)] != root,
            what=f"init_from {path} ({src_arch}) does not fit {architecture}",
        )
        if is_params and kept:
            log.warning("init_from: newly initialised %s", listing(map(path_str, kept)))
        if is_params and len(inside) > len(loaded):
            log.info("init_from: dropped %d params of other heads", len(inside) - len(loaded))
        plans[at] = {p: (*at, *where[p]) for p in loaded}
        for p, s in plans[at].items():
            targets[s] = jax.ShapeDtypeStruct(
                init[p].shape, init[p].dtype, sharding=init[p].sharding
            )
    restored = flatten(restore_partial(item_dir, unflatten(targets))) if targets else {}

    def fill(at: Path, tree: Any) -> Any:
        plan = plans.get(at, {})
        return unflatten(
            {p: restored[plan[p]] if p in plan else x for p, x in flatten(tree).items()}
        )

    state = {n: fill(("model_state", n), t) for n, t in (model_state or {}).items()}
    return fill(("params",) if key else (), params), state
