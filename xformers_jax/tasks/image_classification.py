"""Image classification fine-tuning: BEiT on the bundled digits (10 classes), or on real images
(`data.image_folder`, ImageNet layout, labels from the sorted class folder names, or
`data.prepared_dir`'s ArrayRecord shards; `data/image_folder.py`).

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
    from xformers_jax.data import image_folder
    from xformers_jax.data.images import classification_dataset, default_images

    del workdir
    built = models.build_model(config.model, task="image_classification")
    model_cfg = built[1]
    size = model_cfg.image_size
    if image_folder.uses_real_images(config):
        train_images, eval_images = image_folder.image_splits(config, size)
        num_classes, what = len(train_images.classes), "the training images have"
    else:
        train_images = default_images("train", size, ("digits",))
        eval_images = default_images("eval", size, ("digits",))
        num_classes, what = NUM_DIGIT_CLASSES, "the digits have"
    if model_cfg.num_labels != num_classes:
        raise config_lib.ConfigError(
            f"config key 'model.num_labels' is {model_cfg.num_labels}; {what} {num_classes} classes"
        )
    data = common.datasets(
        config,
        classification_dataset,
        (train_images,),
        (eval_images,),
        num_workers=config.data.num_workers,
    )
    init_batch = common.zeros_batch(
        common.host_batch_size(config),
        pixel_values=((model_cfg.num_channels, size, size), np.float32),
        labels=((), np.int32),
    )
    count_tokens = lambda batch: int(batch["labels"].shape[0])  # noqa: E731
    return common.task_spec(built, loss_fn, metrics, data, init_batch, count_tokens)
