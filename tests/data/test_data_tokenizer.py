"""SentencePieceTokenizer: fairseq id layout, round trips, batching, errors, XLM-R parity."""

import unicodedata

import numpy as np
import pytest

from xformers_jax.data import DataError, SentencePieceTokenizer

SAMPLE = [
    "Hello world!",
    "What is your favorite movie?",
    "Привет, как дела?",
    "これはペンです。",
    "Bonjour, je m'appelle Marie.",
    "Paris is the <mask> of France.",
    "a</s>b <unk> c<s>d",
    "  spaced   out  ",
    "😀 emoji ☃",
    "",
]


def test_special_id_layout(native_tokenizer):
    tok = native_tokenizer
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tok.special_ids == frozenset({0, 1, 2, 3, 4})
    assert tok.piece_to_id("<mask>") == 4
    assert tok.piece_to_id("no-such-piece-xyz") == tok.unk_id
    assert len(tok) == tok.vocab_size <= 2000


def test_encode_decode_round_trip(native_tokenizer, multilingual_texts):
    tok = native_tokenizer
    for text in multilingual_texts[:200]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < tok.vocab_size for i in ids)
        if tok.unk_id not in ids:  # rare characters outside the coverage decode to nothing
            # spm normalises with NFKC (e.g. micro sign -> Greek mu).
            assert tok.decode(ids) == " ".join(unicodedata.normalize("NFKC", text).split())
    assert tok.encode("Hi", add_special_tokens=False) == tok.encode("Hi")[1:-1]


def test_mask_in_text_and_pairs(native_tokenizer):
    tok = native_tokenizer
    ids = tok.encode("Paris is the <mask> of France.")
    assert ids.count(tok.mask_id) == 1
    assert tok.decode(ids) == "Paris is the of France."
    assert "<mask>" in tok.decode(ids, skip_special_tokens=False)
    a, b = tok.encode("one", add_special_tokens=False), tok.encode("two", add_special_tokens=False)
    assert tok.encode("one", "two") == [0, *a, 2, 2, *b, 2]


def test_encode_batch_padding_and_truncation(native_tokenizer):
    tok = native_tokenizer
    texts = ["short", "a much longer sentence that certainly does not fit in eight tokens"]
    out = tok.encode_batch(texts, max_length=8)
    assert set(out) == {"input_ids", "attention_mask"}
    for v in out.values():
        assert v.shape == (2, 8) and v.dtype == np.int32
    ids, mask = out["input_ids"], out["attention_mask"]
    n0 = len(tok.encode("short"))
    np.testing.assert_array_equal(ids[0, :n0], tok.encode("short"))
    assert (ids[0, n0:] == tok.pad_id).all() and mask[0].sum() == n0
    assert ids[1, 0] == tok.bos_id and ids[1, -1] == tok.eos_id and mask[1].all()
    longest = tok.encode_batch(texts[:1], max_length=8, padding="longest")
    assert longest["input_ids"].shape == (1, n0)
    with pytest.raises(ValueError, match="truncation"):
        tok.encode_batch(texts, max_length=8, truncation=False)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(texts, max_length=1)


def test_train_from_files(tmp_path, text_files):
    from pathlib import Path

    tok = SentencePieceTokenizer.train(
        [Path(text_files[0])], tmp_path / "sub" / "m", vocab_size=1500, files=[text_files[1]]
    )
    assert (tmp_path / "sub" / "m.model").is_file()
    assert tok.mask_id == 4 and tok.decode(tok.encode("Привет")) == "Привет"


def test_load_errors(tmp_path, native_tokenizer, plain_spm_model):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer.load(missing)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00\x01definitely not a protobuf" * 10)
    with pytest.raises(DataError, match="corrupt.model"):
        SentencePieceTokenizer.load(corrupt)
    # Each convention refuses the other's layout instead of silently shifting every id.
    with pytest.raises(DataError, match="convention='xlm-roberta'"):
        SentencePieceTokenizer.load(plain_spm_model, convention="native")
    with pytest.raises(DataError, match="convention='native'"):
        SentencePieceTokenizer.load(native_tokenizer.path, convention="xlm-roberta")
    with pytest.raises(ValueError, match="convention"):
        SentencePieceTokenizer.load(native_tokenizer.path, convention="bert")


def test_xlm_roberta_convention_matches_transformers(plain_spm_model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.XLMRobertaTokenizer(vocab_file=plain_spm_model)
    ours = SentencePieceTokenizer.load(plain_spm_model, convention="xlm-roberta")
    assert ours.vocab_size == hf.vocab_size
    assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.unk_id, ours.mask_id) == (
        hf.cls_token_id,
        hf.pad_token_id,
        hf.sep_token_id,
        hf.unk_token_id,
        hf.mask_token_id,
    )
    assert ours.special_ids == frozenset(hf.all_special_ids)
    for text in SAMPLE:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], True), text
    for i in range(ours.vocab_size):
        assert ours.id_to_piece(i) == hf.convert_ids_to_tokens(i)
    # Pairs, truncation (longest_first) and padding of a batch.
    firsts, seconds = SAMPLE[:5], SAMPLE[5:]
    for max_length in (10, 16, 48):
        want = hf(
            firsts,
            seconds,
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )
        got = ours.encode_batch(firsts, max_length, text_pairs=seconds)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    want = hf(SAMPLE, max_length=12, padding="max_length", truncation=True, return_tensors="np")
    got = ours.encode_batch(SAMPLE, 12)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])


def test_pickle(native_tokenizer):
    import pickle

    clone = pickle.loads(pickle.dumps(native_tokenizer))
    assert clone.encode("Привет мир") == native_tokenizer.encode("Привет мир")
    assert (clone.path, clone.mask_id) == (native_tokenizer.path, native_tokenizer.mask_id)
