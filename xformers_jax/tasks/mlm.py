"""Masked language modelling: the RoBERTa objective (15% of tokens, 80/10/10), mean token loss.

Two switches for large vocabularies (XLM-V 900k, XL 250k), both off by default:
`data.max_predictions > 0` runs the LM head only on the masked positions (gathered in the loss
function from the labels), and `loss.vocab_chunk_size > 0` computes the cross-entropy chunked
over the vocabulary, never materialising logits. Both give the same loss as the full path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax import models
from xformers_jax.tasks import TaskSpec, common


def masked_positions(labels: jax.Array, max_predictions: int) -> jax.Array:
    """The first `max_predictions` labelled positions of each row, `-1`-padded.

    `[batch, length]` labels (`-100` = not predicted) -> `[batch, max_predictions]` int32. Rows
    with more labelled tokens drop the excess (BERT's `max_predictions_per_seq`); with 15%
    masking, `max_predictions ~ 0.2 * length` keeps nearly all of them.
    """
    find = lambda row: jnp.nonzero(row != -100, size=max_predictions, fill_value=-1)[0]  # noqa: E731
    return jax.vmap(find)(labels).astype(jnp.int32)


def loss_fn(
    params,
    batch,
    rng,
    *,
    model,
    deterministic: bool = False,
    max_predictions: int = 0,
    vocab_chunk_size: int = 0,
):
    """Cross-entropy at the masked positions (`labels != -100`).

    Args:
      batch: `input_ids`, `attention_mask`, `labels`, each `[batch, length]` int32.
      max_predictions: > 0: gather the hidden states of at most this many masked positions per
        row before the LM head (logits `[batch, max_predictions, vocab]` instead of
        `[batch, length, vocab]`).
      vocab_chunk_size: > 0: no logits at all; the loss is a cross-entropy chunked over the
        vocabulary (`layers.losses.chunked_cross_entropy`).

    Returns:
      `(mean loss, {'loss_sum', 'weight', 'correct'})`, sums over the masked tokens.
    """
    labels = batch["labels"]
    extra = {}
    if max_predictions > 0:
        positions = masked_positions(labels, max_predictions)
        labels = jnp.where(
            positions >= 0, jnp.take_along_axis(labels, jnp.maximum(positions, 0), axis=1), -100
        )
        extra["masked_positions"] = positions
    if vocab_chunk_size > 0:
        extra.update(labels=labels, vocab_chunk_size=vocab_chunk_size)
    out = model.apply(
        {"params": params},
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        deterministic=deterministic,
        # `lsh`: the hash functions of YOSO's sampled attention (other families ignore it).
        rngs={"dropout": rng, "lsh": jax.random.fold_in(rng, 1)},
        **extra,
    )
    valid = labels != -100
    if vocab_chunk_size > 0:
        return common.loss_sums(out.token_losses, out.predictions, labels, valid)
    return common.cross_entropy(out.logits, labels, valid)


metrics = common.accuracy_metrics


def make_loss_fn(config):
    """`loss_fn` with this config's masked-only / vocab-chunked options (what the trainer runs)."""
    return functools.partial(
        loss_fn,
        max_predictions=int(config.data.get("max_predictions", 0)),
        vocab_chunk_size=int(config.get("loss", {}).get("vocab_chunk_size", 0)),
    )


def build(config, workdir: str, tokenizer=None) -> TaskSpec:
    from xformers_jax.data import mlm_dataset, tokens_per_batch
    from xformers_jax.data.tokenizers import text_tokenizer

    if tokenizer is None:
        tokenizer = common.prepared_tokenizer(config) or text_tokenizer(config, workdir)
    built = models.build_model(config.model, task="mlm")
    common.check_vocab(tokenizer.vocab_size, built[1])
    data = common.text_data(config, workdir, tokenizer, "mlm")
    if data is None:
        data = common.corpus_datasets(
            config,
            workdir,
            mlm_dataset,
            tokenizer=tokenizer,
            seq_len=config.data.seq_len,
            mask_prob=config.data.mask_prob,
        )
    zeros = np.zeros((common.host_batch_size(config), config.data.seq_len), np.int32)
    init_batch = {"input_ids": zeros, "attention_mask": zeros + 1, "labels": zeros}
    loss = make_loss_fn(config)
    return common.task_spec(built, loss, metrics, data, init_batch, tokens_per_batch)
