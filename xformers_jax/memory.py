"""Per-device memory of a training config on a mesh you don't have yet.

`xformers-jax memory --config FILE:preset --devices N [--config.mesh.fsdp=...] [--compile]`

Params and optimizer state come from `jax.eval_shape` of the init and the shardings the trainer
would use (exact, no memory, any device count). Activations and temporaries come from XLA's
compiled memory analysis of the real train step (`--compile`), which needs N devices: on a CPU box
run with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (compiling allocates nothing).
"""

from __future__ import annotations

import importlib
import math
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from xformers_jax import convert, models, optim, sharding, tasks
from xformers_jax.config_lib import UserError


def _example_batch(config) -> dict[str, np.ndarray]:
    """The global batch shapes of `config.task` (the task's `example_batch` if it has one)."""
    mod = importlib.import_module(tasks.TASKS[config.task])
    if hasattr(mod, "example_batch"):
        return mod.example_batch(config)
    if config.task != "mlm":
        raise UserError(
            f"memory --compile needs the batch shapes of task {config.task!r}; it supports mlm "
            "and tasks whose module defines example_batch(config)"
        )
    shape = (config.train.batch_size, config.data.seq_len)
    z = np.zeros(shape, np.int32)
    return {"input_ids": z, "attention_mask": z + 1, "labels": z}


def _shard_bytes(leaf: Any, spec: PartitionSpec, sizes: dict[str, int]) -> float:
    """Bytes of one device's shard of `leaf` laid out by `spec`."""
    n = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    for ax in spec:
        for a in (ax,) if isinstance(ax, str) else ax or ():
            n /= sizes[a]
    return n


def _specs(abstract_boxed: Any, sizes: dict[str, int], rules) -> Any:
    fake_mesh = types.SimpleNamespace(shape=sizes)

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(x.names, rules)
            return sharding.fit_spec(spec, x.value.shape, fake_mesh)
        return PartitionSpec()

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def estimate(config, num_devices: int, compile: bool = False) -> dict[str, Any]:
    """Per-device bytes of params, optimizer state and (with `compile`) the step's temporaries.

    Returns:
      A dict with `mesh`, `params`, `param_bytes`, `opt_bytes`, `per_device_state_bytes`, and
      with `compile`: `temp_bytes`, `argument_bytes`, `output_bytes`, `total_bytes` (XLA's view).
    """
    shape = sharding.mesh_shape(config.mesh, num_devices)
    sizes = dict(zip(sharding.MESH_AXES, shape))
    rules = sharding.rules_from_config(config.mesh)
    module, model_cfg, arch = models.build_model(config.model, task=config.task)
    # The family's own smallest init inputs (token ids, images, decoder ids): no task data.
    boxed = convert.abstract_params(model_cfg, arch, boxed=True)
    params = nn.meta.unbox(boxed)
    specs = _specs(boxed, sizes, rules)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    opt_state = jax.eval_shape(tx.init, params)
    fake_mesh = types.SimpleNamespace(shape=sizes)
    opt_specs = optax.tree_map_params(
        tx,
        lambda leaf, spec: sharding.fit_spec(spec, leaf.shape, fake_mesh),
        opt_state,
        specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    param_bytes = sum(
        jax.tree.leaves(jax.tree.map(lambda x, s: _shard_bytes(x, s, sizes), params, specs))
    )
    opt_bytes = sum(
        _shard_bytes(x, s, sizes)
        for x, s in zip(
            jax.tree.leaves(opt_state),
            jax.tree.leaves(opt_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        )
    )
    out: dict[str, Any] = {
        "architecture": arch,
        "mesh": sizes,
        "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
        "param_bytes": param_bytes,
        "opt_bytes": opt_bytes,
        "per_device_state_bytes": param_bytes + opt_bytes,
    }
    if compile:
        from xformers_jax.layers.cpu_backward import portable_backward

        batch = _example_batch(config)
        with portable_backward():  # the accelerator's backward, not the CPU-tuned one
            out.update(_compiled(config, module, batch, params, boxed, tx, num_devices, rules))
    return out


def _compiled(config, module, batch, params, boxed, tx, num_devices, rules) -> dict[str, float]:
    from xformers_jax import train

    if len(jax.devices()) < num_devices:
        raise UserError(
            f"--compile needs {num_devices} devices, have {len(jax.devices())}; on CPU run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}"
        )
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
    mod = importlib.import_module(tasks.TASKS[config.task])
    loss = mod.make_loss_fn(config) if hasattr(mod, "make_loss_fn") else mod.loss_fn
    spec = types.SimpleNamespace(model=module, loss_fn=loss, init_extra=None, mutable=())
    schedule = optim.make_schedule(
        config.optim.schedule,
        config.optim.lr,
        config.optim.warmup_steps,
        config.train.steps,
        config.optim.end_lr_factor,
    )
    step_fn = train.make_train_step(spec, tx, schedule, False)
    with sharding.use_mesh(mesh, rules):
        param_sh = sharding.logical_shardings(boxed, mesh, rules)
        abstract = jax.eval_shape(
            lambda p: train.TrainState(
                step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)
            ),
            params,
        )
        state_sh = sharding.state_shardings(tx, abstract, param_sh, mesh)
        batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        compiled = (
            jax.jit(
                step_fn,
                in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
                out_shardings=(state_sh, sharding.replicated(mesh)),
                donate_argnums=0,
            )
            .lower(abstract, abstract_batch, jax.random.key(0))
            .compile()
        )
    m = compiled.memory_analysis()
    if m is None:
        return {}
    temp, args, outs = m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    return {
        "temp_bytes": temp,
        "argument_bytes": args,
        "output_bytes": outs,
        "total_bytes": temp + args + outs - alias,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def report(result: dict[str, Any]) -> str:
    """A human-readable table of `estimate`'s result."""
    mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [
        f"{result['architecture']}: {result['params'] / 1e9:.3f}B params, mesh {mesh}",
        f"  params / device      {_gib(result['param_bytes'])}",
        f"  optimizer / device   {_gib(result['opt_bytes'])}",
        f"  state / device       {_gib(result['per_device_state_bytes'])}",
    ]
    if "temp_bytes" in result:
        lines += [
            f"  activations+temps    {_gib(result['temp_bytes'])}   (XLA memory analysis)",
            f"  total / device       {_gib(result['total_bytes'])}",
        ]
    return "\n".join(lines)
