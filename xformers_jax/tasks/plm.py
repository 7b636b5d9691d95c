"""XLNet permutation language modelling: predict `num_predict` targets per row through the query
stream (`perm_mask` + `target_mapping`), mean cross-entropy over the real targets.

With `model.use_mems_train` and a `mem_len`, Transformer-XL mems are carried across training
steps in the train state (`TrainState.extra`, sharded on batch, saved in checkpoints). From
prepared shards (`data.prepared_dir`) batch row i of consecutive steps reads consecutive chunks of
one contiguous stream of text, as the original pipeline does, so the mems hold the preceding
segment of the same text; the small in-memory pipeline (`data.train_files` without prepare)
shuffles chunks, so there the recurrence links unrelated segments.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from xformers_jax import models
from xformers_jax.tasks import TaskSpec, common

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
    loss, aux = common.cross_entropy(out.logits, labels, labels != -100)
    if extra is not None:
        aux["extra"] = {"mems": out.mems}
    return loss, aux


metrics = common.accuracy_metrics


def build(config, workdir: str, tokenizer=None) -> TaskSpec:
    from xformers_jax.data.plm_examples import plm_dataset
    from xformers_jax.data.tokenizers import text_tokenizer

    # XLNet's tokenizer (spm model `spiece.model`), trained on the corpus once unless the config,
    # the workdir or `init_from` hold one.
    if tokenizer is None:
        tokenizer = common.prepared_tokenizer(config) or text_tokenizer(
            config, workdir, default_type="xlnet"
        )
    built = models.build_model(config.model, task="plm")
    model_cfg = built[1]
    common.check_vocab(tokenizer.vocab_size, model_cfg)
    d = config.data
    seq_len, num_predict = d.seq_len, d.num_predict
    plm_kwargs = dict(
        num_predict=num_predict, perm_size=d.perm_size, reuse_len=d.reuse_len, max_span=d.max_span
    )
    data = common.text_data(config, workdir, tokenizer, "plm", **plm_kwargs)
    if data is None:
        data = common.corpus_datasets(
            config,
            workdir,
            plm_dataset,
            tokenizer=tokenizer,
            seq_len=seq_len,
            bi_data=bool(model_cfg.bi_data),
            **plm_kwargs,
        )
    init_batch = common.zeros_batch(
        common.host_batch_size(config),
        input_ids=((seq_len,), np.int32),
        token_type_ids=((seq_len,), np.int32),
        perm_mask=((seq_len, seq_len), np.float32),
        target_mapping=((num_predict, seq_len), np.float32),
        labels=((num_predict,), np.int32),
    )
    init_extra = extra_axes = None
    if model_cfg.use_mems_train and model_cfg.mem_len:
        # Mems start as zeros, as in the original XLNet training loop; each step's mems are
        # its layers' inputs over the first `reuse_len` tokens, the last `mem_len` kept. Built
        # with jnp inside the jitted init, so each device allocates only its shard (a host
        # array of the global shape would be ~288 GiB for the large preset on a pod batch).
        shape = (model_cfg.n_layer, config.train.batch_size, model_cfg.mem_len, model_cfg.d_model)
        init_extra = lambda: {"mems": jnp.zeros(shape, jnp.float32)}  # noqa: E731
        extra_axes = {"mems": ("layers", "act_batch", None, "act_embed")}
    count_tokens = lambda batch: int(np.size(batch["input_ids"]))  # noqa: E731
    extra = dict(init_extra=init_extra, extra_axes=extra_axes)
    return common.task_spec(built, loss_fn, metrics, data, init_batch, count_tokens, **extra)
