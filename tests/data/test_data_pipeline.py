"""mlm_dataset: packing, shapes, determinism, exact resume, sharding, eval, errors."""

import itertools
import json

import numpy as np
import pytest

from xformers_jax.data import (
    IGNORE_INDEX,
    DataError,
    chatterbot_texts,
    mlm_dataset,
    pack_sequences,
    tokens_per_batch,
)

SEQ, BATCH = 32, 4


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def _originals(batch):
    """Rows before masking: labels hold the original id wherever a token was corrupted."""
    return np.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def test_pack_sequences():
    rows = pack_sequences(
        [[5, 6], [], [7], [8, 9, 10, 11, 12, 13]], 6, bos_id=0, eos_id=2, pad_id=1
    )
    np.testing.assert_array_equal(rows, [[0, 5, 6, 2, 7, 2], [0, 8, 9, 10, 11, 2]])
    rows = pack_sequences([[5], [6, 7]], 8, bos_id=0, eos_id=2, pad_id=1)
    np.testing.assert_array_equal(rows, [[0, 5, 2, 6, 7, 2, 1, 1]])
    assert rows.dtype == np.int32


def test_shapes_dtypes_and_format(native_tokenizer, text_files):
    tok = native_tokenizer
    ds = mlm_dataset(text_files, tok, seq_len=SEQ, batch_size=BATCH, seed=0)
    for batch in _take(iter(ds), 5):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for v in batch.values():
            assert v.shape == (BATCH, SEQ) and v.dtype == np.int32
        orig, mask = _originals(batch), batch["attention_mask"]
        assert (orig[:, 0] == tok.bos_id).all()
        np.testing.assert_array_equal(mask, orig != tok.pad_id)
        for row, m in zip(orig, mask, strict=True):
            n = m.sum()
            assert m[:n].all() and row[n - 1] == tok.eos_id  # right-padded, ends with </s>
            assert not ((row[1:n] == tok.eos_id)[1:] & (row[1:n] == tok.eos_id)[:-1]).any()
        labelled = batch["labels"] != IGNORE_INDEX
        assert labelled.any(axis=1).all()  # every row has a target
        assert not (labelled & (mask == 0)).any()
        assert not np.isin(batch["labels"][labelled], list(tok.special_ids)).any()
        assert tokens_per_batch(batch) == int(mask.sum())


def test_determinism_with_seed(native_tokenizer, text_files):
    def first(seed):
        ds = mlm_dataset(text_files, native_tokenizer, seq_len=SEQ, batch_size=BATCH, seed=seed)
        return _take(iter(ds), 3)

    _assert_same(first(5), first(5))
    a, b = first(5)[0], first(6)[0]
    assert not np.array_equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("train", [True, False])
def test_exact_resume_from_json_state(native_tokenizer, text_files, train):
    kw = dict(seq_len=SEQ, batch_size=BATCH, seed=3, train=train)
    it = iter(mlm_dataset(text_files, native_tokenizer, **kw))
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 5)
    # A fresh process: rebuild the pipeline from scratch and restore.
    resumed = iter(mlm_dataset(text_files, native_tokenizer, **kw))
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), expected)


@pytest.fixture(scope="module")
def unique_lines_file(tmp_path_factory, text_files):
    """Lines made unique by a number prefix, so packed rows are unique too."""
    path = tmp_path_factory.mktemp("unique") / "unique.txt"
    lines = open(text_files[0], encoding="utf-8").read().split("\n")[:600]
    path.write_text("\n".join(f"{i}: {line}" for i, line in enumerate(lines)), encoding="utf-8")
    return str(path)


def _real_rows(batches, tok):
    return [tuple(r) for b in batches for r in _originals(b).tolist() if r[0] == tok.bos_id]


def test_train_repeats_and_reshuffles(native_tokenizer, unique_lines_file):
    tok, kw = native_tokenizer, dict(seq_len=SEQ, batch_size=BATCH, seed=0)
    one_pass = _real_rows(mlm_dataset(unique_lines_file, tok, train=False, **kw), tok)
    n = len(one_pass)
    assert len(set(one_pass)) == n
    stream = _real_rows(_take(iter(mlm_dataset(unique_lines_file, tok, **kw)), 3 * n // BATCH), tok)
    epochs = [stream[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(one_pass)  # each epoch sees every row exactly once
    assert epochs[0] != one_pass and epochs[0] != epochs[1]  # shuffled, differently per epoch


def test_sharding_disjoint_and_consistent(native_tokenizer, unique_lines_file):
    tok = native_tokenizer
    kw = dict(seq_len=SEQ, seed=1, train=False)
    full = list(mlm_dataset(unique_lines_file, tok, batch_size=2 * BATCH, **kw))
    shards = [
        list(
            mlm_dataset(
                unique_lines_file, tok, batch_size=BATCH, shard_index=i, shard_count=2, **kw
            )
        )
        for i in range(2)
    ]
    # Same number of full batches per host (eval is padded), so no host waits on another.
    assert len(shards[0]) == len(shards[1]) == len(full)
    rows0, rows1 = set(_real_rows(shards[0], tok)), set(_real_rows(shards[1], tok))
    assert rows0 and rows1 and not rows0 & rows1
    assert rows0 | rows1 == set(_real_rows(full, tok))
    # The global batch is the host batches one after the other, masks included.
    for g, s0, s1 in zip(full, *shards, strict=True):
        for k in g:
            np.testing.assert_array_equal(g[k][:BATCH], s0[k])
            np.testing.assert_array_equal(g[k][BATCH:], s1[k])


def test_train_sharding_partitions_the_stream(native_tokenizer, text_files):
    kw = dict(seq_len=SEQ, seed=2)
    full = _take(iter(mlm_dataset(text_files, native_tokenizer, batch_size=2 * BATCH, **kw)), 3)
    for i in range(2):
        ds = mlm_dataset(
            text_files, native_tokenizer, batch_size=BATCH, shard_index=i, shard_count=2, **kw
        )
        for g, s in zip(full, _take(iter(ds), 3), strict=True):
            for k in g:
                np.testing.assert_array_equal(g[k][i * BATCH : (i + 1) * BATCH], s[k])


@pytest.mark.parametrize("blocks", [(0, 2, 4, 6), (1, 3, 5, 7), (0, 1), (5,)])
def test_a_host_feeds_the_blocks_its_devices_hold(native_tokenizer, text_files, blocks):
    """A pod's physically ordered mesh gives a host blocks that are not adjacent
    (`sharding.batch_block`): its batch is exactly those rows of the one-host global batch."""
    rows, count = 2, 8  # 16-row global batch in 8 blocks of 2
    kw = dict(seq_len=SEQ, seed=3)
    full = _take(iter(mlm_dataset(text_files, native_tokenizer, batch_size=rows * count, **kw)), 3)
    ds = mlm_dataset(text_files, native_tokenizer, batch_size=rows * len(blocks),
                     shard_index=blocks, shard_count=count, **kw)  # fmt: skip
    picked = np.concatenate([np.arange(b * rows, (b + 1) * rows) for b in blocks])
    for g, s in zip(full, _take(iter(ds), 3), strict=True):
        for k in g:
            np.testing.assert_array_equal(g[k][picked], s[k])


def test_eval_is_finite_and_deterministic(native_tokenizer, text_files):
    kw = dict(seq_len=SEQ, batch_size=BATCH, seed=0, train=False)
    a = list(mlm_dataset(text_files, native_tokenizer, **kw))
    b = list(mlm_dataset(text_files, native_tokenizer, **kw))
    _assert_same(a, b)
    # One pass in file order: the first row starts with the first line of the first file.
    first_line = native_tokenizer.encode_many([open(text_files[0]).readline()])[0]
    np.testing.assert_array_equal(_originals(a[0])[0, 1 : 1 + len(first_line)], first_line)
    real = sum(int((_originals(x)[:, 0] == native_tokenizer.bos_id).sum()) for x in a)
    assert len(a) * BATCH - BATCH < real <= len(a) * BATCH


def test_long_lines_are_truncated(native_tokenizer, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(" ".join(["hello world"] * 200) + "\nshort line\n", encoding="utf-8")
    batches = list(
        mlm_dataset([str(path)], native_tokenizer, seq_len=16, batch_size=2, seed=0, train=False)
    )
    rows = _originals(batches[0])
    assert rows[0, 0] == native_tokenizer.bos_id and rows[0, -1] == native_tokenizer.eos_id
    assert (rows[0, 1:-1] != native_tokenizer.eos_id).all()
    assert rows[1, 0] == native_tokenizer.bos_id  # the short line starts a new row


def test_helpful_errors(native_tokenizer, text_files, tmp_path):
    kw = dict(seq_len=SEQ, batch_size=BATCH, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        mlm_dataset(text_files, native_tokenizer, **{**kw, "seq_len": 3})
    with pytest.raises(ValueError, match="batch_size"):
        mlm_dataset(text_files, native_tokenizer, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="vocab_size"):
        mlm_dataset(text_files, native_tokenizer, vocab_size=100, **kw)
    with pytest.raises(ValueError, match="shard_index"):
        mlm_dataset(text_files, native_tokenizer, shard_index=2, shard_count=2, **kw)
    with pytest.raises(DataError, match="absent.txt"):
        mlm_dataset([str(tmp_path / "absent.txt")], native_tokenizer, **kw)


def test_iterator_state_is_small_json(native_tokenizer, text_files):
    it = iter(mlm_dataset(text_files, native_tokenizer, seq_len=SEQ, batch_size=BATCH, seed=0))
    for _ in itertools.islice(it, 2):
        pass
    assert json.loads(json.dumps(it.get_state())) == it.get_state()


def test_no_eval_files_is_a_holdout_not_the_training_files(tmp_path, native_tokenizer):
    from xformers_jax.data.sources import is_holdout

    path = tmp_path / "c.txt"
    texts = chatterbot_texts(["english"])
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    kw = dict(seq_len=64, batch_size=4, seed=0)
    ev = mlm_dataset([str(path)], native_tokenizer, train=False, holdout="eval", **kw)
    tok = native_tokenizer
    held = {tuple(tok.encode(t, add_special_tokens=False)[:62]) for t in texts if is_holdout(t)}
    segments = []
    for b in ev:
        for row in np.where(b["labels"] != -100, b["labels"], b["input_ids"]):
            ids = [int(x) for x in row if x not in (tok.bos_id, tok.pad_id)]
            while tok.eos_id in ids:
                cut = ids.index(tok.eos_id)
                segments.append(tuple(ids[:cut]))
                ids = ids[cut + 1 :]
    assert segments and set(segments) <= held


def test_span_and_plm_rows_do_not_depend_on_host_count(native_tokenizer, text_files, tmp_path):
    from xformers_jax.data import span_corruption_dataset
    from xformers_jax.data.plm_examples import plm_dataset
    from xformers_jax.data.xlnet_tokenizer import XLNetTokenizer

    xl = XLNetTokenizer.train(chatterbot_texts()[::15], tmp_path / "x", 2000)
    makers = [
        lambda **kw: span_corruption_dataset(
            text_files, native_tokenizer, inputs_length=32, vocab_size=2100, **kw
        ),
        lambda **kw: plm_dataset(
            text_files, xl, seq_len=32, num_predict=5, perm_size=8, bi_data=False, **kw
        ),
    ]
    for make in makers:
        whole = _take(iter(make(batch_size=8, seed=4)), 2)
        parts = [_take(iter(make(batch_size=4, seed=4, shard_index=i, shard_count=2)), 2)
                 for i in range(2)]  # fmt: skip
        for step, g in enumerate(whole):
            for k in g:
                got = np.concatenate([parts[0][step][k], parts[1][step][k]])
                np.testing.assert_array_equal(got, g[k])
