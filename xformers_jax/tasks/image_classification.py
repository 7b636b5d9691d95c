"""Image classification fine-tuning (BEiT on the bundled digits, 10 classes).

`init_from`: an Orbax params export (or HF dir) of `BeitForImageClassification` with this task's
`num_labels`. `export_for_finetuning` writes one from a MIM workdir: its `lm_head` /
`layernorm` are dropped and the classifier and pooler LayerNorm initialised fresh
(`convert/beit.py`).

  xformers-jax train --config configs/beit/finetune_classification.py:tiny \
      --workdir workdirs/beit_cls --config.init_from=workdirs/beit_mim/cls_init
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec
from xformers_jax.tasks.mim import host_batch_size

NUM_DIGIT_CLASSES = 10


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """Cross-entropy over `labels` `[batch]` (-1 = padding, ignored).

    Returns:
      `(mean loss, {'loss_sum', 'weight', 'correct'})`, sums over the real examples.
    """
    out = model.apply(
        {"params": params},
        pixel_values=batch["pixel_values"],
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    labels = batch["labels"]
    logits = out.logits.astype(jnp.float32)
    valid = labels >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    weight = jnp.sum(valid).astype(jnp.float32)
    loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
    return loss_sum / jnp.maximum(weight, 1.0), {
        "loss_sum": loss_sum, "weight": weight, "correct": correct,
    }  # fmt: skip


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy."""
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / w, "accuracy": float(sums["correct"]) / w}


def export_for_finetuning(mim_checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                          num_labels: int = NUM_DIGIT_CLASSES) -> str:  # fmt: skip
    """A MIM trainer workdir (or params export) -> an Orbax params export of
    `BeitForImageClassification` with `num_labels` classes, usable as `init_from`.

    The encoder comes from the checkpoint; the MIM head (`layernorm`, `lm_head`) is dropped and
    the classifier and pooler LayerNorm are initialised fresh by the converter, as transformers
    does when a pretraining checkpoint is loaded into a classification head.
    """
    from xformers_jax import checkpoint, convert, hub

    mim = checkpoint.load_orbax(mim_checkpoint)
    state_dict = convert.params_to_hf(mim.params, mim.config, mim.architecture)
    config = mim.config.replace(num_labels=num_labels)
    model = hub.from_state_dict(state_dict, config, "BeitForImageClassification")
    checkpoint.save_orbax(model, out_dir)
    return os.fspath(out_dir)


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.images import classification_dataset, default_images

    del workdir
    module, model_cfg, arch = models.build_model(config.model, task="image_classification")
    if model_cfg.num_labels != NUM_DIGIT_CLASSES:
        raise config_lib.ConfigError(
            f"config key 'model.num_labels' is {model_cfg.num_labels}; the digits have "
            f"{NUM_DIGIT_CLASSES} classes"
        )
    size = model_cfg.image_size
    train_images = default_images("train", size, ("digits",))
    eval_images = default_images("eval", size, ("digits",))
    host_batch = host_batch_size(config)

    def train_data(shard_index: int, shard_count: int):
        return classification_dataset(train_images, batch_size=host_batch,
                                      seed=config.train.seed, train=True,
                                      shard_index=shard_index, shard_count=shard_count)  # fmt: skip

    def eval_data(shard_index: int, shard_count: int):
        return classification_dataset(eval_images, batch_size=host_batch,
                                      seed=config.train.seed + 1, train=False,
                                      shard_index=shard_index, shard_count=shard_count)  # fmt: skip

    return TaskSpec(
        model=module,
        model_config=model_cfg,
        architecture=arch,
        loss_fn=loss_fn,
        metrics=metrics,
        train_data=train_data,
        eval_data=eval_data,
        init_batch={
            "pixel_values": np.zeros((host_batch, model_cfg.num_channels, size, size), np.float32),
            "labels": np.zeros((host_batch,), np.int32),
        },
        count_tokens=lambda batch: int(batch["labels"].shape[0]),
    )
