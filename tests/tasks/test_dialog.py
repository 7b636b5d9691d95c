"""Dialog replies (task `seq2seq`): corpus pairs, their layout, the pipeline, and a short mT5
fine-tuning run whose printed report holds generated replies to held-out prompts."""

import json
import os

import numpy as np
import pytest
import yaml

from tests.helpers import assert_resumes_exactly
from xformers_jax import config_lib, train
from xformers_jax.data import DataError
from xformers_jax.data import dialog as dg
from xformers_jax.data.t5_tokenizer import T5Tokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mt5", "dialog.py")
LANGS = ["english", "spanish", "japanese"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pairs = dg.dialog_pairs(LANGS, "train")
    texts = [t for p in pairs for t in (p.prompt, p.reply)]
    return T5Tokenizer.train(texts, tmp_path_factory.mktemp("spm") / "spiece", 1900, seed=0)


def test_pairs_follow_conversations():
    import chatterbot_corpus

    path = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english",
                        "conversations.yml")  # fmt: skip
    with open(path, encoding="utf-8") as f:
        conv = next(c for c in yaml.safe_load(f)["conversations"] if len(c) >= 4)
    pairs = dg.dialog_pairs(["english"])
    got = [(p.prompt, p.reply) for p in pairs]
    want = list(zip(conv, conv[1:]))
    start = got.index(want[0])
    assert got[start : start + len(want)] == want  # consecutive utterances, in order
    assert all(p.language == "english" for p in pairs)
    train_pairs, eval_pairs = dg.dialog_pairs(LANGS, "train"), dg.dialog_pairs(LANGS, "eval")
    assert len(train_pairs) + len(eval_pairs) == len(dg.dialog_pairs(LANGS))
    assert 0.05 < len(eval_pairs) / len(dg.dialog_pairs(LANGS)) < 0.15
    assert not {p.prompt for p in train_pairs} & {p.prompt for p in eval_pairs}
    assert {p.language for p in eval_pairs} == set(LANGS)
    with pytest.raises(ValueError, match="unknown"):
        dg.dialog_pairs(["klingon"])


def test_encode_pairs_layout(tokenizer):
    long = "word " * 50
    pairs = [dg.DialogPair("Hello there", "Hi!", "english"), dg.DialogPair(long, long, "x")]
    out = dg.encode_pairs(pairs, tokenizer, inputs_length=12, targets_length=8,
                          decoder_start_token_id=0)  # fmt: skip
    hello, hi = tokenizer.encode("Hello there"), tokenizer.encode("Hi!")  # both end with </s>
    assert out["input_ids"].shape == (2, 12) and out["labels"].shape == (2, 8)
    np.testing.assert_array_equal(out["input_ids"][0, : len(hello)], hello)
    assert (out["input_ids"][0, len(hello) :] == 0).all()
    np.testing.assert_array_equal(out["attention_mask"][0], np.arange(12) < len(hello))
    np.testing.assert_array_equal(out["labels"][0, : len(hi)], hi)
    assert (out["labels"][0, len(hi) :] == -100).all()
    # Teacher forcing: the labels shifted right behind the start token, padding for -100.
    np.testing.assert_array_equal(out["decoder_input_ids"][0, 1 : len(hi) + 1], hi)
    assert (
        out["decoder_input_ids"][0, 0] == 0
        and (out["decoder_input_ids"][0, len(hi) + 1 :] == 0).all()
    )
    # Long utterances are cut but keep their EOS.
    assert out["input_ids"][1, -1] == tokenizer.eos_id and out["attention_mask"][1].all()
    assert out["labels"][1, -1] == tokenizer.eos_id and (out["labels"][1] >= 0).all()


def test_read_pairs(tmp_path):
    good = tmp_path / "pairs.tsv"
    good.write_text("Hi\tHello!\n\n  How are you?\tFine,  thanks \n", encoding="utf-8")
    assert [(p.prompt, p.reply) for p in dg.read_pairs(good)] == [
        ("Hi", "Hello!"),
        ("How are you?", "Fine, thanks"),
    ]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.tsv:3: expected 'prompt<TAB>reply'"):
        dg.read_pairs(bad)
    (tmp_path / "empty.tsv").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.tsv: no 'prompt<TAB>reply' line"):
        dg.read_pairs(tmp_path / "empty.tsv")
    with pytest.raises(DataError, match=r"nothing-\*.tsv: no file matches"):
        dg.read_pairs(str(tmp_path / "nothing-*.tsv"))


def test_read_pairs_globs_compressed_and_gs(tmp_path, bucket):
    """Dialog files as the pretraining sources: globs, .gz / .zst by name, gs:// URLs."""
    import gzip

    import zstandard

    from xformers_jax import paths

    os.makedirs(tmp_path / "d" / "sub")
    with gzip.open(tmp_path / "d" / "en.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("Hi\tHello!\n")
    (tmp_path / "d" / "sub" / "de.tsv.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"Hallo\tGuten Tag\n")
    )
    pairs = dg.read_pairs(str(tmp_path / "d" / "**" / "*.tsv.*"))
    assert [(p.prompt, p.reply, p.language) for p in pairs] == [
        ("Hi", "Hello!", "en"),
        ("Hallo", "Guten Tag", "de"),
    ]
    paths.write_bytes(bucket + "/dialog/fr.tsv", b"Salut\tBonjour\n")
    (pair,) = dg.read_pairs(bucket + "/dialog/*.tsv")
    assert (pair.prompt, pair.reply, pair.language) == ("Salut", "Bonjour", "fr")
    with gzip.open(tmp_path / "bin.tsv.gz", "wb") as f:
        f.write(b"a\tb\n\x00\n")
    with pytest.raises(DataError, match=r"bin.tsv.gz:2: binary content"):
        dg.read_pairs(tmp_path / "bin.tsv.gz")


def test_dataset_resumes_and_eval_wraps(tokenizer):
    pairs = dg.dialog_pairs(LANGS, "eval")
    arrays = dg.encode_pairs(pairs, tokenizer, inputs_length=16, targets_length=16,
                             decoder_start_token_id=0)  # fmt: skip
    (want,) = assert_resumes_exactly(
        lambda: dg.dialog_dataset(arrays, batch_size=4, seed=0, shard_index=1, shard_count=2),
        skip=3,
        n=1,
    )
    assert want["input_ids"].shape == (4, 16) and want["labels"].dtype == np.int32
    batches = list(dg.dialog_dataset(arrays, batch_size=4, seed=0, train=False, shard_count=2))
    assert len(batches) == -(-len(pairs) // 8)  # one pass, wrapped round to whole global batches


def test_report_prompts_take_languages_in_turn():
    from xformers_jax.tasks.seq2seq import report_prompts

    pairs = dg.dialog_pairs(LANGS, "eval")
    shown = report_prompts(pairs, 5)
    assert [p.language for p in shown] == ["english", "spanish", "japanese", "english", "spanish"]
    assert len({p.prompt for p in shown}) == 5


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_config_builds(preset):
    c = config_lib.load_config(f"{CONFIG}:{preset}")
    assert c.task == "seq2seq" and c.model.family == "mt5" and c.data.tokenizer_type == "t5"
    assert (c.model.pad_token_id, c.model.eos_token_id, c.model.decoder_start_token_id) == (0, 1, 0)
    assert c.report.num_prompts > 0


def _tiny(tmp_path, **overrides):
    c = config_lib.load_config(f"{CONFIG}:tiny")
    with c.unlocked():
        c.data.languages = LANGS
        c.model.d_model, c.model.d_ff, c.model.d_kv, c.model.num_heads = 32, 64, 8, 4
        c.model.vocab_size, c.data.vocab_size = 2000, 1900
        c.data.seq_len, c.data.targets_length = 24, 16
        c.report.num_prompts, c.report.max_new_tokens = 4, 12
        c.train.batch_size, c.train.steps = 16, 30
        c.train.eval_every_steps, c.train.eval_steps = 1000, 4
        c.optim.lr, c.optim.warmup_steps = 1e-2, 3
        c.checkpoint.every_steps = 1000
        c.log.every_steps, c.log.progress = 10, False
        for k, v in overrides.items():
            section, key = k.split("__")
            c[section][key] = v
    return c


def _replies(out: str) -> list[tuple[str, str, str]]:
    head = out.index("Replies to ")
    lines = out[head:].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("  ["):
            break
        lang, rest = line.strip()[1:].split("] ", 1)
        prompt, reply = rest.split(" -> ", 1)
        rows.append((lang, prompt, reply))
    return rows


@pytest.mark.slow
def test_dialog_finetuning_prints_replies(tmp_path, capsys):
    from xformers_jax.tasks.seq2seq import report_prompts

    result = train.train_and_evaluate(_tiny(tmp_path), str(tmp_path / "work"))
    out = capsys.readouterr().out
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"] - 0.5, result
    rows = [json.loads(x) for x in open(tmp_path / "work" / "metrics.jsonl")]
    assert rows[-1]["split"] == "eval"
    # The report: one line per held-out prompt, each with a non-empty generated reply.
    replies = _replies(out)
    shown = report_prompts(dg.dialog_pairs(LANGS, "eval"), 4)
    assert [(lang, prompt) for lang, prompt, _ in replies] == [
        (p.language, p.prompt) for p in shown
    ]
    assert all(reply.strip() for _, _, reply in replies), replies
    # Replies are decoded text of the run's T5 tokenizer (kept in the workdir), not ids.
    tok = T5Tokenizer.load(tmp_path / "work" / "t5_tokenizer")
    for _, _, reply in replies:
        assert tok.decode(tok.encode(reply), skip_special_tokens=True) == reply


@pytest.mark.slow  # two trainer compiles (span corruption, then dialog): ~1 min of CPU
def test_dialog_from_span_corruption_run(tmp_path, capsys):
    from tests.helpers import tiny_corpus

    span = config_lib.load_config(os.path.join(os.path.dirname(CONFIG), "pretrain_span.py:tiny"))
    with span.unlocked():
        span.data.train_files = span.data.eval_files = [tiny_corpus(str(tmp_path))]
        span.model.d_model, span.model.d_ff, span.model.d_kv, span.model.num_heads = 32, 64, 8, 4
        span.model.vocab_size, span.data.vocab_size, span.data.seq_len = 2000, 1900, 32
        span.train.batch_size, span.train.steps, span.train.eval_steps = 8, 4, 1
        span.checkpoint.every_steps, span.log.progress = 1000, False
    train.train_and_evaluate(span, str(tmp_path / "span"))
    # The span run's fairseq-layout tokenizer and its ids (pad 1, eos 2) carry over.
    native = str(tmp_path / "span" / "tokenizer.model")
    c = _tiny(tmp_path, data__tokenizer=native, train__steps=4, model__pad_token_id=1,
              model__eos_token_id=2, model__decoder_start_token_id=1)  # fmt: skip
    with c.unlocked():
        c.init_from = str(tmp_path / "span")
    capsys.readouterr()
    result = train.train_and_evaluate(c, str(tmp_path / "dialog"))
    out = capsys.readouterr().out
    assert f"Initialised params from {tmp_path / 'span'}" in out
    assert np.isfinite(result["final_eval"]["loss"]) and len(_replies(out)) == 4
    assert not (tmp_path / "dialog" / "t5_tokenizer").exists()  # the span run's tokenizer, kept
