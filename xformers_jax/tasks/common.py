"""What the training objectives share.

* `host_batch_size`: the rows each host feeds per step (checked once, for every task);
* `cross_entropy` / `loss_sums` and `accuracy_metrics`: the token (or example) cross-entropy with
  the sums its metrics reduce from exactly across steps and hosts;
* `datasets`, `corpus_datasets`, `zeros_batch` and `task_spec`: the train / eval dataset
  factories, an init batch and the `TaskSpec` of a built `(module, model config, architecture)`;
* the fine-tuning tasks' pieces: `apply_head`, `label_loss`, `head_inputs`, `build_finetune` (a
  head over a dataset generated from the bundled corpus, `data.finetune_data`);
* the text-to-text tasks' pieces (span corruption, seq2seq): `build_text_to_text`,
  `text_to_text_loss`, `text_to_text_tokens`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xformers_jax import config_lib, models, sharding
from xformers_jax.tasks import TaskSpec


def host_batch_block(config) -> tuple[tuple[int, ...], int]:
    """`(blocks, count)`: this host feeds blocks `blocks` of the `count` equal row blocks of
    every global batch, the rows its devices hold under the run's mesh (`sharding.batch_block`).

    One process feeds everything; with several, hosts that share rows (a `tensor` or `fsdp` axis
    spanning hosts) feed the same blocks.

    Raises:
      ConfigError: the batch does not split over the mesh's batch axes.
    """
    if jax.process_count() == 1:
        return (0,), 1
    mesh = sharding.make_mesh(config.mesh)
    try:
        return sharding.batch_block(mesh, int(config.train.batch_size))
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def host_batch_size(config) -> int:
    """The rows this host feeds per step: its blocks of `train.batch_size` (all on one host)."""
    blocks, count = host_batch_block(config)
    return int(config.train.batch_size) // count * len(blocks)


def loss_sums(losses, predictions, labels, valid) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean of `losses` over the `valid` positions, and the sums behind it.

    Args:
      losses: float `[...]` per-position losses; `predictions`, `labels`: int `[...]`; `valid`:
        bool `[...]` (the other positions count nowhere).

    Returns:
      `(mean loss, {'loss_sum', 'weight' (float32 count), 'correct'})`.
    """
    weight = jnp.sum(valid).astype(jnp.float32)
    loss_sum = jnp.sum(jnp.where(valid, losses, 0.0))
    correct = jnp.sum(jnp.where(valid, predictions == labels, False))
    aux = {"loss_sum": loss_sum, "weight": weight, "correct": correct}
    return loss_sum / jnp.maximum(weight, 1.0), aux


def cross_entropy(logits, labels, valid) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`loss_sums` of the float32 cross-entropy of `logits` `[..., classes]` against int `labels`
    `[...]` at the `valid` positions (labels elsewhere may be anything, e.g. -100)."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return loss_sums(losses, jnp.argmax(logits, -1), labels, valid)


def accuracy_metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy from summed aux values (`loss_sum`, `weight`, `correct`)."""
    weight = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / weight, "accuracy": float(sums["correct"]) / weight}


def datasets(config, make: Callable[..., Any], train_args: tuple, eval_args: tuple, **kwargs):
    """`(train_data, eval_data)` of a `TaskSpec`: `(shard_index, shard_count) -> dataset`.

    Each calls `make(*args, batch_size=host_batch_size(config), seed=..., train=...,
    shard_index=..., shard_count=..., **kwargs)`; the training split is shuffled with
    `train.seed`, the eval split gets `train.seed + 1`.
    """
    batch_size, seed = host_batch_size(config), config.train.seed

    def factory(args: tuple, train: bool, split_seed: int):
        return lambda shard_index, shard_count, **more: make(
            *args,
            batch_size=batch_size,
            seed=split_seed,
            train=train,
            shard_index=shard_index,
            shard_count=shard_count,
            **kwargs,
            **more,
        )

    return factory(train_args, True, seed), factory(eval_args, False, seed + 1)


def corpus_datasets(config, workdir: str, make: Callable[..., Any], **kwargs):
    """`datasets` of `make(files, ...)` over the run's training and eval text files
    (`data.tokenizers.train_files` / `eval_files`)."""
    from xformers_jax.data.tokenizers import eval_files, holdout, train_files

    train, evaluation = (train_files(config, workdir),), (eval_files(config, workdir),)
    train_data, eval_data = datasets(
        config, make, train, evaluation, text_field=config.data.get("text_field", "text"), **kwargs
    )
    if holdout(config, "eval") is None:
        return train_data, eval_data
    # No eval files: a held-out slice of the training files by content hash, never the files.
    return (
        lambda i, n: train_data(i, n, holdout="train"),
        lambda i, n: eval_data(i, n, holdout="eval"),
    )


def prepared_tokenizer(config):
    """The tokenizer saved with `data.prepared_dir`'s shards (None without one, or when
    `data.tokenizer` names the tokenizer)."""
    if not config.data.get("prepared_dir") or config.data.tokenizer:
        return None
    from xformers_jax.data.prepared import Prepared

    return Prepared.open(config.data.prepared_dir).tokenizer()


def _make_row(config, tokenizer, objective: str, **kwargs):
    """`(chunk, rng, others, reverse) -> example` of `objective` (`data.prepared.*_row`)."""
    import functools

    from xformers_jax.data import prepared

    d = config.data
    if objective == "mlm":
        masker = prepared.MlmMasker(
            vocab_size=tokenizer.vocab_size,
            special_ids=tokenizer.special_ids,
            mask_token_id=tokenizer.mask_id,
            mask_prob=d.mask_prob,
            pad_id=tokenizer.pad_id,
        )
        return functools.partial(
            prepared.mlm_row,
            seq_len=d.seq_len,
            bos_id=tokenizer.bos_id,
            pad_id=tokenizer.pad_id,
            masker=masker,
        )
    if objective == "plm":
        return functools.partial(
            prepared.plm_row, sep_id=tokenizer.sep_token_id, cls_id=tokenizer.cls_token_id, **kwargs
        )
    from xformers_jax.data.span_corruption_examples import random_spans_helper

    _, targets_length = random_spans_helper(
        d.seq_len, kwargs["noise_density"], kwargs["mean_noise_span_length"]
    )
    return functools.partial(
        prepared.span_row,
        inputs_length=d.seq_len,
        targets_length=targets_length,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        **kwargs,
    )


def text_data(config, workdir: str, tokenizer, objective: str, **kwargs):
    """`(train_data, eval_data)` of a pretraining objective (`mlm`, `plm`, `span_corruption`)
    from `data.prepared_dir`'s shards, or streamed from `data.train_files` with
    `data.streaming`; None for neither (the small in-memory pipelines). `kwargs`: the
    objective's example options."""
    from xformers_jax.data import prepared
    from xformers_jax.data.prepare import layout

    d = config.data
    if not (d.get("prepared_dir") or (d.get("streaming") and d.train_files)):
        return None
    host_batch_size(config)  # the batch must split over the hosts
    make_row = _make_row(config, tokenizer, objective, **kwargs)
    lay = layout(config, tokenizer)
    if d.get("prepared_dir"):
        _, data = prepared.prepared_datasets(
            config, make_row, lay["chunk_len"], streams=objective == "plm"
        )
        return data
    from xformers_jax.data.streaming import streaming_datasets

    bi_data = objective == "plm" and bool(config.model.get("bi_data", False))
    return streaming_datasets(config, workdir, tokenizer, make_row, lay, bi_data=bi_data)


def zeros_batch(batch_size: int, **fields: tuple[tuple[int, ...], Any]) -> dict[str, np.ndarray]:
    """An init batch of zeros: `name=(per-example shape, dtype)` -> `[batch_size, *shape]`."""
    return {k: np.zeros((batch_size, *shape), dtype) for k, (shape, dtype) in fields.items()}


def task_spec(
    built: tuple,
    loss_fn: Callable,
    metrics: Callable,
    data: tuple,
    init_batch: dict[str, Any],
    count_tokens: Callable,
    **fields,
) -> TaskSpec:
    """The `TaskSpec` of `built` = `models.build_model(...)`'s `(module, config, architecture)`
    with `data` = `datasets(...)`'s pair; `fields`: the spec's optional fields (`init_extra`,
    `report`, `mutable`, ...)."""
    module, model_config, architecture = built
    train_data, eval_data = data
    return TaskSpec(
        model=module,
        model_config=model_config,
        architecture=architecture,
        loss_fn=loss_fn,
        metrics=metrics,
        train_data=train_data,
        eval_data=eval_data,
        init_batch=init_batch,
        count_tokens=count_tokens,
        **fields,
    )


def check_vocab(tokenizer_size: int, model_cfg) -> None:
    """The model vocabulary must hold every id of the tokenizer."""
    if tokenizer_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer_size} tokens but model.vocab_size is {model_cfg.vocab_size}"
        )


# ------------------------------------------------------------------------------ fine-tuning


def apply_head(params, batch, rng, model, deterministic, **extra):
    """A fine-tuning head on a batch's inputs (its label keys go in `extra` as the head's
    `labels=` / `start_positions=` / ... arguments)."""
    inputs = {
        k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")
    }
    # `lsh`: the hash functions of YOSO's sampled attention, as in MLM pretraining (other
    # families ignore it).
    rngs = {"dropout": rng, "lsh": jax.random.fold_in(rng, 1)}
    return model.apply(
        {"params": params}, **inputs, **extra, deterministic=deterministic, rngs=rngs
    )


def label_loss(params, batch, rng, *, model, deterministic: bool = False):
    """The head's cross-entropy over one label per example (`labels` `[batch]`: sequence
    classification, multiple choice); aux sums `loss_sum`, `weight`, `correct`."""
    out = apply_head(params, batch, rng, model, deterministic, labels=batch["labels"])
    n = jnp.asarray(batch["labels"].shape[0], jnp.float32)
    correct = jnp.sum(jnp.argmax(out.logits, -1) == batch["labels"])
    return out.loss, {"loss_sum": out.loss * n, "weight": n, "correct": correct}


def head_inputs(module, arrays: dict[str, Any]) -> dict[str, Any]:
    """The arrays the head takes (e.g. `p_mask` only for heads that restrict answers).

    Every batch key reaches the head (the trainer initialises it with them), so a dataset's
    optional inputs are dropped for heads whose `__call__` has no such argument.
    """
    takes = inspect.signature(type(module).__call__).parameters
    return {k: v for k, v in arrays.items() if k in takes}


def build_finetune(
    config,
    workdir: str,
    task: str,
    make_data: Callable,
    num_labels: int,
    loss: Callable,
    task_metrics: Callable,
) -> TaskSpec:
    """The `TaskSpec` of a fine-tuning task over a generated dataset.

    Nothing here depends on the family at run time: the tokenizer lays out examples (XLNet's
    CLS-last, left-padded layout or XLM-R's) and the registry picks the head.

    Args:
      task: the registry task name (picks the head, e.g. 'qa' -> `...ForQuestionAnswering`).
      make_data: `(tokenizer, seq_len, train) -> dict of arrays` (see `data.finetune_data`).
      num_labels: what the data needs; `model.num_labels` must equal it.
    """
    from xformers_jax.data.finetune_data import ArrayBatches
    from xformers_jax.data.tokenizers import text_tokenizer

    built = models.build_model(config.model, task=task)
    module, model_cfg, _ = built
    if model_cfg.num_labels != num_labels:
        raise config_lib.ConfigError(
            f"config key 'model.num_labels' is {model_cfg.num_labels}; task {task} has "
            f"{num_labels} labels"
        )
    tokenizer = text_tokenizer(config, workdir)
    check_vocab(tokenizer.vocab_size, model_cfg)
    train_arrays = head_inputs(module, make_data(tokenizer, config.data.seq_len, True))
    eval_arrays = head_inputs(module, make_data(tokenizer, config.data.seq_len, False))
    data = datasets(config, ArrayBatches, (train_arrays,), (eval_arrays,))
    init_batch = {k: v[: host_batch_size(config)] for k, v in train_arrays.items()}
    count_tokens = lambda b: int(np.sum(b["attention_mask"]))  # noqa: E731
    return task_spec(built, loss, task_metrics, data, init_batch, count_tokens)


# ------------------------------------------------------------------------------ text to text

# Model config fields that must hold the tokenizer's ids (pad, eos, and pad to start decoding).
_ID_FIELDS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")


def build_text_to_text(config, tokenizer, task: str):
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
    check_vocab(len(tokenizer), model_cfg)
    return module, model_cfg, arch


def text_to_text_loss(params, batch, rng, *, model, deterministic: bool = False):
    """Token cross-entropy over the targets (`labels != -100`) of an encoder-decoder head.

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
    return cross_entropy(out.logits, batch["labels"], batch["labels"] != -100)


def text_to_text_tokens(batch) -> int:
    """Real tokens in a host batch: encoder tokens plus target tokens."""
    return int(np.sum(batch["attention_mask"]) + np.sum(batch["labels"] != -100))
