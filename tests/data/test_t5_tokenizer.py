"""T5Tokenizer ids equal transformers' `T5Tokenizer` / `MT5Tokenizer` on an spm model trained here.

The model is trained once per module on the bundled multilingual chatterbot corpus with T5's
special ids; ours and transformers' read the same `.model` file. Also: HF tokenizer dirs both
ways, the run-level tokenizer switch, and span corruption with T5's sentinels.
"""

import pickle
import random

import ml_collections
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from xformers_jax.data import DataError, chatterbot_texts  # noqa: E402
from xformers_jax.data.t5_tokenizer import (  # noqa: E402
    T5Tokenizer,
    is_t5_model,
    t5_tokenizer_for,
)

HF_CLASSES = {
    "t5": lambda path, **kw: transformers.T5Tokenizer(path, **kw),
    "t5-nonlegacy": lambda path, **kw: transformers.T5Tokenizer(path, legacy=False, **kw),
    "mt5": lambda path, **kw: transformers.MT5Tokenizer(path, **kw),
}
SPECIAL_CASES = [
    "Hello <extra_id_0>. world",
    "Fill  <extra_id_5>  the <extra_id_10><extra_id_1> gaps<extra_id_99>",
    "not a sentinel: <extra_id_100> <extra_id_-1>",
    "Hi</s> there <pad>x<unk>y",
    "ends with eos</s>",
    "<extra_id_0>starts with a sentinel",
    "  leading   and trailing   ",
    "\u2581marks \u2581 inside",
    "tab\tand\nnewline",
    "Ünïcödé ÀÉÎ 龘龘 ½",
    "",
]


@pytest.fixture(scope="module")
def texts():
    return chatterbot_texts()[::7]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, texts):
    tok = T5Tokenizer.train(texts, tmp_path_factory.mktemp("spm") / "spiece", 2000, seed=0)
    return tok.path


def sample(texts):
    """~60 utterances from all 28 languages plus the edge cases."""
    return texts[::30][:60] + SPECIAL_CASES


def ours_for(kind, path):
    return T5Tokenizer.load(path, legacy=kind != "t5-nonlegacy")


def test_layout(model_file):
    tok = T5Tokenizer.load(model_file)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert len(tok) == tok.vocab_size + 100
    assert tok.sentinel_id(0) == len(tok) - 1 and tok.sentinel_id(99) == tok.vocab_size
    assert tok.id_to_piece(len(tok) - 1) == "<extra_id_0>"
    hf = transformers.T5Tokenizer(model_file)
    assert len(hf) == len(tok) and hf.vocab_size == tok.vocab_size
    for i in (0, 1, 7, 99):
        assert hf.convert_tokens_to_ids(f"<extra_id_{i}>") == tok.sentinel_id(i)
    assert sorted(hf.all_special_ids) == sorted(tok.special_ids)


@pytest.mark.parametrize("kind", sorted(HF_CLASSES))
def test_ids_equal_transformers(model_file, texts, kind):
    ours, hf = ours_for(kind, model_file), HF_CLASSES[kind](model_file)
    batch = sample(texts)
    for t in batch:
        assert ours.tokenize(t) == hf.tokenize(t), t
        assert ours.encode(t) == hf.encode(t), t
        assert ours.encode(t, add_special_tokens=False) == hf.encode(t, add_special_tokens=False)
    firsts, seconds = batch[:35], batch[35:70]
    for a, b in zip(firsts, seconds):
        assert ours.encode(a, b) == hf.encode(a, b), (a, b)
    # Unpadded batches (ragged lists), padded to the longest row, and cut + padded to a length.
    for kw in (dict(), dict(padding=True), dict(padding="max_length", truncation=True,
                                                max_length=12)):  # fmt: skip
        for args in ((batch,), (firsts, seconds)):
            got = ours(*args, **kw)
            want = hf(*args, **kw, **({"return_tensors": "np"} if kw else {}))
            for k in ("input_ids", "attention_mask"):
                if kw:
                    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} {kw}")
                else:
                    assert got[k] == want[k], k
    got = ours(firsts, seconds, truncation=True, max_length=9)
    assert got["input_ids"] == hf(firsts, seconds, truncation=True, max_length=9)["input_ids"]


def test_sentinels_in_text(model_file):
    tok = T5Tokenizer.load(model_file)
    hello, dot = (tok.encode(t, add_special_tokens=False) for t in ("Hello", "."))
    # The sentinel eats the blank before it; the text after it starts a new word (legacy).
    assert tok.encode("Hello <extra_id_0>.") == [*hello, len(tok) - 1, *dot, tok.eos_id]
    assert tok.encode("Hello<extra_id_0>  .") == tok.encode("Hello <extra_id_0>.")
    # Longest match: <extra_id_10> is not <extra_id_1> + "0>".
    ids = tok.encode("<extra_id_10><extra_id_1>", add_special_tokens=False)
    assert ids == [tok.sentinel_id(10), tok.sentinel_id(1)]
    assert tok.sentinel_id(100) not in tok.encode("<extra_id_100>")  # not a sentinel: plain text
    # An existing </s> is not doubled (transformers' rule).
    assert tok.encode("x</s>")[-2:] != [tok.eos_id, tok.eos_id]
    # legacy: the text after a special token starts a word; legacy=False: it does not.
    legacy = tok.tokenize("Hello <extra_id_0>.")
    after = legacy[legacy.index("<extra_id_0>") + 1 :]
    assert after[0].startswith("\u2581") and "".join(after).lstrip("\u2581") == "."
    assert T5Tokenizer.load(model_file, legacy=False).tokenize("Hello <extra_id_0>.")[-1] == "."


@pytest.mark.parametrize("kind", sorted(HF_CLASSES))
def test_decode_equals_transformers(model_file, texts, kind):
    ours, hf = ours_for(kind, model_file), HF_CLASSES[kind](model_file)
    rows = [hf.encode(t) for t in sample(texts)]
    rng = random.Random(0)
    # Random ids hit every corner: specials between pieces, runs of sentinels, <unk>, <pad>.
    rows += [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 14))] for _ in range(150)]
    for ids in rows:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), (ids, skip)
        assert ours.decode(ids, clean_up_tokenization_spaces=True) == hf.decode(
            ids, clean_up_tokenization_spaces=True
        ), ids
    padded = ours(sample(texts)[:8], padding=True)["input_ids"]
    assert ours.batch_decode(padded, skip_special_tokens=True) == hf.batch_decode(
        padded, skip_special_tokens=True
    )
    # Label padding (-100) and ids past the tokenizer (a padded model vocabulary) carry no text.
    ids = hf.encode("Hello world")
    assert ours.decode([*ids, -100, len(ours) + 5], skip_special_tokens=True) == hf.decode(
        ids, skip_special_tokens=True
    )


def test_hf_tokenizer_dirs_both_ways(model_file, texts, tmp_path):
    batch = sample(texts)[:40]
    # transformers' dir -> ours, settings read from its tokenizer_config.json.
    hf = transformers.T5Tokenizer(model_file, legacy=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = T5Tokenizer.load(tmp_path / "hf")
    assert not ours.legacy and [ours.encode(t) for t in batch] == [hf.encode(t) for t in batch]
    # Ours -> transformers' from_pretrained.
    T5Tokenizer.load(model_file).save_pretrained(tmp_path / "ours")
    back = transformers.T5Tokenizer.from_pretrained(tmp_path / "ours")
    assert len(back) == len(ours) and back.legacy
    assert [back.encode(t) for t in batch] == [T5Tokenizer.load(model_file).encode(t)
                                               for t in batch]  # fmt: skip
    # mT5's released dir says extra_ids: 0 (its spm holds the sentinel rows itself).
    mt5 = transformers.MT5Tokenizer(model_file, extra_ids=0)
    mt5.save_pretrained(tmp_path / "mt5")
    ours = T5Tokenizer.load(tmp_path / "mt5")
    assert len(ours) == len(mt5) == ours.vocab_size and ours.sentinel_id(0) == len(mt5) - 1
    assert [ours.encode(t) for t in batch] == [mt5.encode(t) for t in batch]


def test_layout_detection_and_errors(model_file, native_tokenizer, tmp_path):
    assert is_t5_model(model_file) and not is_t5_model(native_tokenizer.path)
    assert not is_t5_model(tmp_path / "missing.model")
    with pytest.raises(DataError, match="not a T5 sentencepiece model"):
        T5Tokenizer.load(native_tokenizer.path)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer.load(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid sentencepiece model"):
        T5Tokenizer.load(bad)


def test_pickles(model_file):
    tok = T5Tokenizer.load(model_file, legacy=False)
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode("Hola <extra_id_3> mundo") == tok.encode("Hola <extra_id_3> mundo")
    assert not back.legacy


def _data(**kw):
    d = ml_collections.ConfigDict(dict(tokenizer="", tokenizer_type="sentencepiece",
                                       vocab_size=2500))  # fmt: skip
    d.update(kw)
    return d


def test_run_tokenizer_switch(model_file, native_tokenizer, texts, tmp_path):
    texts_fn = lambda: texts  # noqa: E731
    # An HF T5 dir or a T5-layout .model -> T5Tokenizer (a copy kept in the workdir).
    tok = t5_tokenizer_for(_data(tokenizer=model_file), str(tmp_path / "a"), texts_fn)
    assert (
        isinstance(tok, T5Tokenizer) and (tmp_path / "a" / "t5_tokenizer" / "spiece.model").exists()
    )
    # A fairseq-layout model (whatever the kind), or the default kind: not ours to load.
    assert t5_tokenizer_for(_data(tokenizer=native_tokenizer.path), str(tmp_path), texts_fn) is None
    assert t5_tokenizer_for(_data(), str(tmp_path), texts_fn) is None
    native_t5 = _data(tokenizer=native_tokenizer.path, tokenizer_type="t5")
    assert t5_tokenizer_for(native_t5, str(tmp_path), texts_fn) is None
    # tokenizer_type='t5': trained once into the workdir, then reloaded unchanged.
    work = str(tmp_path / "b")
    first = t5_tokenizer_for(_data(tokenizer_type="t5"), work, texts_fn)
    again = t5_tokenizer_for(_data(tokenizer_type="t5"), work, lambda: pytest.fail("retrained"))
    assert first.vocab_size <= 2500 and again.encode(texts[3]) == first.encode(texts[3])
    # init_from: its T5 tokenizer carries over; a fairseq-layout one is a clear error.
    init = t5_tokenizer_for(
        _data(tokenizer_type="t5"), str(tmp_path / "c"), texts_fn, init_from=work
    )
    assert init.encode(texts[5]) == first.encode(texts[5])
    run = tmp_path / "native_run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(open(native_tokenizer.path, "rb").read())
    with pytest.raises(DataError, match="data.tokenizer=.*tokenizer.model"):
        t5_tokenizer_for(_data(tokenizer_type="t5"), str(tmp_path / "d"), texts_fn,
                         init_from=str(run))  # fmt: skip


def _span_config(tokenizer, corpus, **model):
    from xformers_jax import config_lib

    c = config_lib.load_config("configs/mt5/pretrain_span.py:tiny")
    with c.unlocked():
        c.data.tokenizer = tokenizer
        c.data.train_files = c.data.eval_files = [corpus]
        c.data.seq_len = 32
        c.model.vocab_size = 2200
        c.train.batch_size = 4
        c.model.update(model)
    return c


def test_span_corruption_with_t5_tokenizer(model_file, texts, tmp_path):
    from xformers_jax.tasks import span_corruption

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    tok = T5Tokenizer.load(model_file)
    # The config's fairseq ids (pad 1, eos 2) are a clear error naming the fix.
    with pytest.raises(ValueError, match="--config.model.pad_token_id=0"):
        span_corruption.build(_span_config(model_file, str(corpus)), str(tmp_path / "w"))
    ids = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    spec = span_corruption.build(_span_config(model_file, str(corpus), **ids), str(tmp_path / "w"))
    cfg = spec.model_config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)
    batch = next(iter(spec.train_data(0, 1)))
    # Sentinels are the tokenizer's <extra_id_i>, not the (larger) model vocabulary's last ids.
    inputs = batch["input_ids"]
    assert inputs.max() < len(tok) and (inputs >= tok.vocab_size).any()
    first = [row[row >= tok.vocab_size][0] for row in inputs]
    assert all(tok.id_to_piece(i) == "<extra_id_0>" for i in first)
    assert (inputs[:, -1] == tok.eos_id).all() and (batch["decoder_input_ids"][:, 0] == 0).all()
    with pytest.raises(ValueError, match="model.vocab_size"):
        span_corruption.build(_span_config(model_file, str(corpus), vocab_size=2000, **ids),
                              str(tmp_path / "w"))  # fmt: skip
