"""Training objectives. Each task module builds a `TaskSpec`; the trainer only sees that.

A task owns what differs between objectives: which head it trains, its data pipeline, its loss and
metrics. `loss_fn(params, batch, rng, *, model, deterministic) -> (loss, aux)` where `aux` holds
*sums* (e.g. `loss_sum`, `weight`, `correct`) so metrics reduce exactly across steps and hosts.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

TASKS: dict[str, str] = {
    "mlm": "xformers_jax.tasks.mlm",
    "plm": "xformers_jax.tasks.plm",
    "classification": "xformers_jax.tasks.classification",
    "token_classification": "xformers_jax.tasks.token_classification",
    "qa": "xformers_jax.tasks.qa",
    "multiple_choice": "xformers_jax.tasks.multiple_choice",
    "span_corruption": "xformers_jax.tasks.span_corruption",
    "mim": "xformers_jax.tasks.mim",
    "image_classification": "xformers_jax.tasks.image_classification",
}


@dataclasses.dataclass
class TaskSpec:
    """Everything the trainer needs from an objective.

    Attributes:
      model: the Flax head module to train.
      model_config: its frozen family config.
      architecture: the transformers class name of that head (for HF export).
      loss_fn: `(params, batch, rng, *, model, deterministic) -> (loss, aux_sums)`.
      metrics: `aux_sums -> {name: value}` (e.g. loss and accuracy from sums).
      train_data: `(shard_index, shard_count) -> iterable` of numpy batch dicts (per host), whose
        iterator supports `get_state()` / `set_state()`.
      eval_data: same, finite, deterministic.
      init_batch: a per-host numpy batch with the training shapes (for `init` and shapes).
      count_tokens: `batch -> int` real tokens in a host batch (for tokens/s).
      init_extra: for tasks that carry state across steps (XLNet's Transformer-XL mems): `() ->`
        the initial state (global shapes). The trainer then passes `extra=` to `loss_fn`, which
        returns the next state as `aux["extra"]` (no gradient flows through it); it is saved in
        every checkpoint. Eval passes `extra=None`.
      extra_axes: logical axis names of `init_extra()`'s leaves (a matching pytree of tuples),
        e.g. `{"mems": ("layers", "act_batch", None, "act_embed")}`; replicated when None.
    """

    model: Any
    model_config: Any
    architecture: str
    loss_fn: Callable[..., tuple[Any, dict[str, Any]]]
    metrics: Callable[[dict[str, Any]], dict[str, float]]
    train_data: Callable[[int, int], Any]
    eval_data: Callable[[int, int], Any]
    init_batch: dict[str, Any]
    count_tokens: Callable[[dict[str, Any]], int]
    init_extra: Callable[[], Any] | None = None
    extra_axes: Any = None


def build_task(config: Any, workdir: str) -> TaskSpec:
    """The `TaskSpec` for `config.task`; unknown names are a clear error."""
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; known: {sorted(TASKS)}")
    build = importlib.import_module(TASKS[config.task]).build
    import jax

    if jax.process_count() == 1:
        return build(config, workdir)
    # Building may write shared files into the workdir (a trained tokenizer, the default corpus):
    # the first host builds, the others then find and load what it wrote.
    from jax.experimental import multihost_utils

    spec = build(config, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("xformers_jax.tasks.build_task")
    return spec if spec is not None else build(config, workdir)
