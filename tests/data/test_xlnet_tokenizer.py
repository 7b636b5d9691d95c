"""XLNetTokenizer ids equal `transformers.XLNetTokenizer`'s on a spm model trained here.

The model is trained once per module on the bundled multilingual chatterbot corpus with XLNet's
special pieces; both tokenizers read the same `.model` file.
"""

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from xformers_jax.data import chatterbot_texts  # noqa: E402
from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def texts():
    return chatterbot_texts()[::7]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, texts):
    tok = XLNetTokenizer.train(texts, tmp_path_factory.mktemp("spm") / "spiece", 3000)
    return tok.path


def sample(texts):
    extra = ["Numbers 1990, 2000,and 3,5  ``quoted''  Café naïve", "  leading   spaces  ",
             "Paris is the <mask> of France.<eop> Next <sep> x", "Ünïcödé ÀÉÎ"]  # fmt: skip
    return texts[::40][:40] + extra


def test_specials_layout(model_file):
    tok = XLNetTokenizer.load(model_file)
    assert [tok.token_id(s) for s in ("<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>",
                                      "<mask>", "<eod>", "<eop>")] == list(range(9))  # fmt: skip


@pytest.mark.parametrize("flags", [{}, {"do_lower_case": True, "keep_accents": True}])
def test_ids_equal_transformers(model_file, texts, flags):
    ours = XLNetTokenizer.load(model_file, **flags)
    hf = transformers.XLNetTokenizer(vocab_file=model_file, **flags)
    batch = sample(texts)
    for t in batch:
        assert ours.tokenize(t) == hf.tokenize(t), t
        assert ours.encode(t) == hf.encode(t), t
        got, want = ours(t), hf(t)
        for k in ("input_ids", "token_type_ids", "attention_mask"):
            assert got[k] == want[k], (k, t)
    pairs_a, pairs_b = batch[:20], batch[20:40]
    for a, b in zip(pairs_a, pairs_b):
        assert ours.encode(a, b) == hf.encode(a, b), (a, b)
        got, want = ours(a, b), hf(a, b)
        assert got["token_type_ids"] == want["token_type_ids"]
    got = ours(pairs_a, pairs_b, padding=True)
    want = hf(pairs_a, pairs_b, padding=True, return_tensors="np")
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    got = ours(batch, padding="max_length", max_length=24, truncation=True)
    want = hf(batch, padding="max_length", max_length=24, truncation=True, return_tensors="np")
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ids = ours.encode(batch[0])
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_left_padding_cls_last(model_file):
    tok = XLNetTokenizer.load(model_file)
    out = tok(["a b c d e f", "a"], padding=True)
    assert out["input_ids"][1, 0] == tok.pad_token_id and out["attention_mask"][1, 0] == 0
    assert (out["input_ids"][:, -1] == tok.cls_token_id).all()
    assert (out["token_type_ids"][:, -1] == 2).all() and out["token_type_ids"][1, 0] == 3


def test_load_hf_tokenizer_dir(model_file, tmp_path):
    hf = transformers.XLNetTokenizer(vocab_file=model_file, do_lower_case=True)
    hf.save_pretrained(tmp_path)
    ours = XLNetTokenizer.load(tmp_path)
    assert ours.do_lower_case
    assert ours.encode("Hello World") == hf.encode("Hello World")
