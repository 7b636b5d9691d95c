"""T5 span corruption: T5's length arithmetic and masks, the pipeline, and a short training run."""

import json
import os

import numpy as np
import pytest

from tests.helpers import tiny_corpus
from xformers_jax import config_lib, train
from xformers_jax.data import span_corruption_examples as sc

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mt5", "pretrain_span.py")


def test_random_spans_helper_matches_t5():
    # T5's published numbers: 512 inputs <- 568 raw tokens, 114 targets.
    assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert sc.random_spans_helper(1024, 0.15, 3.0) == (1137, 229)


def test_noise_mask_and_sentinels():
    rng = np.random.default_rng(0)
    for length in (10, 37, 568):
        mask = sc.random_spans_noise_mask(length, rng)
        assert mask.sum() == min(max(round(length * 0.15), 1), length - 1)
        assert not mask[0] and mask[-1]  # starts with kept tokens, ends with noise
    tokens = np.arange(10, 30, dtype=np.int32)
    mask = np.zeros(20, bool)
    mask[[3, 4, 10, 18, 19]] = True
    ins = sc.noise_span_to_unique_sentinel(tokens, mask, 100)
    outs = sc.noise_span_to_unique_sentinel(tokens, ~mask, 100)
    np.testing.assert_array_equal(
        ins, [10, 11, 12, 99, 15, 16, 17, 18, 19, 98, 21, 22, 23, 24, 25, 26, 27, 97]
    )
    np.testing.assert_array_equal(outs, [99, 13, 14, 98, 20, 97, 28, 29])


def test_dataset_lengths(tmp_path):
    from xformers_jax.data import SentencePieceTokenizer, read_lines

    corpus = tiny_corpus(str(tmp_path))
    tok = SentencePieceTokenizer.train(read_lines(corpus), str(tmp_path / "spm"), 1900)
    ds = sc.span_corruption_dataset(corpus, tok, inputs_length=32, batch_size=4, seed=0,
                                    vocab_size=2000)  # fmt: skip
    batch = next(iter(ds))
    _, targets_length = sc.random_spans_helper(32)
    assert batch["input_ids"].shape == (4, 32) and batch["labels"].shape == (4, targets_length)
    assert (batch["attention_mask"] == 1).all()  # full chunks: inputs exactly fill the length
    assert (batch["input_ids"][:, -1] == tok.eos_id).all()
    assert (batch["input_ids"] >= 1900).any() and batch["input_ids"].max() == 1999  # sentinels
    np.testing.assert_array_equal(
        batch["decoder_input_ids"][:, 1:], np.where(batch["labels"] < 0, 1, batch["labels"])[:, :-1]
    )
    with pytest.raises(ValueError, match="sentinels"):
        sc.span_corruption_dataset(corpus, tok, inputs_length=32, batch_size=4, seed=0,
                                   vocab_size=1950)  # fmt: skip


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "xl", "xxl"])
def test_config_builds(preset):
    c = config_lib.load_config(f"{CONFIG}:{preset}")
    assert c.task == "span_corruption" and c.optim.name == "adafactor"


@pytest.mark.slow
def test_training_lowers_loss(tmp_path):
    corpus = tiny_corpus(str(tmp_path))
    c = config_lib.load_config(f"{CONFIG}:tiny")
    with c.unlocked():
        c.data.train_files = [corpus]
        c.data.eval_files = [corpus]
        c.model.d_model, c.model.d_ff, c.model.d_kv, c.model.num_heads = 32, 64, 8, 4
        c.model.vocab_size, c.data.vocab_size = 2000, 1900
        c.data.seq_len = 32
        c.train.batch_size, c.train.steps = 8, 30
        c.train.eval_every_steps, c.train.eval_steps = 1000, 2
        c.optim.warmup_steps = 3
        c.checkpoint.every_steps = 1000
        c.log.every_steps, c.log.progress = 5, False
    result = train.train_and_evaluate(c, str(tmp_path / "work"))
    rows = [json.loads(x) for x in open(tmp_path / "work" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"]


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "xl", "xxl"])
def test_finetune_config_builds(preset):
    path = os.path.join(os.path.dirname(CONFIG), "finetune.py")
    c = config_lib.load_config(f"{path}:{preset}")
    assert c.model.family == "mt5" and c.task == "classification"


@pytest.mark.slow  # a second trainer compile (~30 s of CPU); `make test-slow` runs it
def test_finetune_classification_runs(tmp_path):
    path = os.path.join(os.path.dirname(CONFIG), "finetune.py")
    c = config_lib.load_config(f"{path}:tiny")
    with c.unlocked():
        c.data.train_files = [tiny_corpus(str(tmp_path))]  # the tokenizer's text
        c.model.d_model, c.model.d_ff, c.model.d_kv, c.model.num_heads = 32, 64, 8, 4
        c.model.vocab_size, c.data.vocab_size = 2000, 1900
        c.data.seq_len = 24
        c.train.batch_size, c.train.steps = 8, 4
        c.train.eval_every_steps, c.train.eval_steps = 1000, 1
        c.optim.warmup_steps = 1
        c.checkpoint.every_steps = 1000
        c.log.every_steps, c.log.progress = 2, False
    result = train.train_and_evaluate(c, str(tmp_path / "work"))
    assert np.isfinite(result["final_eval"]["loss"])
