"""The data bench's pieces: the synthetic multilingual corpus and the v5p consumption estimate."""

import gzip
import json

from xformers_jax.bench import data


def test_synthetic_corpus_is_multilingual_jsonl_gz(tmp_path):
    files, nbytes = data.synthetic_corpus(str(tmp_path), 1)
    assert files and all(f.endswith(".jsonl.gz") for f in files)
    texts = [json.loads(line)["text"] for f in files for line in gzip.open(f, "rt")]
    assert abs(sum(len(t.encode()) for t in texts) - nbytes) == 0 and nbytes >= 1 << 20
    joined = "".join(texts)
    assert any("\u0400" <= c <= "\u04ff" for c in joined) and any(c >= "\u3040" for c in joined)
    again, _ = data.synthetic_corpus(str(tmp_path / "again"), 1)
    assert gzip.open(again[0]).read() == gzip.open(files[0]).read()  # deterministic


def test_v5p_consumption_estimate():
    c = data.consumption()
    # ~6 x params FLOPs per token: base (~280M with the 250k vocab head) ~ 1M tokens/s per host.
    assert 3e5 < c["base"] < 3e6 and c["xl"] < c["base"] / 8
