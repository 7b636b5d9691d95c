"""Data: sentencepiece tokenizers, text corpora, MLM collators and grain pipelines.

Public API::

    tok = SentencePieceTokenizer.train(texts, "workdir/spm", vocab_size=8000)   # or .load(path)
    t5 = T5Tokenizer.load("hf/mt5-small")     # T5/mT5 ids, equal to transformers.T5Tokenizer's
    train_file, eval_file = default_corpus("workdir/data")      # bundled, no download
    ds = mlm_dataset([train_file], tok, seq_len=128, batch_size=32, seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()     # JSON; it.set_state(state)
    pairs = dialog_pairs(["english"], "train")                  # prompt -> reply (seq2seq)
    files = expand_files(["gs://b/cc100/**/*.txt.zst"]); texts = iter_texts(files[0])  # lazy
    prepare(config, "gs://b/prepared")          # Apache Beam -> ArrayRecord shards + manifest
    Prepared.open("gs://b/prepared")            # what data.prepared_dir reads (prepared.py)

Training reads prepared shards (`data.prepared_dir`, `prepared.py`), streams raw files
(`data.streaming`, `streaming.py`) or, for small corpora, tokenises them in memory (`pipeline.py`);
docs/data.md explains the three.
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
from xformers_jax.data.prepare import prepare
from xformers_jax.data.prepared import Prepared, host_rows, mixture_weights
from xformers_jax.data.sources import expand_files, is_holdout, iter_texts, read_texts
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
    "Prepared",
    "SentencePieceTokenizer",
    "T5Tokenizer",
    "chatterbot_languages",
    "chatterbot_texts",
    "default_corpus",
    "dialog_dataset",
    "dialog_pairs",
    "encode_pairs",
    "expand_files",
    "host_rows",
    "is_holdout",
    "is_t5_model",
    "iter_texts",
    "mlm_dataset",
    "mixture_weights",
    "mlm_mask",
    "pack_sequences",
    "prepare",
    "read_lines",
    "read_pairs",
    "read_texts",
    "random_spans_helper",
    "random_spans_noise_mask",
    "span_corruption_dataset",
    "tokens_per_batch",
]
