"""BEiT masked image modelling: predict the visual token of each blockwise-masked patch.

Data: the bundled digits and sample-image crops (`data.images`), blockwise masks
(`data.masking`), targets from a visual tokenizer (`data.visual_tokenizer`): by default a
k-means patch tokenizer fitted on the training images once and kept in the workdir
(`visual_tokenizer.npz`), so a resumed run has the same targets. `data.tokenizer` may instead
name an `.npz` holding a fitted k-means tokenizer (`centroids`, `projection`, ...) or
precomputed ids (`train` `[n_train, num_patches]` and `eval` `[n_eval, num_patches]`, aligned
with the items of `images.default_images`; photo crops must then be off).

  xformers-jax train --config configs/beit/pretrain_mim.py:tiny --workdir workdirs/beit_mim
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import config_lib, models
from xformers_jax.tasks import TaskSpec

TOKENIZER_FILE = "visual_tokenizer.npz"


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
    labels = batch["labels"]
    logits = out.logits.astype(jnp.float32)
    valid = labels != -100
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    weight = jnp.sum(valid).astype(jnp.float32)
    loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
    return loss_sum / jnp.maximum(weight, 1.0), {
        "loss_sum": loss_sum, "weight": weight, "correct": correct,
    }  # fmt: skip


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Loss and accuracy over the masked patches."""
    w = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / w, "accuracy": float(sums["correct"]) / w}


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


def tokenizer_for(config, workdir: str, train_images, eval_images, patch_size: int):
    """(train tokenizer, eval tokenizer): `data.tokenizer`'s file, or a k-means tokenizer
    fitted on the training images once and saved in the workdir."""
    from xformers_jax.data.visual_tokenizer import KMeansPatchTokenizer, PrecomputedTokenizer

    d = config.data
    path = d.tokenizer or os.path.join(workdir, TOKENIZER_FILE)
    if d.tokenizer and not os.path.exists(path):
        raise config_lib.ConfigError(f"config key 'data.tokenizer': no such file {path}")
    if os.path.exists(path):
        with np.load(path) as z:
            precomputed = "train" in z.files
            ids = {k: z[k] for k in ("train", "eval")} if precomputed else None
        if not precomputed:
            tok = KMeansPatchTokenizer.load(path)
            return tok, tok
        if train_images.num_crops:
            raise config_lib.ConfigError(
                "precomputed visual tokens need fixed images: set data.sources=['digits']"
            )
        vocab = int(max(ids["train"].max(), ids["eval"].max())) + 1
        render = lambda s: s.render_many(len(s.items()), 0)  # noqa: E731
        return (PrecomputedTokenizer(render(train_images), ids["train"], vocab),
                PrecomputedTokenizer(render(eval_images), ids["eval"], vocab))  # fmt: skip
    pixels = train_images.render_many(d.tokenizer_fit_images, config.train.seed)
    tok = KMeansPatchTokenizer.fit(
        pixels, patch_size=patch_size, vocab_size=d.vocab_size, dim=d.tokenizer_dim,
        iterations=d.tokenizer_iterations, seed=config.train.seed,
    )  # fmt: skip
    tok.save(path)
    return tok, tok


def host_batch_size(config) -> int:
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise config_lib.ConfigError(
            f"train.batch_size {config.train.batch_size} is not divisible by {n_proc} hosts"
        )
    return config.train.batch_size // n_proc


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.images import default_images, mim_dataset

    module, model_cfg, arch = models.build_model(config.model, task="mim")
    d = config.data
    size, grid = model_cfg.image_size, model_cfg.image_size // model_cfg.patch_size
    train_images = default_images("train", size, tuple(d.sources), d.num_crops)
    eval_images = default_images("eval", size, tuple(d.sources), d.num_crops)
    train_tok, eval_tok = tokenizer_for(config, workdir, train_images, eval_images,
                                        model_cfg.patch_size)  # fmt: skip
    if train_tok.vocab_size > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f"the visual tokenizer has {train_tok.vocab_size} ids but model.vocab_size is "
            f"{model_cfg.vocab_size}"
        )
    masking = masking_for(config, grid)
    host_batch = host_batch_size(config)

    def train_data(shard_index: int, shard_count: int):
        return mim_dataset(train_images, train_tok, masking, batch_size=host_batch,
                           seed=config.train.seed, train=True, shard_index=shard_index,
                           shard_count=shard_count)  # fmt: skip

    def eval_data(shard_index: int, shard_count: int):
        return mim_dataset(eval_images, eval_tok, masking, batch_size=host_batch,
                           seed=config.train.seed + 1, train=False, shard_index=shard_index,
                           shard_count=shard_count)  # fmt: skip

    n = grid * grid
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
            "bool_masked_pos": np.zeros((host_batch, n), bool),
            "labels": np.zeros((host_batch, n), np.int32),
        },
        # "Tokens" of an image model: its patches (for the tokens/s metric).
        count_tokens=lambda batch: int(np.prod(batch["bool_masked_pos"].shape)),
    )
