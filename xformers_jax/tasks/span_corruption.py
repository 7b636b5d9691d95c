"""T5 span-corruption pretraining (mT5): encoder sees the corrupted text, decoder predicts spans.

Batches come from `data.span_corruption_examples.span_corruption_dataset` (`input_ids`,
`attention_mask` `[B, n]`, `decoder_input_ids` and `labels` `[B, m]` with -100 padding); the head
is `MT5ForConditionalGeneration`. Loss: mean cross-entropy over target tokens.

Tokenizer (`data.tokenizers.seq2seq_tokenizer`, shared with the seq2seq task): a T5/mT5 one
(`data.tokenizer` an HF T5/MT5 tokenizer dir or a T5-layout `.model`, or
`data.tokenizer_type='t5'`; ids as `transformers.T5Tokenizer`, sentinels its `<extra_id_i>` =
`len(tokenizer) - 1 - i`) or the fairseq-layout one of `data.tokenizers.text_tokenizer`
(sentinels the model vocabulary's last ids). The model's `pad_token_id` / `eos_token_id` /
`decoder_start_token_id` must be the tokenizer's `<pad>`, `</s>` and `<pad>` (T5 starts decoding
with `<pad>`): T5's 0, 1, 0 or the fairseq layout's 1, 2, 1.
"""

from __future__ import annotations

import numpy as np

from xformers_jax.tasks import TaskSpec, common

loss_fn = common.text_to_text_loss
metrics = common.accuracy_metrics
count_tokens = common.text_to_text_tokens


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


def build(config, workdir: str, tokenizer=None) -> TaskSpec:
    from xformers_jax.data.span_corruption_examples import (
        random_spans_helper,
        span_corruption_dataset,
    )
    from xformers_jax.data.tokenizers import seq2seq_tokenizer

    if tokenizer is None:
        tokenizer = common.prepared_tokenizer(config) or seq2seq_tokenizer(config, workdir)
    built = common.build_text_to_text(config, tokenizer, "span_corruption")
    d = config.data
    span_kwargs = dict(
        vocab_size=sentinel_vocab_size(tokenizer, built[1], d.num_sentinels),
        noise_density=d.noise_density,
        mean_noise_span_length=d.mean_noise_span_length,
    )
    data = common.text_data(config, workdir, tokenizer, "span_corruption", **span_kwargs)
    if data is None:
        data = common.corpus_datasets(
            config,
            workdir,
            span_corruption_dataset,
            tokenizer=tokenizer,
            inputs_length=d.seq_len,
            num_sentinels=d.num_sentinels,
            **span_kwargs,
        )
    _, targets_length = random_spans_helper(d.seq_len, d.noise_density, d.mean_noise_span_length)
    init_batch = common.zeros_batch(
        common.host_batch_size(config),
        input_ids=((d.seq_len,), np.int32),
        attention_mask=((d.seq_len,), np.int32),
        decoder_input_ids=((targets_length,), np.int32),
        labels=((targets_length,), np.int32),
    )
    init_batch["attention_mask"] += 1
    return common.task_spec(built, loss_fn, metrics, data, init_batch, count_tokens)
