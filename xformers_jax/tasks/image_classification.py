"""Image classification fine-tuning (BEiT on the bundled digits, 10 classes).

`init_from`: a MIM workdir (its encoder is loaded; the MIM head is dropped and the classifier
and pooler LayerNorm start fresh, as transformers loads a pretraining checkpoint into a
classification head), an Orbax params export or an HF dir.

  xformers-jax train --config configs/beit/finetune_classification.py:tiny \
      --workdir workdirs/beit_cls --config.init_from=workdirs/beit_mim
"""

from __future__ import annotations

import numpy as np

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec, common

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
    return common.cross_entropy(out.logits, batch["labels"], batch["labels"] >= 0)


metrics = common.accuracy_metrics


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.images import classification_dataset, default_images

    del workdir
    built = models.build_model(config.model, task="image_classification")
    model_cfg = built[1]
    if model_cfg.num_labels != NUM_DIGIT_CLASSES:
        raise config_lib.ConfigError(
            f"config key 'model.num_labels' is {model_cfg.num_labels}; the digits have "
            f"{NUM_DIGIT_CLASSES} classes"
        )
    size = model_cfg.image_size
    train_images = default_images("train", size, ("digits",))
    eval_images = default_images("eval", size, ("digits",))
    data = common.datasets(config, classification_dataset, (train_images,), (eval_images,))
    init_batch = common.zeros_batch(
        common.host_batch_size(config),
        pixel_values=((model_cfg.num_channels, size, size), np.float32),
        labels=((), np.int32),
    )
    count_tokens = lambda batch: int(batch["labels"].shape[0])  # noqa: E731
    return common.task_spec(built, loss_fn, metrics, data, init_batch, count_tokens)
