"""XLNet generation (permutation trick, fixed-size token buffer) vs transformers' `generate`.

transformers is run with `use_mems=False` (every step recomputes the whole sequence, as ours does);
its `use_mems=True` path re-uses mems computed with bidirectional context and is not matched.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from xformers_jax.models import xlnet  # noqa: E402

TINY = dict(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0,
            pad_token_id=5, bos_token_id=1, eos_token_id=2)  # fmt: skip
NEW = 100


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("xlnet")
    hf.save_pretrained(path)
    return hf, xj.from_pretrained(path)


def prompt():
    return np.random.RandomState(0).randint(6, 100, size=(2, 5))


def test_greedy_matches_transformers(models):
    hf, ours = models
    ids = prompt()
    with torch.no_grad():
        want = hf.generate(torch.tensor(ids), max_new_tokens=NEW, do_sample=False,
                           use_mems=False, pad_token_id=5).numpy()  # fmt: skip
    got = ours.generate(ids, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, want)


def test_step_traces_once(models, monkeypatch):
    _, ours = models
    calls = []
    original = xlnet.XLNetLMHeadModel.decode_step

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(xlnet.XLNetLMHeadModel, "decode_step", counted)
    ours.__dict__.pop("_generate_fns", None)
    ours.generate(prompt(), max_new_tokens=8)
    ours.generate(prompt()[::-1].copy(), max_new_tokens=8)
    assert len(calls) == 1
