"""Masked language modelling: the RoBERTa objective (15% of tokens, 80/10/10), mean token loss.

Two switches for large vocabularies (XLM-V 900k, XL 250k), both off by default:
`data.max_predictions > 0` runs the LM head only on the masked positions (gathered in the loss
function from the labels), and `loss.vocab_chunk_size > 0` computes the cross-entropy chunked
over the vocabulary, never materialising logits. Both give the same loss as the full path.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import models
from xformers_jax.tasks import TaskSpec


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
        labels = jnp.where(positions >= 0, jnp.take_along_axis(labels, jnp.maximum(positions, 0),
                                                               axis=1), -100)  # fmt: skip
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
        losses, predictions = out.token_losses, out.predictions
    else:
        logits = out.logits.astype(jnp.float32)
        safe = jnp.where(valid, labels, 0)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        predictions = jnp.argmax(logits, -1)
    weight = jnp.sum(valid)
    loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
    correct = jnp.sum(jnp.where(valid, predictions == labels, False))
    aux = {"loss_sum": loss_sum, "weight": weight.astype(jnp.float32), "correct": correct}
    return loss_sum / jnp.maximum(weight, 1), aux


def metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Loss and accuracy over masked tokens from summed aux values."""
    weight = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / weight, "accuracy": float(sums["correct"]) / weight}


def _sentencepiece(path: str, convention: str = "native"):
    from xformers_jax.data import SentencePieceTokenizer

    return SentencePieceTokenizer.load(path, convention=convention)


def _xlnet(path: str):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    return XLNetTokenizer.load(path)


def _train_sentencepiece(texts, prefix: str, vocab_size: int):
    from xformers_jax.data import SentencePieceTokenizer

    return SentencePieceTokenizer.train(texts, prefix, vocab_size)


def _train_xlnet(texts, prefix: str, vocab_size: int):
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    return XLNetTokenizer.train(texts, prefix, vocab_size)


# `data.tokenizer_type` -> (the prefix a run trains its model to in the workdir, the loader of a
# `.model` file, the trainer, the tokenizer files an `init_from` dir may hold with their loaders).
# `sentencepiece`: fairseq/XLM-R ids (an MLM or span-corruption workdir's `tokenizer.model`, an
# HF XLM-R dir's `sentencepiece.bpe.model`). `xlnet`: XLNet's ids and example layout, trained
# and named as PLM pretraining does (a PLM workdir's or an HF XLNet dir's `spiece.model`; the
# dir is loaded, for an HF dir's `tokenizer_config.json` flags).
TOKENIZER_TYPES = {
    "sentencepiece": (
        "tokenizer", _sentencepiece, _train_sentencepiece,
        (("tokenizer.model", _sentencepiece),
         ("sentencepiece.bpe.model", lambda p: _sentencepiece(p, "xlm-roberta"))),
    ),
    "xlnet": (
        "spiece", _xlnet, _train_xlnet,
        (("spiece.model", lambda p: _xlnet(os.path.dirname(p))),),
    ),
}  # fmt: skip


def tokenizer_for(config, workdir: str):
    """The run's tokenizer, of kind `data.tokenizer_type` (`TOKENIZER_TYPES`; default
    `sentencepiece`).

    In order: `data.tokenizer` if set; the one this run saved in its workdir; the one saved with
    `init_from` (a pretraining workdir or an HF dir holding its tokenizer, so a checkpoint and
    its tokenizer carry over together); else one trained on the training corpus, once, kept in
    the workdir so a resumed run tokenises identically.
    """
    from xformers_jax import config_lib
    from xformers_jax.data import read_lines

    kind = config.data.get("tokenizer_type", "sentencepiece")
    if kind not in TOKENIZER_TYPES:
        raise config_lib.ConfigError(
            f"config key 'data.tokenizer_type' must be one of {', '.join(TOKENIZER_TYPES)}; "
            f"got {kind!r}"
        )
    stem, load, train, saved = TOKENIZER_TYPES[kind]
    if config.data.tokenizer:
        return load(config.data.tokenizer)
    prefix = os.path.join(workdir, stem)
    if os.path.exists(prefix + ".model"):
        return load(prefix + ".model")
    init_from = config.get("init_from", "")
    for name, load_saved in saved if init_from else ():
        if os.path.isfile(os.path.join(init_from, name)):
            return load_saved(os.path.join(init_from, name))
    texts = [line for f in train_files(config, workdir) for line in read_lines(f)]
    return train(texts, prefix, config.data.vocab_size)


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


def make_loss_fn(config):
    """`loss_fn` with this config's masked-only / vocab-chunked options (what the trainer runs)."""
    return functools.partial(
        loss_fn,
        max_predictions=int(config.data.get("max_predictions", 0)),
        vocab_chunk_size=int(config.get("loss", {}).get("vocab_chunk_size", 0)),
    )


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
        loss_fn=make_loss_fn(config),
        metrics=metrics,
        train_data=train_data,
        eval_data=eval_data,
        init_batch={"input_ids": zeros, "attention_mask": zeros + 1, "labels": zeros},
        count_tokens=tokens_per_batch,
    )
