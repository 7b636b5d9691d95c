"""Masked language modelling: the RoBERTa objective (15% of tokens, 80/10/10), mean token loss."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import models
from xformers_jax.tasks import TaskSpec


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """Cross-entropy at the masked positions (`labels != -100`).

    Args:
      batch: `input_ids`, `attention_mask`, `labels`, each `[batch, length]` int32.

    Returns:
      `(mean loss, {'loss_sum', 'weight', 'correct'})`, sums over the masked tokens.
    """
    out = model.apply(
        {"params": params},
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
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
    return loss_sum / jnp.maximum(weight, 1), aux


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Loss and accuracy over masked tokens from summed aux values."""
    weight = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / weight, "accuracy": float(sums["correct"]) / weight}


def tokenizer_for(config, workdir: str):
    """The run's tokenizer: `data.tokenizer` if set, else one trained on the training corpus
    (once, kept in the workdir so a resumed run tokenises identically)."""
    from xformers_jax.data import SentencePieceTokenizer, read_lines

    if config.data.tokenizer:
        return SentencePieceTokenizer.load(config.data.tokenizer)
    prefix = os.path.join(workdir, "tokenizer")
    if os.path.exists(prefix + ".model"):
        return SentencePieceTokenizer.load(prefix + ".model")
    texts = [line for f in train_files(config, workdir) for line in read_lines(f)]
    return SentencePieceTokenizer.train(texts, prefix, config.data.vocab_size)


def train_files(config, workdir: str) -> list[str]:
    from xformers_jax.data import default_corpus

    if config.data.train_files:
        return list(config.data.train_files)
    return [default_corpus(os.path.join(workdir, "corpus"))[0]]


def eval_files(config, workdir: str) -> list[str]:
    from xformers_jax.data import default_corpus

    if config.data.eval_files:
        return list(config.data.eval_files)
    if config.data.train_files:
        return list(config.data.train_files)
    return [default_corpus(os.path.join(workdir, "corpus"))[1]]


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data import mlm_dataset, tokens_per_batch

    tokenizer = tokenizer_for(config, workdir)
    module, model_cfg, arch = models.build_model(config.model, task="mlm")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{model_cfg.vocab_size}"
        )
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise ValueError(
            f"train.batch_size {config.train.batch_size} is not divisible by {n_proc} hosts"
        )
    host_batch = config.train.batch_size // n_proc
    seq_len = config.data.seq_len
    common = dict(tokenizer=tokenizer, seq_len=seq_len, batch_size=host_batch,
                  mask_prob=config.data.mask_prob)  # fmt: skip

    def train_data(shard_index: int, shard_count: int):
        return mlm_dataset(train_files(config, workdir), seed=config.train.seed, train=True,
                           shard_index=shard_index, shard_count=shard_count, **common)  # fmt: skip

    def eval_data(shard_index: int, shard_count: int):
        return mlm_dataset(eval_files(config, workdir), seed=config.train.seed + 1, train=False,
                           shard_index=shard_index, shard_count=shard_count, **common)  # fmt: skip

    zeros = np.zeros((host_batch, seq_len), np.int32)
    return TaskSpec(
        model=module,
        model_config=model_cfg,
        architecture=arch,
        loss_fn=loss_fn,
        metrics=metrics,
        train_data=train_data,
        eval_data=eval_data,
        init_batch={"input_ids": zeros, "attention_mask": zeros + 1, "labels": zeros},
        count_tokens=tokens_per_batch,
    )
