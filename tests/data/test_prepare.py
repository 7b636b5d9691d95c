"""`xformers-jax prepare` (Apache Beam, local runner) -> training from the ArrayRecord shards: every
text objective, exact resume, host-independent order, XLNet streams, mixtures."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from tests.helpers import assert_resumes_exactly
from tests.tasks.test_resume_families import FAMILIES, _losses
from xformers_jax import cli, train
from xformers_jax.data import chatterbot_texts, prepared
from xformers_jax.data.prepare import is_holdout, prepare

IN_MEMORY = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """European languages as .jsonl.gz (~100 KB) and .txt (~150 KB)."""
    root = tmp_path_factory.mktemp("raw")
    texts = chatterbot_texts(["russian", "french", "italian", "portuguese", "turkish"])
    with gzip.open(root / "en.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in chatterbot_texts(["english", "spanish", "german"]):
            f.write(json.dumps({"text": t}) + "\n")
    (root / "rest.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return root


def _config(family: str, raw, **fields):
    c = FAMILIES[family](str(raw / "rest.txt"))
    with c.unlocked():
        c.data.train_files = [str(raw / "*.jsonl.gz"), str(raw / "rest.txt")]
        c.data.eval_files = None
        c.data.vocab_size = 1900
        for key, value in fields.items():
            section, name = key.split("__")
            c[section][name] = value
    return c


def _prepared(family, raw, tmp_path_factory, **fields):
    out = str(tmp_path_factory.mktemp(f"prep_{family}"))
    manifest = prepare(_config(family, raw, **fields), out, IN_MEMORY)
    return out, manifest


@pytest.fixture(scope="module")
def mlm_dir(raw, tmp_path_factory):
    """Prepared through the CLI with the default runner (DirectRunner, multi-processing)."""
    out = str(tmp_path_factory.mktemp("prep_mlm"))
    from tests.helpers import TINY_CONFIG

    rc = cli.main(
        [
            "prepare", "--config", TINY_CONFIG, "--out", out, "--shard-records", "500",
            f"--config.data.train_files=['{raw}/*.jsonl.gz', '{raw}/rest.txt']",
            "--config.data.vocab_size=1900", "--direct_num_workers=2",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def test_manifest_counts_and_holdout(mlm_dir, raw):
    m = json.loads(open(os.path.join(mlm_dir, "manifest.json")).read())
    assert m["format_version"] == 1 and m["objective"] == "mlm" and m["chunk_len"] == 31
    assert m["tokenizer"]["kind"] == "sentencepiece"
    assert os.path.isfile(os.path.join(mlm_dir, "tokenizer", "tokenizer.model"))
    train_split, eval_split = m["splits"]["train"], m["splits"]["eval"]
    assert m["eval_from"] == "holdout" and m["inputs"] == [f"{raw}/en.jsonl.gz", f"{raw}/rest.txt"]
    # Every chunk of one file piece per shard; counts add up.
    shards = train_split["sources"]["train"]["shards"]
    assert sum(s["records"] for s in shards) == train_split["records"] and len(shards) > 2
    assert all(s["records"] <= 500 for s in shards)
    # ~5% of the documents held out by content hash: tokens in the ratio of their texts.
    texts = [t for t in open(raw / "rest.txt", encoding="utf-8").read().split("\n") if t.strip()]
    texts += chatterbot_texts(["english", "spanish", "german"])
    share = sum(len(t) for t in texts if is_holdout(t)) / sum(map(len, texts))
    got = eval_split["tokens"] / (eval_split["tokens"] + train_split["tokens"])
    assert abs(got - share) < 0.02 and 0.02 < got < 0.09
    # The records are exactly the ids of the text: decode one chunk of the held-out split.
    p = prepared.Prepared.open(mlm_dir)
    tok = p.tokenizer()
    eval_text = tok.decode(p.eval["train"][0].tolist())
    held = " ".join(t for t in texts if is_holdout(t))
    assert all(piece.strip() in held for piece in eval_text.split("</s>")[1:-1])


@pytest.mark.slow
def test_mlm_trains_and_resumes_exactly(mlm_dir, raw, tmp_path):
    def cfg(steps):
        c = _config("xlm_roberta", raw, data__prepared_dir=mlm_dir, train__steps=steps)
        with c.unlocked():
            c.data.train_files = ["/nonexistent/never/read.txt"]  # prepared data only
        return c

    straight, resumed = tmp_path / "a", tmp_path / "b"
    train.train_and_evaluate(cfg(4), str(straight))
    train.train_and_evaluate(cfg(2), str(resumed))
    assert train.train_and_evaluate(cfg(4), str(resumed))["start_step"] == 2
    a, b = _losses(straight), _losses(resumed)
    assert len(a) == 4 and a == b and all(np.isfinite(a))


def _data(config, shard_index=0, shard_count=1):
    from xformers_jax import tasks

    return tasks.build_task(config, "/tmp/unused-workdir")


def test_order_independent_of_host_count(mlm_dir, raw):
    c = _config("xlm_roberta", raw, data__prepared_dir=mlm_dir, train__batch_size=8)
    spec = _data(c)
    one = iter(spec.train_data(0, 1))
    hosts = [iter(spec.train_data(i, 4)) for i in range(4)]
    for _ in range(3):
        whole = next(one)
        parts = [next(h) for h in hosts]
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    # Resuming with 2 hosts where 4 left off: the same global step.
    state = hosts[0].get_state()
    two = [iter(spec.train_data(i, 2)) for i in range(2)]
    for h in two:
        h.set_state(state)
    want = next(one)
    got = [next(h) for h in two]
    np.testing.assert_array_equal(np.concatenate([g["input_ids"] for g in got]), want["input_ids"])
    assert_resumes_exactly(lambda: spec.train_data(1, 2), skip=3, n=2)
    # Epochs: after one pass every chunk came once (global shuffle, no repeats within an epoch).
    items = prepared.ShuffledItems(prepared.Prepared.open(mlm_dir).train, 0, None)
    n = len(items.sources[0])
    first = sorted(items(e)[0].tobytes() for e in range(n))
    assert first == sorted(items.sources[0][i].tobytes() for i in range(n))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["xlnet", "mt5"])
def test_plm_and_span_corruption_train_from_prepared(family, raw, tmp_path_factory, tmp_path):
    out, m = _prepared(family, raw, tmp_path_factory)
    assert m["objective"] == {"xlnet": "plm", "mt5": "span_corruption"}[family]
    c = _config(family, raw, data__prepared_dir=out, train__steps=2)
    result = train.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(result["final_eval"]["loss"])
    # A config for another length is refused with the fix.
    c.data.seq_len = 48
    with pytest.raises(Exception, match="run prepare for it"):
        _data(c)


def test_xlnet_rows_are_contiguous_streams(raw, tmp_path_factory):
    out, _ = _prepared("xlnet", raw, tmp_path_factory, model__bi_data=True, train__batch_size=4)
    chunks = prepared.Prepared.open(out).train["train"]
    rows = prepared.StreamRows(chunks, 4, seed=0, make_row=None, bi_data=True)
    length = rows.length
    for r in range(4):
        idx = [rows.chunk_index(s, r)[0] for s in range(length)]
        step = -1 if r >= 2 else 1  # the second half reads its stream backwards
        assert np.all(np.diff(idx) == step), (r, idx[:5])
        # Consecutive indices are consecutive text: chunk i ends where chunk i + 1 starts in
        # the id stream of the prepared file piece (checked on the raw ids).
    a, b = chunks[idx[0]], chunks[idx[0] + step]
    joined = np.concatenate([a, b] if step > 0 else [b, a])
    assert joined.size == 2 * a.size
    # The two forward streams start in different blocks of the corpus, then change each epoch.
    first = {rows.chunk_index(0, r)[0] // length for r in range(2)}
    assert len(first) == 2
    # Batches from the task: row r of step s+1 is the chunk after row r's chunk of step s.
    c = _config("xlnet", raw, data__prepared_dir=out, model__bi_data=True, train__batch_size=4)
    spec = _data(c)
    it = iter(spec.train_data(0, 1))
    b0, b1 = next(it), next(it)
    for r in range(2):
        i0, _ = rows.chunk_index(0, r)
        ids0 = b0["input_ids"][r][b0["token_type_ids"][r] == 0][:-1]  # A without its <sep>
        assert np.array_equal(ids0, chunks[i0][: ids0.size])
        i1, _ = rows.chunk_index(1, r)
        assert i1 == i0 + 1
        ids1 = b1["input_ids"][r][b1["token_type_ids"][r] == 0][:-1]
        assert np.array_equal(ids1, chunks[i1][: ids1.size])


def test_mixture_sampling_rates(raw, tmp_path_factory):
    mixture = {
        "en": {"files": [str(raw / "en.jsonl.gz")]},
        "rest": {"files": [str(raw / "rest.txt")]},
    }
    out, m = _prepared("xlm_roberta", raw, tmp_path_factory, data__mixture=mixture)
    tokens = {k: v["tokens"] for k, v in m["splits"]["train"]["sources"].items()}
    assert set(tokens) == {"en", "rest"}
    p = prepared.Prepared.open(out)
    for alpha, weights in ((0.3, None), (1.0, None), (0.3, {"en": 3.0, "rest": 1.0})):
        probs = prepared.mixture_weights(tokens, alpha, weights)
        if weights:
            assert probs == pytest.approx({"en": 0.75, "rest": 0.25})
        elif alpha == 1.0:
            share = tokens["en"] / sum(tokens.values())
            assert probs["en"] == pytest.approx(share)
        items = prepared.ShuffledItems(p.train, 0, probs)
        drawn = [items(e)[1] for e in range(4000)]
        measured = drawn.count("en") / len(drawn)
        assert abs(measured - probs["en"]) < 0.03, (alpha, measured, probs)


def test_prepare_reads_and_writes_gcs(bucket, raw, tmp_path, monkeypatch):
    from xformers_jax import paths

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    paths.copy(str(raw / "en.jsonl.gz"), bucket + "/raw/a/en.jsonl.gz")
    c = _config("xlm_roberta", raw)
    with c.unlocked():
        c.data.train_files = [bucket + "/raw/**/*.jsonl.gz"]
    out = bucket + "/prepared"
    m = prepare(c, out, IN_MEMORY)
    assert m["inputs"] == [bucket + "/raw/a/en.jsonl.gz"] and m["splits"]["train"]["records"] > 100
    assert paths.isfile(out + "/tokenizer/tokenizer.model") and paths.isfile(out + "/manifest.json")
    with c.unlocked():
        c.data.prepared_dir = out
    spec = _data(c)
    batch = next(iter(spec.train_data(0, 1)))
    assert batch["input_ids"].shape == (8, 32)


@pytest.mark.slow
def test_one_host_equals_two_hosts_with_dropout(mlm_dir, tmp_path):
    """1 process x 4 devices == 2 processes x 2 devices in per-step loss with dropout on, from
    prepared shards; the 2-host checkpoint resumes on 1 host with the same data."""
    import subprocess
    import sys

    from tests.helpers import TINY_CONFIG
    from tests.test_reliability import ROOT, _env
    from tests.test_reliability import _losses as losses

    def cli(workdir, steps):
        return [
            sys.executable, "-m", "xformers_jax", "train", "--config", TINY_CONFIG,
            "--workdir", str(workdir), f"--config.data.prepared_dir={mlm_dir}",
            f"--config.train.steps={steps}", "--config.checkpoint.every_steps=2",
            "--config.model.hidden_dropout_prob=0.1", "--config.train.eval_steps=1",
            "--config.data.vocab_size=1900", "--config.model.vocab_size=1900",
        ]  # fmt: skip

    def run(cmd, env):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    one, two = tmp_path / "one", tmp_path / "two"
    run(cli(one, 4), _env(4))
    launch = [os.path.join(ROOT, "launch", "local_multihost.sh"), "-n", "2", "-d", "2", "--"]
    run(launch + cli(two, 2), _env())
    res = run(cli(two, 4), _env(4))  # resumed on one host
    assert "Resuming from checkpoint at step 2" in res.stdout
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


def test_eval_files_are_prepared_whole(raw, tmp_path_factory):
    out, m = _prepared(
        "xlm_roberta", raw, tmp_path_factory, data__eval_files=[str(raw / "en.jsonl.gz")]
    )
    assert m["eval_from"] == "eval_files" and list(m["splits"]["eval"]["sources"]) == ["eval"]
    # Every document of the eval file, whole (MLM keeps a file's last, shorter chunk), and no
    # held-out slice taken from the training files.
    tok = prepared.Prepared.open(out).tokenizer()
    texts = chatterbot_texts(["english", "spanish", "german"])
    want = sum(len(ids) + 1 for ids in tok.encode_many(texts))
    assert m["splits"]["eval"]["tokens"] == want
    rest = [t for t in open(raw / "rest.txt", encoding="utf-8").read().split("\n") if t.strip()]
    train_want = want + sum(len(ids) + 1 for ids in tok.encode_many(rest))
    assert m["splits"]["train"]["tokens"] == train_want


def test_prepare_errors_are_one_line(tmp_path, capsys):
    from tests.helpers import TINY_CONFIG

    argv = ["prepare", "--config", TINY_CONFIG, "--out", str(tmp_path / "o")]
    assert cli.main([*argv, f"--config.data.train_files=['{tmp_path}/none/*.txt']"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"xformers-jax: error: {tmp_path}/none/*.txt: no file matches"
    (tmp_path / "a.txt").write_text("some text\n")
    c = ["--config.task=classification", f"--config.data.train_files=['{tmp_path}/a.txt']"]
    assert cli.main([*argv, *c]) == 2
    assert "prepare writes shards for mlm, plm, span_corruption" in capsys.readouterr().err


def test_row_masking_matches_roberta_rates(native_tokenizer):
    tok = native_tokenizer
    masker = prepared.MlmMasker(
        vocab_size=tok.vocab_size, special_ids=tok.special_ids, mask_token_id=tok.mask_id,
        mask_prob=0.15, pad_id=tok.pad_id,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    rows = rng.integers(10, tok.vocab_size, size=(400, 128)).astype(np.int32)
    rows[:, -8:] = tok.pad_id
    out = [masker(r, np.random.default_rng((1, i))) for i, r in enumerate(rows)]
    labels = np.stack([o["labels"] for o in out])
    ids = np.stack([o["input_ids"] for o in out])
    sel = labels != -100
    assert abs(sel[:, :-8].mean() - 0.15) < 0.01 and not sel[:, -8:].any()
    assert abs((ids[sel] == tok.mask_id).mean() - 0.8) < 0.02
    kept = (ids[sel] == rows[sel]).mean()
    assert 0.08 < kept < 0.12  # 10% kept (+ the few random draws of the same id)
    assert not np.isin(ids[sel & (ids != tok.mask_id)], list(tok.special_ids)).any()
    np.testing.assert_array_equal(labels[sel], rows[sel])
