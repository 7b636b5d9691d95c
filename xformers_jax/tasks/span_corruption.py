"""T5 span-corruption pretraining (mT5): encoder sees the corrupted text, decoder predicts spans.

Batches come from `data.span_corruption.span_corruption_dataset` (`input_ids`, `attention_mask`
`[B, n]`, `decoder_input_ids` and `labels` `[B, m]` with -100 padding); the head is
`MT5ForConditionalGeneration`. Loss: mean cross-entropy over target tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import models
from xformers_jax.tasks import TaskSpec
from xformers_jax.tasks.mlm import eval_files, metrics, tokenizer_for, train_files


def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    """Token cross-entropy over the targets (`labels != -100`).

    Returns:
      `(mean loss, {'loss_sum', 'weight', 'correct'})`, sums over target tokens.
    """
    out = model.apply(
        {"params": params},
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
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


def count_tokens(batch) -> int:
    """Real tokens in a host batch: encoder tokens plus target tokens."""
    return int(np.sum(batch["attention_mask"]) + np.sum(batch["labels"] != -100))


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.span_corruption import random_spans_helper, span_corruption_dataset

    tokenizer = tokenizer_for(config, workdir)
    module, model_cfg, arch = models.build_model(config.model, task="span_corruption")
    ids = dict(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    wrong = {k: getattr(model_cfg, k) for k, v in ids.items() if getattr(model_cfg, k) != v}
    if wrong:
        raise ValueError(f"model {wrong} differ from the tokenizer's {ids}: set model.* to match")
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise ValueError(
            f"train.batch_size {config.train.batch_size} is not divisible by {n_proc} hosts"
        )
    host_batch = config.train.batch_size // n_proc
    d = config.data
    common = dict(tokenizer=tokenizer, inputs_length=d.seq_len, batch_size=host_batch,
                  vocab_size=model_cfg.vocab_size, noise_density=d.noise_density,
                  mean_noise_span_length=d.mean_noise_span_length,
                  num_sentinels=d.num_sentinels)  # fmt: skip

    def train_data(shard_index: int, shard_count: int):
        return span_corruption_dataset(train_files(config, workdir), seed=config.train.seed,
                                       train=True, shard_index=shard_index,
                                       shard_count=shard_count, **common)  # fmt: skip

    def eval_data(shard_index: int, shard_count: int):
        return span_corruption_dataset(eval_files(config, workdir), seed=config.train.seed + 1,
                                       train=False, shard_index=shard_index,
                                       shard_count=shard_count, **common)  # fmt: skip

    _, targets_length = random_spans_helper(d.seq_len, d.noise_density, d.mean_noise_span_length)
    inputs = np.zeros((host_batch, d.seq_len), np.int32)
    return TaskSpec(
        model=module,
        model_config=model_cfg,
        architecture=arch,
        loss_fn=loss_fn,
        metrics=metrics,
        train_data=train_data,
        eval_data=eval_data,
        init_batch={
            "input_ids": inputs,
            "attention_mask": inputs + 1,
            "decoder_input_ids": np.zeros((host_batch, targets_length), np.int32),
            "labels": np.zeros((host_batch, targets_length), np.int32),
        },  # fmt: skip
        count_tokens=count_tokens,
    )
