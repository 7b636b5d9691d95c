"""BEiT semantic segmentation fine-tuning (UperNet + auxiliary FCN head) on digit scenes.

Data: `data.images.DigitScenes`, digits pasted on dark crops of the sample photos with per-pixel
class maps (background 0, digit d -> d + 1; stroke borders labelled `semantic_loss_ignore_index`),
rendered at `data.image_size`, which may differ from `model.image_size` (the model resizes its
position tables to the input grid). Loss: the head's (HF's) loss, cross-entropy of the UperNet
logits bilinearly upsampled to the label size, ignoring `semantic_loss_ignore_index`, plus
`auxiliary_loss_weight` times the FCN head's. Metrics from sums: loss, pixel accuracy and mean IoU
over the classes present (per-class intersection / union pixel counts).

BatchNorm running statistics are the task's mutable `batch_stats` collection: updated by every
training step, read by eval, checkpointed and exported with the params (`train.TrainState`).

  xformers-jax train --config configs/beit/segmentation.py:tiny --workdir workdirs/beit_seg \
      --config.init_from=workdirs/beit_mim
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec, common

MUTABLE = ("batch_stats",)


def loss_fn(params, batch, rng, *, model, deterministic: bool = False, model_state=None):
    """The head's loss and the metric sums of one batch.

    Args:
      params: the `BeitForSemanticSegmentation` params.
      batch: `pixel_values` float32 `[batch, 3, H, W]`, `labels` int `[batch, H, W]`
        (`semantic_loss_ignore_index` where unlabelled).
      rng: dropout / stochastic-depth key.
      model: the head module.
      deterministic: eval (BatchNorm reads `model_state`) or training (BatchNorm normalises with
        the batch's statistics and updates the running ones).
      model_state: `{"batch_stats": ...}`; None in training creates fresh statistics.

    Returns:
      `(mean loss, aux)`: aux holds `loss_sum`, `weight` (labelled pixels), `correct`,
      `intersection` and `union` (int32 `[num_labels]` pixel counts), and in training the updated
      `model_state`.
    """
    cfg = model.config
    variables = {"params": params, **(model_state or {})}
    labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
    kwargs = dict(
        pixel_values=batch["pixel_values"],
        labels=labels,
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    new_state = None
    if deterministic:
        out = model.apply(variables, **kwargs)
    else:
        out, new_state = model.apply(variables, **kwargs, mutable=list(MUTABLE))
    valid = labels != cfg.semantic_loss_ignore_index
    weight = jnp.sum(valid, dtype=jnp.int32)
    # HF's loss is a mean over the labelled pixels of both heads' per-pixel terms: times the
    # count it is their sum, exactly the quantity that adds up across batches and hosts.
    loss = out.loss
    counts = pixel_counts(out.logits, labels, cfg.num_labels, cfg.semantic_loss_ignore_index)
    aux = {"loss_sum": loss * weight.astype(jnp.float32), "weight": weight, **counts}
    if new_state is not None and model_state is not None:
        aux["model_state"] = dict(new_state)
    return loss, aux


def pixel_counts(logits: jax.Array, labels: jax.Array, num_labels: int, ignore_index: int):
    """Pixel-accuracy and IoU sums of the logits bilinearly upsampled to the labels' size.

    Args:
      logits: `[batch, num_labels, h, w]`.
      labels: int `[batch, H, W]`.

    Returns:
      `{'correct': int32 scalar, 'intersection': int32 [num_labels], 'union': int32
      [num_labels]}` over the pixels whose label is not `ignore_index`.
    """
    from xformers_jax.models.beit import resize_2d

    nhwc = jnp.transpose(logits, (0, 2, 3, 1)).astype(jnp.float32)
    pred = jnp.argmax(resize_2d(nhwc, labels.shape[-2:], "bilinear"), axis=-1).ravel()
    labels = labels.ravel()
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    hit = (pred == safe) & valid
    count = lambda ids, w: jnp.bincount(ids, w.astype(jnp.int32), length=num_labels)  # noqa: E731
    inter = count(safe, hit)
    union = count(pred, valid) + count(safe, valid) - inter
    return {"correct": jnp.sum(hit, dtype=jnp.int32), "intersection": inter, "union": union}


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Loss and pixel accuracy per labelled pixel; mean IoU over the classes that occur
    (predicted or labelled), as mmseg's nan-mean."""
    w = max(float(sums["weight"]), 1.0)
    inter = np.asarray(sums["intersection"], np.float64)
    union = np.asarray(sums["union"], np.float64)
    present = union > 0
    miou = float(np.mean(inter[present] / union[present])) if present.any() else 0.0
    return {
        "loss": float(sums["loss_sum"]) / w,
        "pixel_accuracy": float(sums["correct"]) / w,
        "mean_iou": miou,
    }


def _data_size(config, model_cfg) -> int:
    size = int(config.data.image_size) or model_cfg.image_size
    if size % model_cfg.patch_size:
        raise config_lib.ConfigError(
            f"config key 'data.image_size' is {size}; it must be a multiple of the patch size "
            f"{model_cfg.patch_size}"
        )
    return size


def example_batch(config) -> dict[str, np.ndarray]:
    """Global batch shapes of this task (for `xformers-jax memory --compile`)."""
    _, model_cfg, _ = models.build_model(config.model, task="segmentation")
    size = _data_size(config, model_cfg)
    b = config.train.batch_size
    return {
        "pixel_values": np.zeros((b, model_cfg.num_channels, size, size), np.float32),
        "labels": np.zeros((b, size, size), np.int32),
    }


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.images import default_scenes, segmentation_dataset

    del workdir
    built = models.build_model(config.model, task="segmentation")
    model_cfg = built[1]
    d = config.data
    size = _data_size(config, model_cfg)
    scenes = lambda split: default_scenes(  # noqa: E731
        split, size, d.max_digits, model_cfg.semantic_loss_ignore_index, d.reduce_labels
    )
    train_scenes, eval_scenes = scenes("train"), scenes("eval")
    if model_cfg.num_labels < train_scenes.num_classes:
        raise config_lib.ConfigError(
            f"config key 'model.num_labels' is {model_cfg.num_labels}; the digit scenes have "
            f"{train_scenes.num_classes} classes"
        )
    data = common.datasets(config, segmentation_dataset, (train_scenes,), (eval_scenes,))
    init_batch = common.zeros_batch(
        common.host_batch_size(config),
        pixel_values=((model_cfg.num_channels, size, size), np.float32),
        labels=((size, size), np.int32),
    )
    # "Tokens" of an image model: its patches (for the tokens/s metric).
    patches = (size // model_cfg.patch_size) ** 2
    count_tokens = lambda batch: int(batch["pixel_values"].shape[0]) * patches  # noqa: E731
    return common.task_spec(
        built, loss_fn, metrics, data, init_batch, count_tokens, mutable=MUTABLE
    )
