"""XLNet permutation language modelling: predict `num_predict` targets per row through the query
stream (`perm_mask` + `target_mapping`), mean cross-entropy over the real targets.

With `model.use_mems_train` and a `mem_len`, Transformer-XL mems are carried across training
steps in the train state (`TrainState.extra`, sharded on batch, saved in checkpoints). Batch row i
of consecutive steps comes from the shuffled corpus, not a contiguous stream, so the recurrence
links unrelated segments; the mechanics match the original, the data order does not.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import models
from xformers_jax.tasks import TaskSpec
from xformers_jax.tasks.mlm import eval_files, train_files

_MODEL_INPUTS = ("input_ids", "token_type_ids", "perm_mask", "target_mapping")


def loss_fn(params, batch, rng, *, model, deterministic: bool = False, extra=None):
    """Cross-entropy of the `[b, num_predict]` targets (`labels`, -100 = none).

    With `extra={"mems": [layers, batch, mem_len, d_model]}` the step attends to the previous
    step's mems (Transformer-XL recurrence) and returns the new ones as `aux["extra"]`.

    Returns:
      `(mean loss, {'loss_sum', 'weight', 'correct'[, 'extra']})`, sums over real targets.
    """
    mems_kw = {"use_mems": False}
    if extra is not None:
        mems_kw = {"mems": extra["mems"], "use_mems": True, "return_stacked_mems": True}
    out = model.apply(
        {"params": params},
        **{k: batch[k] for k in _MODEL_INPUTS},
        **mems_kw,
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    labels = batch["labels"]
    valid = labels != -100
    logits = out.logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    weight = jnp.sum(valid)
    loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
    aux = {"loss_sum": loss_sum, "weight": weight.astype(jnp.float32), "correct": correct}
    if extra is not None:
        aux["extra"] = {"mems": out.mems}
    return loss_sum / jnp.maximum(weight, 1), aux


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    weight = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / weight, "accuracy": float(sums["correct"]) / weight}


def tokenizer_for(config, workdir: str):
    """`data.tokenizer` (an HF XLNet tokenizer dir or `.model`), else one trained on the corpus
    once and kept in the workdir (a resumed run tokenises identically)."""
    from xformers_jax.data import read_lines
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    if config.data.tokenizer:
        return XLNetTokenizer.load(config.data.tokenizer)
    prefix = os.path.join(workdir, "spiece")
    if os.path.exists(prefix + ".model"):
        return XLNetTokenizer.load(prefix + ".model")
    texts = [line for f in train_files(config, workdir) for line in read_lines(f)]
    return XLNetTokenizer.train(texts, prefix, config.data.vocab_size)


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.plm import plm_dataset

    tokenizer = tokenizer_for(config, workdir)
    module, model_cfg, arch = models.build_model(config.model, task="plm")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{model_cfg.vocab_size}"
        )
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by hosts")
    host_batch = config.train.batch_size // n_proc
    d = config.data
    seq_len, num_predict = d.seq_len, d.num_predict
    common = dict(tokenizer=tokenizer, seq_len=seq_len, batch_size=host_batch,
                  num_predict=num_predict, perm_size=d.perm_size, reuse_len=d.reuse_len,
                  bi_data=bool(model_cfg.bi_data), max_span=d.max_span)  # fmt: skip

    def train_data(shard_index: int, shard_count: int):
        return plm_dataset(train_files(config, workdir), seed=config.train.seed, train=True,
                           shard_index=shard_index, shard_count=shard_count, **common)  # fmt: skip

    def eval_data(shard_index: int, shard_count: int):
        return plm_dataset(eval_files(config, workdir), seed=config.train.seed + 1, train=False,
                           shard_index=shard_index, shard_count=shard_count, **common)  # fmt: skip

    b = host_batch
    init_batch = {
        "input_ids": np.zeros((b, seq_len), np.int32),
        "token_type_ids": np.zeros((b, seq_len), np.int32),
        "perm_mask": np.zeros((b, seq_len, seq_len), np.float32),
        "target_mapping": np.zeros((b, num_predict, seq_len), np.float32),
        "labels": np.zeros((b, num_predict), np.int32),
    }
    init_extra = extra_axes = None
    if model_cfg.use_mems_train and model_cfg.mem_len:
        # Mems start as zeros, as in the original XLNet training loop; each step's mems are
        # its layers' inputs over the first `reuse_len` tokens, the last `mem_len` kept.
        shape = (model_cfg.n_layer, config.train.batch_size, model_cfg.mem_len, model_cfg.d_model)
        init_extra = lambda: {"mems": np.zeros(shape, np.float32)}  # noqa: E731
        extra_axes = {"mems": ("layers", "act_batch", None, "act_embed")}
    return TaskSpec(
        model=module, model_config=model_cfg, architecture=arch, loss_fn=loss_fn,
        metrics=metrics, train_data=train_data, eval_data=eval_data, init_batch=init_batch,
        count_tokens=lambda batch: int(np.size(batch["input_ids"])),
        init_extra=init_extra, extra_axes=extra_axes,
    )  # fmt: skip
