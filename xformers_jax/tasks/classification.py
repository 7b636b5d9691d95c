"""Sequence classification fine-tuning (language identification on the bundled corpus).

Also home of what the four fine-tuning tasks share (`build_finetune`, `finetune_config`): the
tokenizer, the generated datasets (`data.finetune_data`), batching, the `TaskSpec`.

  xformers-jax train --config configs/xlm_roberta/finetune_classification.py:tiny \
      --workdir workdirs/cls --config.init_from=HF_OR_ORBAX_DIR
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec


def _apply(params, batch, rng, model, deterministic, **extra):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions",
                                                            "end_positions")}  # fmt: skip
    return model.apply({"params": params}, **inputs, **extra, deterministic=deterministic,
                       rngs={"dropout": rng})  # fmt: skip


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
    train_arrays = make_data(tokenizer, config.data.seq_len, True)
    eval_arrays = make_data(tokenizer, config.data.seq_len, False)

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


# (task, num_labels, seq_len, lr) of each fine-tuning config.
FINETUNE = {
    "classification": (4, 48, 1e-3),
    "token_classification": (4, 48, 1e-3),
    "qa": (2, 64, 1e-3),
    "multiple_choice": (1, 48, 1e-3),
}


def finetune_config(task: str, arg: str | None) -> ml_collections.ConfigDict:
    """The shared fine-tuning config of `configs/xlm_roberta/finetune_<task>.py`.

    Presets: `tiny` (CPU, the tiny XL-style model; the default) and `base` (xlm-roberta-base
    sizes). Set `init_from` to an HF dir or an Orbax params export of the same sizes and head.
    """
    num_labels, seq_len, lr = FINETUNE[task]
    runs = {
        "tiny": ("tiny", 32, 200, "float32"),
        "base": ("xlm-roberta-base", 32, 3000, "bfloat16"),
    }
    model, batch_size, steps, dtype = runs[config_lib.parse_arg(arg, runs, default="tiny")]
    c = config_lib.base_config()
    c.task = task
    c.model.family = "xlm_roberta"
    c.model.preset = model
    c.model.num_labels = num_labels
    c.model.dtype = dtype
    c.model.hidden_dropout_prob = 0.1
    c.model.attention_probs_dropout_prob = 0.1
    c.data.seq_len = seq_len
    c.data.vocab_size = 8000
    c.optim.lr = lr
    c.optim.warmup_steps = steps // 10
    c.optim.schedule = "linear"
    c.optim.layer_decay = 0.9  # layer-wise lr decay, as is usual for fine-tuning
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.eval_every_steps = max(steps // 4, 1)
    c.train.eval_steps = 10
    c.checkpoint.every_steps = steps
    c.log.every_steps = 10
    return c
