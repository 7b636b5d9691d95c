"""T5 span-corruption pretraining (mT5): encoder sees the corrupted text, decoder predicts spans.

Batches come from `data.span_corruption.span_corruption_dataset` (`input_ids`, `attention_mask`
`[B, n]`, `decoder_input_ids` and `labels` `[B, m]` with -100 padding); the head is
`MT5ForConditionalGeneration`. Loss: mean cross-entropy over target tokens.

Tokenizer (`text_tokenizer`, shared with the seq2seq task): a T5/mT5 one (`data.tokenizer` an HF
T5/MT5 tokenizer dir or a T5-layout `.model`, or `data.tokenizer_type='t5'`; ids as
`transformers.T5Tokenizer`, sentinels its `<extra_id_i>` = `len(tokenizer) - 1 - i`) or the
fairseq-layout one of `tasks.mlm.tokenizer_for` (sentinels the model vocabulary's last ids). The
model's `pad_token_id` / `eos_token_id` / `decoder_start_token_id` must be the tokenizer's `<pad>`,
`</s>` and `<pad>` (T5 starts decoding with `<pad>`): T5's 0, 1, 0 or the fairseq layout's 1, 2, 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import models
from xformers_jax.tasks import TaskSpec
from xformers_jax.tasks.mlm import eval_files, metrics, tokenizer_for, train_files

# Model config fields that must hold the tokenizer's ids (pad, eos, and pad to start decoding).
_ID_FIELDS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")


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


def text_tokenizer(config, workdir: str, texts=None):
    """The run's tokenizer: a `T5Tokenizer` where the config asks for one (see the module
    docstring and `data.t5_tokenizer.t5_tokenizer_for`), else the fairseq-layout one of
    `data.tokenizer` or `tasks.mlm.tokenizer_for`.

    Args:
      texts: `() -> list[str]`, the texts a new tokenizer is trained on (default: the lines of
        the training files).
    """
    from xformers_jax.data import SentencePieceTokenizer, read_lines
    from xformers_jax.data.t5_tokenizer import t5_tokenizer_for

    if texts is None:
        texts = lambda: [line for f in train_files(config, workdir) for line in read_lines(f)]  # noqa: E731
    tok = t5_tokenizer_for(config.data, workdir, texts, init_from=config.get("init_from", ""))
    if tok is not None:
        return tok
    if config.data.get("tokenizer_type") == "t5":
        # A T5 run given a fairseq-layout data.tokenizer (e.g. a span-corruption run's): the
        # file decides.
        return SentencePieceTokenizer.load(config.data.tokenizer)
    return tokenizer_for(config, workdir)


def build_model_for(config, tokenizer, task: str):
    """(head module, model config, architecture), checked against the tokenizer.

    `model.pad_token_id`, `model.eos_token_id` and `model.decoder_start_token_id` must be the
    tokenizer's `<pad>`, `</s>` and `<pad>` (T5 starts decoding with `<pad>`), and the model
    vocabulary must hold every tokenizer id. (The ids are checked, not copied: they are written to
    the run's config.json and to an exported HF config.)

    Raises:
      ValueError: the ids differ (the message gives the overrides that fix them), or the
        vocabulary is too small.
    """
    want = dict(zip(_ID_FIELDS, (tokenizer.pad_id, tokenizer.eos_id, tokenizer.pad_id)))
    module, model_cfg, arch = models.build_model(config.model, task=task)
    wrong = {k: getattr(model_cfg, k) for k, v in want.items() if getattr(model_cfg, k) != v}
    if wrong:
        flags = " ".join(f"--config.model.{k}={v}" for k, v in want.items())
        raise ValueError(
            f"model ids {wrong} differ from the tokenizer's ({tokenizer!r}: pad {tokenizer.pad_id},"
            f" eos {tokenizer.eos_id}, decoding starts with pad): pass {flags}"
        )
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} ids but model.vocab_size is {model_cfg.vocab_size}"
        )
    return module, model_cfg, arch


def sentinel_vocab_size(tokenizer, model_cfg, num_sentinels: int) -> int:
    """The vocabulary whose last `num_sentinels` ids are the sentinels: a T5 tokenizer's own
    (`<extra_id_i>`), else the model's."""
    from xformers_jax.data.t5_tokenizer import T5Tokenizer

    if not isinstance(tokenizer, T5Tokenizer):
        return model_cfg.vocab_size
    if num_sentinels > tokenizer.extra_ids:
        raise ValueError(
            f"data.num_sentinels {num_sentinels} > the {tokenizer.extra_ids} sentinels "
            f"(<extra_id_i>) of the tokenizer {tokenizer.path}"
        )
    return len(tokenizer)


def build(config, workdir: str) -> TaskSpec:
    from xformers_jax.data.span_corruption import random_spans_helper, span_corruption_dataset

    tokenizer = text_tokenizer(config, workdir)
    module, model_cfg, arch = build_model_for(config, tokenizer, "span_corruption")
    n_proc = jax.process_count()
    if config.train.batch_size % n_proc:
        raise ValueError(
            f"train.batch_size {config.train.batch_size} is not divisible by {n_proc} hosts"
        )
    host_batch = config.train.batch_size // n_proc
    d = config.data
    common = dict(tokenizer=tokenizer, inputs_length=d.seq_len, batch_size=host_batch,
                  vocab_size=sentinel_vocab_size(tokenizer, model_cfg, d.num_sentinels),
                  noise_density=d.noise_density,
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
