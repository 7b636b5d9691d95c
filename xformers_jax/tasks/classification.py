"""Sequence classification fine-tuning (language identification on the bundled corpus).

Also home of what the four fine-tuning tasks share (`build_finetune`): the tokenizer, the
generated datasets (`data.finetune_data`), batching and the `TaskSpec`. Nothing here depends on
the family at run time: the tokenizer lays out examples (XLNet's CLS-last, left-padded layout or
XLM-R's) and the registry picks the head.

  xformers-jax train --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/cls --config.init_from=HF_OR_ORBAX_DIR
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec


def _apply(params, batch, rng, model, deterministic, **extra):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions",
                                                            "end_positions")}  # fmt: skip
    # `lsh`: the hash functions of YOSO's sampled attention, as in MLM pretraining (other
    # families ignore it).
    rngs = {"dropout": rng, "lsh": jax.random.fold_in(rng, 1)}
    return model.apply({"params": params}, **inputs, **extra, deterministic=deterministic,
                       rngs=rngs)  # fmt: skip


def head_inputs(module, arrays: dict[str, Any]) -> dict[str, Any]:
    """The arrays the head takes (e.g. `p_mask` only for heads that restrict answers).

    Every batch key reaches the head (the trainer initialises it with them), so a dataset's
    optional inputs are dropped for heads whose `__call__` has no such argument.
    """
    takes = inspect.signature(type(module).__call__).parameters
    return {k: v for k, v in arrays.items() if k in takes}


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """Cross-entropy over `labels` `[batch]`; aux sums `loss_sum`, `weight`, `correct`."""
    out = _apply(params, batch, rng, model, deterministic, labels=batch["labels"])
    n = jnp.asarray(batch["labels"].shape[0], jnp.float32)
    correct = jnp.sum(jnp.argmax(out.logits, -1) == batch["labels"])
    return out.loss, {"loss_sum": out.loss * n, "weight": n, "correct": correct}


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy."""
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / w, "accuracy": float(sums["correct"]) / w}


def build_finetune(config, workdir: str, task: str, make_data: Callable, num_labels: int,
                   loss: Callable, task_metrics: Callable) -> TaskSpec:  # fmt: skip
    """The `TaskSpec` of a fine-tuning task over a generated dataset.

    Args:
      task: the registry task name (picks the head, e.g. 'qa' -> `...ForQuestionAnswering`).
      make_data: `(tokenizer, seq_len, train) -> dict of arrays` (see `data.finetune_data`).
      num_labels: what the data needs; `model.num_labels` must equal it.
    """
    from xformers_jax.data.finetune_data import ArrayBatches
    from xformers_jax.tasks.mlm import tokenizer_for

    module, model_cfg, arch = models.build_model(config.model, task=task)
    if model_cfg.num_labels != num_labels:
        raise config_lib.ConfigError(
            f"config key 'model.num_labels' is {model_cfg.num_labels}; task {task} has "
            f"{num_labels} labels"
        )
    tokenizer = tokenizer_for(config, workdir)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size is "
                         f"{model_cfg.vocab_size}")  # fmt: skip
    host_batch = config.train.batch_size // jax.process_count()
    train_arrays = head_inputs(module, make_data(tokenizer, config.data.seq_len, True))
    eval_arrays = head_inputs(module, make_data(tokenizer, config.data.seq_len, False))

    def data(arrays, train, seed):
        return lambda i, n: ArrayBatches(arrays, host_batch, train=train, seed=seed,
                                         shard_index=i, shard_count=n)  # fmt: skip

    return TaskSpec(
        model=module, model_config=model_cfg, architecture=arch, loss_fn=loss,
        metrics=task_metrics,
        train_data=data(train_arrays, True, config.train.seed),
        eval_data=data(eval_arrays, False, 0),
        init_batch={k: v[:host_batch] for k, v in train_arrays.items()},
        count_tokens=lambda b: int(np.sum(b["attention_mask"])),
    )  # fmt: skip


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.finetune_data import LANGUAGES, language_id

    make = lambda tok, seq_len, train: language_id(tok, seq_len, train)  # noqa: E731
    return build_finetune(config, workdir, "classification", make, len(LANGUAGES), loss_fn,
                          metrics)  # fmt: skip
