"""The one trainer: every family and objective, any mesh, resumable, driven by a ConfigDict.

`train_and_evaluate(config, workdir)` reads as the sections below: Mesh, Data, Model+Optimizer,
Shard, Step, Checkpoint, Eval, Loop. Family/objective specifics come from `tasks/` through a
`TaskSpec`; nothing here branches on the family.

Resume order: a checkpoint in `<workdir>/checkpoints` > `config.init_from` (HF dir, Orbax params
export or trainer workdir) > from scratch. Model state outside the params (BatchNorm running
statistics: the task's `mutable` collections) lives in `TrainState.model_state`: initialised,
sharded, checkpointed, restored and exported with the params. SIGTERM saves the current step and
exits cleanly. A non-finite loss stops the run with an error naming the step and never overwrites
the last good checkpoint (or, with `train.skip_nonfinite`, the update of that step is dropped and
training goes on).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from xformers_jax import checkpoint as ckpt_lib
from xformers_jax import config_lib, optim, paths, sharding, tasks
from xformers_jax.metrics_writer import MetricWriter


class NonFiniteLossError(config_lib.UserError, FloatingPointError):
    """Raised when a training step produced a NaN/Inf loss."""


@flax.struct.dataclass
class TrainState:
    """`step` (scalar int32), `params`, `opt_state`, `extra` (task state such as mems) and
    `model_state` (the model's mutable collections, e.g. `{"batch_stats": ...}`; see
    `TaskSpec.mutable`)."""

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any = flax.struct.field(default_factory=dict)
    model_state: Any = flax.struct.field(default_factory=dict)


def _global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)


def _mutable(task: Any) -> tuple[str, ...]:
    """The task's mutable model collections (`TaskSpec.mutable`)."""
    return tuple(task.mutable)


def make_train_step(task: tasks.TaskSpec, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, skip_nonfinite: bool, grad_accum_steps: int = 1,
                    mesh=None, extra_shardings=None):  # fmt: skip
    """The pure step `(state, batch, rng) -> (state, metrics)` (jitted by the caller).

    One call is one optimizer update. With `grad_accum_steps = k > 1` the batch is split into `k`
    micro-batches run one after the other by a `lax.scan` (one traced loss, `1/k` of the
    activations live at a time); their gradients and aux sums add up in float32 and the mean
    gradient is `sum_i grad(loss_sum_i) / max(sum_i weight_i, 1)`: the gradient of the whole
    batch's mean loss, as if it ran at once (see `_accumulated_grads`). `mesh` (and, for tasks
    that carry state, `extra_shardings`: `TrainState.extra`'s shardings) keep each micro-batch
    on the batch sharding.
    """

    carries = task.init_extra is not None
    mutable = _mutable(task)
    k = int(grad_accum_steps)
    if k < 1:
        raise config_lib.ConfigError(f"config key 'optim.grad_accum_steps' must be >= 1, got {k}")

    def grads_at_once(state: TrainState, batch: dict, step_rng: jax.Array):
        kw = {"extra": state.extra} if carries else {}
        if mutable:
            kw["model_state"] = state.model_state
        # Only the params are differentiated: extra and model_state enter as constants.
        loss_of = lambda p: task.loss_fn(  # noqa: E731
            p, batch, step_rng, model=task.model, deterministic=False, **kw
        )
        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        aux = dict(aux)
        extra = jax.lax.stop_gradient(aux.pop("extra")) if carries else state.extra
        model_state = state.model_state
        if mutable:
            new = jax.lax.stop_gradient(aux.pop("model_state"))
            model_state = {c: new[c] for c in mutable}
        return loss, aux, grads, extra, model_state

    def grads_accumulated(state: TrainState, batch: dict, step_rng: jax.Array):
        return _accumulated_grads(task, state, batch, step_rng, k, mesh, extra_shardings)

    def step_fn(state: TrainState, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        grads_of = grads_at_once if k == 1 else grads_accumulated
        loss, aux, grads, extra, model_state = grads_of(state, batch, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            # Drop the update of a bad step; the run goes on from the previous params.
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            model_state = keep(model_state, state.model_state)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, extra=extra,
            model_state=model_state,
        )  # fmt: skip
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": _global_norm(params),
            "update_norm": _global_norm(updates),
            "learning_rate": schedule(state.step),
            "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
            **aux,
        }
        return new_state, metrics

    return step_fn


def grad_accum_steps(config) -> int:
    """`optim.grad_accum_steps`, checked against the batch each host feeds per step.

    Raises:
      ConfigError: the per-host batch does not split into that many equal micro-batches.
    """
    k = int(config.optim.get("grad_accum_steps", 1))
    batch, hosts = int(config.train.batch_size), jax.process_count()
    if k < 1:
        raise config_lib.ConfigError(f"config key 'optim.grad_accum_steps' must be >= 1, got {k}")
    if batch % hosts == 0 and (batch // hosts) % k:
        raise config_lib.ConfigError(
            f"config key 'optim.grad_accum_steps' is {k}: the per-host batch of {batch // hosts} "
            f"(train.batch_size {batch} over {hosts} hosts) does not split into {k} micro-batches"
        )
    return k


def _extra_batch_axes(task: tasks.TaskSpec, extra: Any) -> Any:
    """The batch axis of each leaf of the task's carried state (`act_batch` in `extra_axes`)."""

    def axis(names):
        if "act_batch" not in names:
            raise config_lib.ConfigError(
                f"task state with axes {names} has no 'act_batch' axis: it cannot be split "
                "into micro-batches (optim.grad_accum_steps > 1)"
            )
        return list(names).index("act_batch")

    if task.extra_axes is None:
        raise config_lib.ConfigError(
            f"{task.architecture}'s task carries state across steps without batch axes "
            "(TaskSpec.extra_axes): it cannot be split into micro-batches "
            "(optim.grad_accum_steps > 1)"
        )
    is_axes = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)  # noqa: E731
    axes = jax.tree.map(axis, task.extra_axes, is_leaf=is_axes)
    jax.tree.map(lambda a, x: None, axes, extra)  # same structure, or a tree error here
    return axes


def _split(x: jax.Array, k: int, axis: int = 0) -> jax.Array:
    """`[..., B, ...]` (B at `axis`) -> `[k, ..., B / k, ...]`: micro-batch `i` holds rows
    `i, i + k, i + 2k, ...`. Strided, so each device's contiguous block of rows (the batch
    sharding) splits into its own rows of every micro-batch: nothing moves between devices."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // k, k) + shape[axis + 1 :])
    return jnp.moveaxis(x, axis + 1, 0)


def _merge(x: jax.Array, axis: int = 0) -> jax.Array:
    """The inverse of `_split`: `[k, ..., B / k, ...]` -> `[..., B, ...]`."""
    k = x.shape[0]
    x = jnp.moveaxis(x, 0, axis + 1)
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] * k,) + shape[axis + 2 :])


def _micro_sharded(x: jax.Array, spec, mesh) -> jax.Array:
    """`x` `[k, ...]` constrained to `spec` (that of one micro-batch) behind an unsharded `k`."""
    if mesh is None:
        return x
    spec = sharding.fit_spec(PartitionSpec(None, *spec), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _accumulated_grads(task, state, batch, step_rng, k, mesh, extra_shardings):
    """`(loss, aux sums, grads, extra, model_state)` of `batch` run as `k` micro-batches.

    Each micro-batch differentiates its `aux['loss_sum']` (the task's summed loss; its mean loss
    is `loss_sum / max(weight, 1)`); gradients and every aux sum add up in float32 over the scan,
    and the gradient of the mean loss over the whole batch is their sum over `max(sum of weights,
    1)` — the same as the batch at once, for any split of the weights (masked tokens, padding)
    over the micro-batches. Dropout draws from `fold_in(step_rng, i)` in micro-batch `i`.

    Carried task state (XLNet's mems, batch-major) follows its rows: micro-batch `i` reads and
    writes the rows of `extra` it holds, so each row's recurrence is the batch-at-once one. The
    model's mutable collections (BatchNorm statistics) are threaded through the micro-batches in
    order: each updates them as a step of its size would.
    """
    carries = task.init_extra is not None
    mutable = _mutable(task)
    batch_spec = PartitionSpec(("data", "fsdp"))
    micro = {
        name: _micro_sharded(_split(x, k), batch_spec + (None,) * (x.ndim - 1), mesh)
        for name, x in batch.items()
    }
    xs: dict[str, Any] = {"batch": micro, "index": jnp.arange(k)}
    if carries:
        axes = _extra_batch_axes(task, state.extra)
        split = jax.tree.map(lambda x, a: _split(x, k, a), state.extra, axes)
        if extra_shardings is not None:
            split = jax.tree.map(lambda x, s: _micro_sharded(x, s.spec, mesh), split,
                                 extra_shardings)  # fmt: skip
        xs["extra"] = split

    def micro_loss(params, mb, model_state, extra, index):
        kw = {"extra": extra} if carries else {}
        if mutable:
            kw["model_state"] = model_state
        rng = jax.random.fold_in(step_rng, index)
        _, aux = task.loss_fn(params, mb, rng, model=task.model, deterministic=False, **kw)
        if "loss_sum" not in aux or "weight" not in aux:
            raise ValueError(
                f"{task.architecture}'s loss has no 'loss_sum' / 'weight' sums (it has "
                f"{sorted(aux)}): gradient accumulation needs them"
            )
        return jnp.asarray(aux["loss_sum"], jnp.float32), dict(aux)

    grad_of = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, x):
        acc, sums, model_state = carry
        extra = x.get("extra")
        (_, aux), grads = grad_of(state.params, x["batch"], model_state, extra, x["index"])
        new_extra = jax.lax.stop_gradient(aux.pop("extra")) if carries else None
        if mutable:
            new = jax.lax.stop_gradient(aux.pop("model_state"))
            model_state = {c: new[c] for c in mutable}
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        sums = jax.tree.map(lambda s, v: s + jnp.asarray(v, s.dtype), sums, aux)
        return (acc, sums, model_state), new_extra

    # The aux sums' structure and dtypes, from an abstract run of one micro-batch.
    first = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), xs)
    _, aux_shape = jax.eval_shape(
        lambda f: micro_loss(state.params, f["batch"], state.model_state, f.get("extra"),
                             f["index"]),
        first,
    )  # fmt: skip
    aux_shape = {n: v for n, v in aux_shape.items() if n not in ("extra", "model_state")}
    zeros = lambda t, dtype=None: jax.tree.map(lambda a: jnp.zeros(a.shape, dtype or a.dtype), t)  # noqa: E731
    sums0 = jax.tree.map(lambda a: jnp.zeros(a.shape, _sum_dtype(a.dtype)), aux_shape)
    carry0 = (zeros(state.params, jnp.float32), sums0, state.model_state)
    (acc, sums, model_state), new_extra = jax.lax.scan(body, carry0, xs)

    weight = jnp.maximum(sums["weight"].astype(jnp.float32), 1.0)
    grads = jax.tree.map(lambda a, p: (a / weight).astype(p.dtype), acc, state.params)
    loss = sums["loss_sum"].astype(jnp.float32) / weight
    extra = state.extra
    if carries:
        extra = jax.tree.map(lambda x, a: _merge(x, a), new_extra, axes)
    return loss, sums, grads, extra, model_state


def _sum_dtype(dtype) -> Any:
    """Sums of floats accumulate in float32 (bfloat16 aux values included); ints stay ints."""
    return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype


def make_eval_step(task: tasks.TaskSpec):
    """The pure eval step `(params, batch, model_state) -> aux sums` (jitted by the caller)."""
    kw = {"extra": None} if task.init_extra is not None else {}
    mutable = _mutable(task)

    def eval_fn(params, batch, model_state):
        rng = jax.random.key(0)
        state_kw = {"model_state": model_state} if mutable else {}
        _, aux = task.loss_fn(params, batch, rng, model=task.model, deterministic=True,
                              **kw, **state_kw)  # fmt: skip
        return {k: v for k, v in aux.items() if k not in ("extra", "model_state")}

    return eval_fn


def _prepare_workdir(workdir: str) -> str:
    """The workdir's canonical form, created if local (a gs:// URL is used as it is: Orbax and
    every writer create the objects under it)."""
    try:
        workdir = paths.resolve(workdir)
    except ValueError as e:
        raise config_lib.UserError(f"workdir: {e}") from None
    if paths.is_remote(workdir):
        return workdir
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise config_lib.UserError(f"workdir {workdir} exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise config_lib.UserError(f"cannot create workdir {workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise config_lib.UserError(f"workdir {workdir} is not writable")
    return workdir


def _to_global(batch: dict, mesh, block: tuple[tuple[int, ...], int] = ((0,), 1)) -> dict:
    """This host's row blocks (`sharding.batch_block`: `blocks` of `count`, concatenated) ->
    global jax arrays sharded over data x fsdp. Hosts that share rows pass the same blocks; each
    device takes its rows from them."""
    blocks, count = block
    return {
        k: jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, v.ndim),
            v,
            (v.shape[0] // len(blocks) * count, *v.shape[1:]),
        )  # fmt: skip
        for k, v in batch.items()
    }


def _load_init_params(path: str, s: Setup, init: TrainState) -> tuple[Any, Any]:
    """(params, model_state) of the task head from an HF dir, a params-only Orbax export or a
    trainer workdir; `init` is the run's freshly initialised state.

    Our own checkpoints load straight onto the run's shardings (`checkpoint.restore_into`: saved
    leaves replace the init's by tree path); an HF dir is read slice by slice onto them through
    the family's name map (`checkpoint.load_hf_into`). Either way a pretraining checkpoint
    initialises a fine-tuning head as transformers does: the shared body is loaded, head params
    the source lacks keep the run's fresh init and other heads' weights are dropped. The mutable
    collections (`model_state`, e.g. BatchNorm running statistics) come from the source where it
    has them (HF `running_mean` / `running_var`, a trainer checkpoint's `model_state`); the
    others keep their init values.
    """
    from xformers_jax import hf_files

    cfg, arch = s.task.model_config, s.task.architecture
    if not hf_files.has_weights(path):
        return ckpt_lib.restore_into(path, cfg, arch, init.params, init.model_state)
    return ckpt_lib.load_hf_into(path, cfg, arch, init.params, init.model_state)


def load_trained_model(checkpoint_dir: str | os.PathLike, step: int | None = None) -> Any:
    """The trained head of a trainer workdir (or a params-only export) as a `PretrainedModel`.

    Same as `checkpoint.load_orbax`: from a trainer checkpoint the task's mutable collections
    (`TrainState.model_state`, e.g. BatchNorm running statistics) are read too and become the
    model's `collections`, so `hub.save_pretrained(load_trained_model(workdir), hf_dir)` writes
    them (HF `running_mean` / `running_var`). Arrays are on the host CPU.

    Args:
      checkpoint_dir: a trainer workdir, its `checkpoints/` dir, one `<step>/` dir, or a
        params-only Orbax export.
      step: for trainer checkpoints, the step (default: the latest).
    """
    return ckpt_lib.load_orbax(checkpoint_dir, step)


def _host_metrics(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return [(s, {k: np.asarray(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]


@dataclasses.dataclass
class Setup:
    """The compiled pieces of a run: task, optimizer, mesh, abstract state and its shardings."""

    task: tasks.TaskSpec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Any
    rules: tuple
    rng: jax.Array
    abstract_state: TrainState  # model_state's shardings: state_shardings.model_state
    param_shardings: Any
    state_shardings: Any
    batch_shardings: dict[str, Any]
    init_state: Any  # jitted rng -> TrainState, placed with state_shardings
    train_step: Any  # jitted (state, batch, rng) -> (state, metrics)
    eval_step: Any  # jitted (params, batch, model_state) -> aux sums
    # (blocks, count): this host feeds row blocks `blocks` of `count` of every global batch.
    batch_block: tuple[tuple[int, ...], int] = ((0,), 1)

    def to_global(self, batch: dict) -> dict:
        return _to_global(batch, self.mesh, self.batch_block)


def setup(config, workdir: str, mesh=None) -> Setup:
    """Mesh, task (data + model), optimizer, abstract state, shardings and jitted steps."""
    # ------------------------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh

    # ------------------------------------------------------------------------------- Data
    task = tasks.build_task(config, workdir)
    s = setup_for_task(config, task, mesh)
    if jax.process_count() > 1:
        try:
            s.batch_block = sharding.batch_block(mesh, int(config.train.batch_size))
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
    return s


def setup_for_task(config, task: tasks.TaskSpec, mesh) -> Setup:
    """`setup` from a built task: optimizer, abstract state, shardings and jitted steps.

    Reads no data (only `task.init_batch`'s shapes): `compile.py` builds the exact train step of
    a pod topology through it.
    """
    rules = sharding.rules_from_config(config.mesh)

    # --------------------------------------------------------------- Model + Optimizer
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    init_kwargs = {k: jnp.asarray(v) for k, v in task.init_batch.items() if k != "labels"}
    mutable = _mutable(task)

    def init_boxed(rng):
        """(params, {collection: tree} of the mutable collections), logically boxed."""
        variables = task.model.init({"params": rng, "dropout": rng}, **init_kwargs)
        missing = [c for c in mutable if c not in variables]
        if missing:
            raise ValueError(f"{task.architecture} has no variable collection {missing}; it has "
                             f"{sorted(variables)}")  # fmt: skip
        return variables["params"], {c: variables[c] for c in mutable}

    def init_state(rng):
        params, model_state = nn.meta.unbox(init_boxed(rng))
        extra = jax.tree.map(jnp.asarray, task.init_extra()) if task.init_extra else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), extra=extra,
                          model_state=model_state)  # fmt: skip

    # -------------------------------------------------------------------------------- Shard
    rng = jax.random.key(config.train.seed)
    with sharding.use_mesh(mesh, rules):
        # Model state goes the params' way: logical axes where boxed, replicated otherwise.
        param_shardings, model_state_shardings = sharding.logical_shardings(
            jax.eval_shape(init_boxed, rng), mesh, rules
        )
        abstract_state = jax.eval_shape(init_state, rng)
        extra_shardings = None
        if task.extra_axes is not None:
            extra_shardings = sharding.shardings_for_axes(
                abstract_state.extra, task.extra_axes, mesh, rules
            )
    # Outside the mesh: optax maps the optimizer state by running `tx.init` eagerly, which a
    # mesh of devices this process cannot address (an AOT-compiled TPU topology) cannot run.
    state_shardings = sharding.state_shardings(
        tx, abstract_state, param_shardings, mesh, extra_shardings
    ).replace(model_state=model_state_shardings)

    # --------------------------------------------------------------------------------- Step
    rep = sharding.replicated(mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh, np.ndim(v))
                       for k, v in task.init_batch.items()}  # fmt: skip
    accum = grad_accum_steps(config)
    step_fn = make_train_step(task, tx, schedule, bool(config.train.skip_nonfinite), accum,
                              mesh, state_shardings.extra)  # fmt: skip
    return Setup(
        task=task, tx=tx, schedule=schedule, mesh=mesh, rules=rules, rng=rng,
        abstract_state=abstract_state, param_shardings=param_shardings,
        state_shardings=state_shardings, batch_shardings=batch_shardings,
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        train_step=jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, rep),
                           out_shardings=(state_shardings, rep), donate_argnums=0),
        eval_step=jax.jit(make_eval_step(task),
                          in_shardings=(param_shardings, batch_shardings, model_state_shardings),
                          out_shardings=rep),
    )  # fmt: skip


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if a checkpoint is there); returns final metrics."""
    config_lib.validate(config)
    workdir = _prepare_workdir(workdir)
    _use_compilation_cache(config, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        config_lib.save_config(config, paths.join(workdir, "config.json"))
    s = setup(config, workdir)
    task, mesh, rules, rng = s.task, s.mesh, s.rules, s.rng
    abstract_state, state_shardings = s.abstract_state, s.state_shardings
    p_train_step = s.train_step
    train_iter = iter(task.train_data(*s.batch_block))

    # --------------------------------------------------------------------------- Checkpoint
    ckpt = ckpt_lib.Checkpointer(
        paths.join(workdir, "checkpoints"),
        every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    latest = ckpt.latest_step()
    if latest is not None:
        with sharding.use_mesh(mesh, rules):
            abstract = ckpt_lib.abstract_with_shardings(abstract_state, state_shardings)
            state, data_state = ckpt.restore(latest, abstract)
        if data_state:
            train_iter.set_state(data_state)
        _log(is_main, f"Resuming from checkpoint at step {latest} in {ckpt.directory}")
    else:
        with sharding.use_mesh(mesh, rules):
            state = s.init_state(rng)
        if config.init_from:
            params, model_state = _load_init_params(config.init_from, s, state)
            state = state.replace(params=params, model_state=model_state)
            _log(is_main, f"Initialised params from {config.init_from}")
        else:
            _log(is_main, "Starting from scratch")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    _log(is_main, f"{task.architecture}: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}")

    # --------------------------------------------------------------------------------- Eval
    def run_eval() -> dict[str, float]:
        return _run_eval(s, state.params, config.train.eval_steps, state.model_state)

    # --------------------------------------------------------------------------------- Loop
    writer = MetricWriter(workdir, enabled=is_main, tensorboard=config.log.tensorboard)
    total_steps = int(config.train.steps)
    start_step = int(jax.device_get(state.step))
    result: dict[str, Any] = {"start_step": start_step}
    if start_step == 0 and not latest:
        first_eval = run_eval()
        writer.write_eval(0, first_eval)
        result["first_eval"] = first_eval
        _log(is_main, f"eval at step 0: {_fmt(first_eval)}")

    preempted = _install_sigterm()
    profiler = _Profiler(config, workdir)
    progress = writer.progress(start_step, total_steps, enabled=config.log.progress)
    pending: list[tuple[int, dict]] = []
    tokens, t0 = 0, time.perf_counter()
    compiled_step, flops_per_step = None, None
    step = start_step
    try:
        with sharding.use_mesh(mesh, rules):
            while step < total_steps:
                batch = next(train_iter)
                tokens += task.count_tokens(batch)
                gbatch = s.to_global(batch)
                if compiled_step is None:
                    compiled_step = p_train_step.lower(state, gbatch, rng).compile()
                    flops_per_step = _cost_flops(compiled_step)
                    if jax.config.jax_compilation_cache_dir:
                        _log(is_main, f"train step compiled ({_cache_report()} so far)")
                    tokens, t0 = task.count_tokens(batch), time.perf_counter()
                profiler.before(step + 1)
                state, metrics = compiled_step(state, gbatch, rng)
                step += 1
                profiler.after(step, state)
                pending.append((step, metrics))
                progress.update(1)
                last = step == total_steps
                stop = preempted(step)  # read once: the signal may arrive at any moment
                save_now = ckpt.should_save(step) or last or stop
                if step % config.log.every_steps == 0 or save_now:
                    # Fetching the metrics waits for the dispatched steps: time after it.
                    host = _check_finite(_host_metrics(pending), config.train.skip_nonfinite)
                    dt = time.perf_counter() - t0
                    summary = _summarise(host, task, tokens, dt, flops_per_step,
                                         len(pending))  # fmt: skip
                    writer.write_train(step, summary)
                    progress.set_postfix(loss=f"{summary['loss']:.4f}",
                                         tok_s=f"{summary['tokens_per_sec']:.0f}")  # fmt: skip
                    pending, tokens, t0 = [], 0, time.perf_counter()
                t_side = time.perf_counter()
                if config.train.eval_every_steps and step % config.train.eval_every_steps == 0:
                    if not last:
                        writer.write_eval(step, run_eval())
                if save_now:
                    ckpt.save(step, state, train_iter.get_state())
                t0 += time.perf_counter() - t_side  # eval and saving don't count as train time
                if stop:
                    ckpt.wait()
                    writer.close()
                    _log(is_main, f"SIGTERM: saved step {step}; exiting")
                    result.update(step=step, preempted=True)
                    return result
    finally:
        profiler.close()
        progress.close()
        ckpt.close()

    final_eval = run_eval()
    writer.write_eval(step, final_eval)
    writer.plot()
    writer.close()
    result.update(step=step, final_eval=final_eval)
    _log(is_main, f"eval at step {step}: {_fmt(final_eval)}")
    _report(s, state.params, state.model_state)
    if "first_eval" in result and result["first_eval"]:
        _log(
            is_main,
            f"eval loss: first {result['first_eval']['loss']:.4f} -> final "
            f"{final_eval['loss']:.4f}",
        )
    return result


def evaluate(config, workdir: str) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir` on the eval data; prints the metrics."""
    config_lib.validate(config)
    workdir = paths.resolve(workdir)
    ckpt_dir = paths.join(workdir, "checkpoints")
    if not paths.isdir(ckpt_dir):
        raise config_lib.UserError(f"no checkpoints in {workdir}")
    s = setup(config, workdir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, every_steps=0, max_to_keep=10**6, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise config_lib.UserError(f"no complete checkpoint in {ckpt_dir}")
    abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    result = _run_eval(s, state.params, config.train.eval_steps, state.model_state)
    _log(jax.process_index() == 0, f"eval at step {step}: {_fmt(result)}")
    _report(s, state.params, state.model_state)
    return result


def _report(s: Setup, params: Any, model_state: Any) -> None:
    """Prints the task's report (e.g. generated samples) of the trained params, if it has one."""
    if s.task.report is not None:
        with sharding.use_mesh(s.mesh, s.rules):
            state_args = (model_state,) if _mutable(s.task) else ()
            text = s.task.report(params, *state_args)
        _log(jax.process_index() == 0, text)


def _run_eval(s: Setup, params: Any, max_steps: int, model_state: Any) -> dict[str, float]:
    """Task metrics over up to `max_steps` eval batches (sums reduced, then finalised)."""
    sums: dict[str, Any] = {}
    eval_iter = iter(s.task.eval_data(*s.batch_block))
    with sharding.use_mesh(s.mesh, s.rules):
        for _ in range(max_steps):
            try:
                batch = next(eval_iter)
            except StopIteration:
                break
            aux = s.eval_step(params, s.to_global(batch), model_state)
            sums = aux if not sums else jax.tree.map(jnp.add, sums, aux)
    return s.task.metrics(jax.device_get(sums)) if sums else {}


# ------------------------------------------------------------------------------- helpers


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, flush=True)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _install_sigterm():
    """`preempted(step) -> bool`, polled after every step; on True the loop saves and returns.

    Several hosts: JAX's coordination service (`jax.distributed`) catches SIGTERM on any host,
    agrees on a step every host has yet to finish, and `reached_preemption_sync_point` turns True
    at that same step on all of them, so all hosts join the same (collective) save. No per-step
    host sync: the check reads a flag the service sets in the background. One host: a SIGTERM
    handler sets the flag.
    """
    from jax._src import distributed

    if jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point
    flag = {"hit": False}

    def handler(signum, frame):
        flag["hit"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test worker thread)
        pass
    if jax.process_count() == 1:
        return lambda step: flag["hit"]
    # Several hosts without the preemption service (`jax_enable_preemption_service` off): agree
    # on the flag with a host all-gather every step.
    from jax.experimental import multihost_utils

    def agreed(step: int) -> bool:
        hit = multihost_utils.process_allgather(np.int32(flag["hit"]))
        return bool(np.max(hit))

    return agreed


def _use_compilation_cache(config, workdir: str) -> None:
    """Points XLA's persistent compilation cache at `train.compilation_cache_dir` ("auto":
    `<workdir>/compile_cache` off the CPU), so a restarted run loads its compiled step instead of
    compiling it again. Must run before the run's first compile."""
    where = config_lib.get_opt(config, "train.compilation_cache_dir", "")
    if where == "auto":
        where = "" if jax.default_backend() == "cpu" else paths.join(workdir, "compile_cache")
    if where:
        jax.config.update("jax_compilation_cache_dir", paths.resolve(where))


_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}


def _count_cache_event(event: str, **_: Any) -> None:
    if event in _CACHE_EVENTS:
        _CACHE_EVENTS[event] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def _cache_report() -> str:
    hits = _CACHE_EVENTS["/jax/compilation_cache/cache_hits"]
    misses = _CACHE_EVENTS["/jax/compilation_cache/cache_misses"]
    return f"compilation cache: {hits} hits, {misses} misses"


class _Profiler:
    """Wraps steps `profile.steps = [first, end)` in a `jax.profiler` trace written to
    `<workdir>/profile` (each host its own; staged locally and uploaded for a gs:// workdir)."""

    def __init__(self, config, workdir: str):
        steps = list(config_lib.get_opt(config, "profile.steps", []) or [])
        self.first, self.end = steps or [0, 0]
        self.out = paths.join(workdir, "profile")
        self._stage = None
        self.active = False

    def before(self, step: int) -> None:
        """Called before step `step` (1-based) runs."""
        if not self.active and self.first <= step < self.end:
            import tempfile

            target = self.out
            if paths.is_remote(target):
                self._stage = tempfile.TemporaryDirectory(prefix="profile-")
                target = self._stage.name
            jax.profiler.start_trace(target)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        """Called after step `step` was dispatched: the trace stops once step end-1 has run."""
        if self.active and step >= self.end - 1:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if self._stage is not None:
            paths.upload_tree(self._stage.name, self.out)
            self._stage.cleanup()
            self._stage = None
        _log(jax.process_index() == 0, f"profile of steps {self.first}-{self.end - 1}: {self.out}")


def _check_finite(host: list[tuple[int, dict]], skip: bool) -> list[tuple[int, dict]]:
    for step, m in host:
        if int(m["nonfinite"]) and not skip:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); the last good checkpoint is kept"
            )
    return host


def _summarise(host, task, tokens, dt, flops_per_step, n_steps) -> dict[str, float]:
    """Averages the logged steps; task metrics from summed aux; throughput over the window."""
    scalars = ("grad_norm", "param_norm", "update_norm", "learning_rate")
    out = {k: float(np.mean([m[k] for _, m in host])) for k in scalars}
    aux_keys = [k for k in host[-1][1] if k not in (*scalars, "loss", "nonfinite")]
    # Sums may be vectors (per-class counts): add elementwise over the window, in float64.
    sums = {k: np.sum([np.asarray(m[k], np.float64) for _, m in host], axis=0) for k in aux_keys}
    out.update(task.metrics(sums) if sums else {"loss": float(host[-1][1]["loss"])})
    out["skipped_steps"] = float(sum(int(m["nonfinite"]) for _, m in host))
    out["tokens_per_sec"] = tokens / max(dt, 1e-9)
    out["steps_per_sec"] = n_steps / max(dt, 1e-9)
    if flops_per_step:
        out["tflops_per_sec"] = flops_per_step * n_steps / max(dt, 1e-9) / 1e12
    return out


def _cost_flops(compiled) -> float | None:
    """FLOPs of one compiled step from XLA's cost analysis (None where unavailable)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0))
        return flops if math.isfinite(flops) and flops > 0 else None
    except Exception:  # cost analysis is best-effort metadata, never fatal
        return None
