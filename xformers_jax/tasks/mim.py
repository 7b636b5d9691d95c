"""BEiT masked image modelling: predict the visual token of each blockwise-masked patch.

Data: the bundled digits and sample-image crops (`data.images`), or real images: an
ImageNet-layout folder (`data.image_folder`) or the ArrayRecord shards `xformers-jax prepare` wrote
(`data.prepared_dir`), see `data/image_folder.py` and docs/images.md. Blockwise masks
(`data.masking`); targets from a visual tokenizer: BEiT v1's DALL-E dVAE encoder
(`data.visual_tokenizer = 'dalle'`, `data.tokenizer` = its encoder.pkl) or, by default, a k-means
patch tokenizer fitted on the training images once and kept in the workdir
(`visual_tokenizer.npz`), so a resumed run has the same targets. `data.tokenizer` may instead
name an `.npz` holding a fitted k-means tokenizer (`centroids`, `projection`, ...) or
precomputed ids (`train` `[n_train, num_patches]` and `eval` `[n_eval, num_patches]`, aligned
with the items of `images.default_images`; photo crops must then be off).

  xformers-jax train --config configs/beit/pretrain_mim.py:tiny --workdir workdirs/beit_mim
"""

from __future__ import annotations

import numpy as np

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec, common


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """Cross-entropy over the masked patches (`labels != -100`).

    Args:
      batch: `pixel_values` `[batch, 3, H, W]`, `bool_masked_pos` `[batch, n]`, `labels`
        `[batch, n]` int32 (-100 where not masked).

    Returns:
      `(mean loss, {'loss_sum', 'weight', 'correct'})`, sums over the masked patches.
    """
    out = model.apply(
        {"params": params},
        pixel_values=batch["pixel_values"],
        bool_masked_pos=batch["bool_masked_pos"],
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    return common.cross_entropy(out.logits, batch["labels"], batch["labels"] != -100)


metrics = common.accuracy_metrics


def masking_for(config, grid: int):
    """The `MaskingGenerator` of a `grid x grid` patch grid from `config.data`."""
    from xformers_jax.data.masking import MaskingGenerator

    d = config.data
    n = grid * grid
    return MaskingGenerator(
        grid,
        num_masking_patches=max(1, int(round(d.mask_ratio * n))),
        min_num_patches=d.min_block_patches,
        max_num_patches=d.max_block_patches or None,
        min_aspect=d.min_aspect,
    )


def build(config, workdir: str, tokenizer=None) -> TaskSpec:
    from xformers_jax.data import image_folder
    from xformers_jax.data.images import default_images, mim_dataset
    from xformers_jax.data.visual_tokenizer import dalle_view_size, visual_tokenizer_for

    built = models.build_model(config.model, task="mim")
    model_cfg = built[1]
    d = config.data
    size, grid = model_cfg.image_size, model_cfg.image_size // model_cfg.patch_size
    if image_folder.uses_real_images(config):
        second = dalle_view_size(grid) if d.get("visual_tokenizer") == "dalle" else 0
        train_images, eval_images = image_folder.image_splits(config, size, second)
    else:
        train_images = default_images("train", size, tuple(d.sources), d.num_crops)
        eval_images = default_images("eval", size, tuple(d.sources), d.num_crops)
    if tokenizer is None:
        tokenizer = visual_tokenizer_for(
            config, workdir, train_images, eval_images, model_cfg.patch_size, grid
        )
    train_tok, eval_tok = tokenizer
    if train_tok.vocab_size > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f"the visual tokenizer has {train_tok.vocab_size} ids but model.vocab_size is "
            f"{model_cfg.vocab_size}"
        )
    masking = masking_for(config, grid)
    data = common.datasets(
        config,
        mim_dataset,
        (train_images, train_tok, masking),
        (eval_images, eval_tok, masking),
        num_workers=d.num_workers,
    )
    n = grid * grid
    init_batch = common.zeros_batch(
        common.host_batch_size(config),
        pixel_values=((model_cfg.num_channels, size, size), np.float32),
        bool_masked_pos=((n,), bool),
        labels=((n,), np.int32),
    )
    # "Tokens" of an image model: its patches (for the tokens/s metric).
    count_tokens = lambda batch: int(np.prod(batch["bool_masked_pos"].shape))  # noqa: E731
    return common.task_spec(built, loss_fn, metrics, data, init_batch, count_tokens)
