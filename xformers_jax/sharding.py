"""Meshes, the logical-axis rules table, and shardings of (abstract) parameter / state trees.

Model code only names logical axes (`embed`, `heads`, `act_batch`, ...); this module maps them onto
the mesh axes `('data', 'fsdp', 'tensor')`. A dimension that its mesh axes do not divide is
replicated instead, so any preset runs on any mesh (e.g. a 250,002-row vocabulary on 8 devices).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Order matters only for duplicates: flax takes the first rule whose
# mesh axes are still free in that array.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("relpos", None),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves `{data, fsdp, tensor}` sizes (one may be -1 = the rest) for `num_devices`."""
    sizes = [int(mesh_cfg[a] if isinstance(mesh_cfg, dict) else getattr(mesh_cfg, a))
             for a in MESH_AXES]  # fmt: skip
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"have {num_devices}"
        )
    return tuple(sizes)  # type: ignore[return-value]


def _dcn_data(mesh_cfg: Any) -> int:
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
    return int(get("dcn_data", 1) or 1)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all, across hosts).

    With `mesh.dcn_data = K > 1` the devices form K slices (TPU slices by their `slice_index`;
    elsewhere one slice per process), each holding the configured `data x fsdp x tensor` mesh
    over its fast interconnect, and the slices multiply `data` over the data-center network
    (`mesh_utils.create_hybrid_device_mesh`): only the data-parallel gradient reduction crosses
    slices.

    Raises:
      ValueError: the mesh does not fit the devices (or their slices), one line.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    dcn = _dcn_data(mesh_cfg)
    if dcn == 1:
        shape = mesh_shape(mesh_cfg, len(devices))
        try:
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(shape)
        return Mesh(arr, MESH_AXES)
    if len(devices) % dcn:
        raise ValueError(f"mesh.dcn_data={dcn} does not divide the {len(devices)} devices")
    by_slice = hasattr(devices[0], "slice_index")
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if granules != dcn:
        what = "slices" if by_slice else "processes"
        raise ValueError(f"mesh.dcn_data={dcn}, but the devices form {granules} {what}")
    shape = mesh_shape(mesh_cfg, len(devices) // dcn)
    dcn_shape = (dcn,) + (1,) * (len(shape) - 1)
    kw = {"process_is_granule": not by_slice}
    try:
        arr = mesh_utils.create_hybrid_device_mesh(shape, dcn_shape, devices, **kw)
    except (ValueError, NotImplementedError, AssertionError):
        arr = mesh_utils.create_hybrid_device_mesh(
            shape, dcn_shape, devices, allow_split_physical_axes=True, **kw
        )
    return Mesh(arr, MESH_AXES)


def rules_from_config(mesh_cfg: Any = None) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with `mesh.rules` entries (logical, mesh axes) taking precedence."""
    overrides = list(mesh_cfg.get("rules", ()) or ()) if mesh_cfg is not None else []
    names = {name for name, _ in overrides}
    fixed = tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in overrides)
    return fixed + tuple(r for r in DEFAULT_RULES if r[0] not in names)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops the mesh axes of any dimension they do not divide (that dim is then replicated)."""
    if len(spec) > len(shape):
        return PartitionSpec()
    return PartitionSpec(
        *(ax if dim % _axis_size(mesh, ax) == 0 else None for ax, dim in zip(spec, shape))
    )


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned | nn.Partitioned)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence | None = None) -> Any:
    """NamedShardings for a tree of (abstract) params boxed with logical names.

    Returns a tree with the structure of the *unboxed* tree; unboxed leaves are replicated.
    """
    rules = DEFAULT_RULES if rules is None else tuple(rules)

    def one(x):
        if _is_box(x):
            names = x.names
            value = x.value
            spec = (
                nn.logical_to_mesh_axes(names, rules)
                if isinstance(x, nn.LogicallyPartitioned)
                else PartitionSpec(*names)
            )
            return NamedSharding(mesh, fit_spec(spec, value.shape, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=_is_box)


def shardings_for_axes(abstract: Any, axes: Any, mesh: Mesh, rules: Sequence | None = None) -> Any:
    """NamedShardings of `abstract` arrays from a matching pytree of logical-name tuples."""
    rules = DEFAULT_RULES if rules is None else tuple(rules)

    def is_axes(x):
        return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)

    def one(names, a):
        return NamedSharding(mesh, fit_spec(nn.logical_to_mesh_axes(names, rules), a.shape, mesh))

    return jax.tree.map(one, axes, abstract, is_leaf=is_axes)


def state_shardings(
    tx: optax.GradientTransformation,
    abstract_state: Any,
    param_shardings: Any,
    mesh: Mesh,
    extra_shardings: Any = None,
) -> Any:
    """Shardings of a `TrainState` (fields `step`, `params`, `opt_state`, `extra`).

    Optimizer-state leaves that mirror a param take its sharding when it fits their shape (not,
    e.g., Adafactor's factored rows); other leaves and `step` are replicated. `extra` (e.g. XLNet
    mems) takes `extra_shardings`, replicated by default.
    """
    rep = replicated(mesh)
    opt = optax.tree_map_params(
        tx,
        lambda leaf, sh: NamedSharding(mesh, fit_spec(sh.spec, leaf.shape, mesh)),
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: rep,
    )
    if extra_shardings is None:
        extra_shardings = jax.tree.map(lambda _: rep, abstract_state.extra)
    return abstract_state.replace(
        step=rep, params=param_shardings, opt_state=opt, extra=extra_shardings
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` input: batch split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_block(
    mesh: Mesh, global_batch: int, process: int | None = None
) -> tuple[tuple[int, ...], int]:
    """`(blocks, count)`: the rows of every global batch that `process` (default: this one) must
    feed. The global batch splits into `count` equal blocks of `S = global_batch // count` rows
    (one per distinct device slice of the batch sharding); the process feeds blocks `blocks`
    (rows `[b * S, (b + 1) * S)` for each), concatenated in that order, which is the layout
    `jax.make_array_from_process_local_data` maps onto its devices.

    Any mesh: a `tensor` or `fsdp` axis spanning hosts makes several hosts hold the same rows
    (they feed the same blocks); a pod's physically ordered mesh gives a host blocks that are not
    adjacent; one host holds everything (`((0,), 1)`).

    Raises:
      ValueError: the batch does not split over `data x fsdp` (one line, naming the sizes).
    """
    process = jax.process_index() if process is None else process
    split = _axis_size(mesh, ("data", "fsdp"))
    if global_batch % split:
        raise ValueError(
            f"train.batch_size {global_batch} does not split over the mesh's data x fsdp = {split}"
        )
    size = global_batch // split
    rows = batch_sharding(mesh, 1).devices_indices_map((global_batch,))
    mine = sorted({(idx[0].start or 0) // size for d, idx in rows.items()
                   if d.process_index == process})  # fmt: skip
    if not mine:
        raise ValueError(f"process {process} holds no device of mesh {dict(mesh.shape)}")
    return tuple(mine), split


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence | None = None) -> Iterator[Mesh]:
    """Makes `mesh` the current mesh and `rules` the logical-axis rules (activation constraints
    in model code resolve against both)."""
    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(tuple(DEFAULT_RULES if rules is None else rules)),
    ):
        yield mesh
