"""Streaming straight from the training files: lazy chunks, grain workers, interleaving, exact
resume, host-independent rows, the eval cache."""

from __future__ import annotations

import functools
import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from tests.helpers import assert_resumes_exactly, tiny_mlm_config
from xformers_jax import tasks
from xformers_jax.data import chatterbot_texts, prepared
from xformers_jax.data.streaming import file_chunks, stream_dataset

LAYOUT = {"objective": "mlm", "chunk_len": 31, "separator": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    langs = [["english"], ["french"], ["russian"], ["spanish", "german"]]
    out = []
    for i, group in enumerate(langs):
        texts = chatterbot_texts(group)
        if i % 2:
            path = root / f"part{i}.jsonl.gz"
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        else:
            path = root / f"part{i}.txt.zst"
            data = ("\n".join(texts) + "\n").encode()
            path.write_bytes(zstandard.ZstdCompressor().compress(data))
        out.append(str(path))
    return out


def _make_row(tok):
    masker = prepared.MlmMasker(
        vocab_size=tok.vocab_size,
        special_ids=tok.special_ids,
        mask_token_id=tok.mask_id,
        mask_prob=0.15,
        pad_id=tok.pad_id,
    )
    return functools.partial(
        prepared.mlm_row, seq_len=32, bos_id=tok.bos_id, pad_id=tok.pad_id, masker=masker
    )


def _stream(files, tok, shard_index=0, shard_count=1, num_workers=0):
    return stream_dataset(
        files, tok, _make_row(tok), lay=LAYOUT, global_batch=8, shard_index=shard_index,
        shard_count=shard_count, seed=3, num_workers=num_workers, cycle_length=2,
    )  # fmt: skip


def test_file_chunks_are_the_document_stream(files, native_tokenizer):
    texts = chatterbot_texts(["french"])
    chunks = list(file_chunks(files[1], native_tokenizer, chunk_len=31, separator=2, pad_tail=True))
    ids = [i for t in native_tokenizer.encode_many(texts) for i in (*t, 2)]
    assert np.array_equal(np.concatenate(chunks), ids)
    assert all(c.size == 31 for c in chunks[:-1]) and 0 < chunks[-1].size <= 31


def test_resume_exact_and_files_interleaved(files, native_tokenizer):
    want = assert_resumes_exactly(lambda: _stream(files, native_tokenizer), skip=5, n=3)
    assert want[0]["input_ids"].shape == (8, 32)
    # Two files at a time: the first batches hold text of two different files.
    tok = native_tokenizer
    first = next(iter(_stream(files, tok)))
    ids = np.where(first["labels"] != -100, first["labels"], first["input_ids"])
    starts = {
        i: {c.tobytes() for c in list(file_chunks(f, tok, chunk_len=31, separator=2))[:8]}
        for i, f in enumerate(files)
    }
    rows = {r[1:].astype(np.int32).tobytes() for r in ids}
    used = [i for i, s in starts.items() if s & rows]
    assert len(used) == 2, used


def test_rows_independent_of_host_count_and_workers(files, native_tokenizer):
    one = iter(_stream(files, native_tokenizer))
    two = [iter(_stream(files, native_tokenizer, i, 2)) for i in range(2)]
    for _ in range(3):
        whole, parts = next(one), [next(h) for h in two]
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


@pytest.mark.slow
def test_grain_workers_resume_exactly(files, native_tokenizer):
    assert_resumes_exactly(lambda: _stream(files, native_tokenizer, num_workers=2), skip=4, n=2)


def test_task_streams_and_caches_eval(files, native_tokenizer, tmp_path):
    c = tiny_mlm_config(files[0])
    with c.unlocked():
        c.data.train_files = [os.path.dirname(files[0]) + "/*"]
        c.data.eval_files = None  # held-out slice of the stream
        c.data.streaming = True
        c.data.tokenizer = native_tokenizer.path
        c.data.vocab_size = c.model.vocab_size = native_tokenizer.vocab_size
    spec = tasks.build_task(c, str(tmp_path))
    batch = next(iter(spec.train_data(0, 1)))
    assert batch["input_ids"].shape == (8, 32)
    ev = list(spec.eval_data(0, 1))
    cached = os.listdir(tmp_path / "eval_cache")
    assert len(cached) == 1
    mtime = os.path.getmtime(tmp_path / "eval_cache" / cached[0])
    again = list(tasks.build_task(c, str(tmp_path)).eval_data(0, 1))
    assert os.path.getmtime(tmp_path / "eval_cache" / cached[0]) == mtime
    np.testing.assert_array_equal(ev[0]["input_ids"], again[0]["input_ids"])


@pytest.mark.slow
def test_streaming_training_resumes_exactly(files, native_tokenizer, tmp_path):
    from tests.tasks.test_resume_families import _losses
    from xformers_jax import train

    def cfg(steps):
        c = tiny_mlm_config(files[0])
        with c.unlocked():
            c.data.train_files, c.data.eval_files = files, [files[1]]
            c.data.streaming, c.data.num_workers = True, 1
            c.data.tokenizer = native_tokenizer.path
            c.data.vocab_size = c.model.vocab_size = native_tokenizer.vocab_size
            c.train.steps, c.train.eval_steps = steps, 1
            c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
            c.log.tensorboard = False
        return c

    straight, resumed = tmp_path / "a", tmp_path / "b"
    train.train_and_evaluate(cfg(4), str(straight))
    train.train_and_evaluate(cfg(2), str(resumed))
    assert train.train_and_evaluate(cfg(4), str(resumed))["start_step"] == 2
    a, b = _losses(straight), _losses(resumed)
    assert len(a) == 4 and a == b
