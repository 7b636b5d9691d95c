"""Data: sentencepiece tokenizers, text corpora, MLM collators and grain pipelines.

Public API::

    tok = SentencePieceTokenizer.train(texts, "workdir/spm", vocab_size=8000)   # or .load(path)
    t5 = T5Tokenizer.load("hf/mt5-small")     # T5/mT5 ids, equal to transformers.T5Tokenizer's
    train_file, eval_file = default_corpus("workdir/data")      # bundled, no download
    ds = mlm_dataset([train_file], tok, seq_len=128, batch_size=32, seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()     # JSON; it.set_state(state)
    pairs = dialog_pairs(["english"], "train")                  # prompt -> reply (seq2seq)
"""

from xformers_jax.data.collators import IGNORE_INDEX, mlm_mask
from xformers_jax.data.corpus import (
    DataError,
    chatterbot_languages,
    chatterbot_texts,
    default_corpus,
    read_lines,
)
from xformers_jax.data.dialog import (
    DialogPair,
    dialog_dataset,
    dialog_pairs,
    encode_pairs,
    read_pairs,
)
from xformers_jax.data.pipeline import mlm_dataset, pack_sequences, tokens_per_batch
from xformers_jax.data.span_corruption_examples import (
    random_spans_helper,
    random_spans_noise_mask,
    span_corruption_dataset,
)
from xformers_jax.data.t5_tokenizer import T5Tokenizer, is_t5_model
from xformers_jax.data.tokenizer import SentencePieceTokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DialogPair",
    "SentencePieceTokenizer",
    "T5Tokenizer",
    "chatterbot_languages",
    "chatterbot_texts",
    "default_corpus",
    "dialog_dataset",
    "dialog_pairs",
    "encode_pairs",
    "is_t5_model",
    "mlm_dataset",
    "mlm_mask",
    "pack_sequences",
    "read_lines",
    "read_pairs",
    "random_spans_helper",
    "random_spans_noise_mask",
    "span_corruption_dataset",
    "tokens_per_batch",
]
