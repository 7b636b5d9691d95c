"""Generation vs transformers' `generate` on a random-init tiny mT5, and compile-once checks.

Random-init models rarely emit the real EOS, so the cases also pass an `eos_token_id` the model
does produce, making rows of the padded batch finish at different steps. transformers fills the
tail of a finished beam with its fill value (EOS when pad is 0), we fill with padding: tokens are
compared up to each row's first EOS, and the output lengths must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax import decoding
from xformers_jax.models import mt5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import TINY_MT5, load_hf, random_hf_model  # noqa: E402

TINY = dict(TINY_MT5, dropout_rate=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = transformers.MT5Config(**TINY)
    hf = random_hf_model(transformers.MT5ForConditionalGeneration, config, perturb=False)
    return hf, load_hf(hf, tmp_path_factory.mktemp("mt5"))


def padded_batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 100, size=(3, 8))
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    return ids, mask


def assert_same_tokens(got, want, eos):
    assert got.shape == want.shape, (got, want)
    for g, w in zip(got, want):
        hit = np.flatnonzero(w[1:] == eos)
        n = hit[0] + 2 if hit.size else len(w)
        np.testing.assert_array_equal(g[:n], w[:n])
        assert (g[n:] == 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(eos_token_id=22),
        dict(num_beams=4, length_penalty=0.6),
        dict(num_beams=4, length_penalty=2.0, eos_token_id=64),
        dict(num_beams=4, length_penalty=1.0, eos_token_id=52, early_stopping=True),
        dict(num_beams=3, length_penalty=1.5, eos_token_id=68, early_stopping="never"),
        dict(min_length=6, eos_token_id=22),
        dict(num_beams=4, num_return_sequences=2, eos_token_id=64),
        # 81 decoder positions: many beam reorders.
        dict(max_new_tokens=80, min_new_tokens=80),
        dict(num_beams=4, max_new_tokens=80, min_new_tokens=80),
        dict(num_beams=3, max_new_tokens=80, eos_token_id=64),
    ],
    ids=[
        "greedy",
        "greedy-eos",
        "beam4",
        "beam4-eos",
        "beam4-early",
        "beam3-never",
        "min-len",
        "beam4-return2",
        "greedy-81",
        "beam4-81",
        "beam3-81-eos",
    ],
)
def test_generate_matches_transformers(models, kwargs):
    hf, model = models
    ids, mask = padded_batch()
    kwargs = dict(dict(max_new_tokens=10), **kwargs)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           **kwargs).numpy()  # fmt: skip
    got = model.generate(ids, attention_mask=mask, **kwargs)
    assert_same_tokens(got, want, kwargs.get("eos_token_id", 1))


def test_step_compiles_once(models, monkeypatch):
    _, model = models
    traces = []
    original = mt5.MT5ForConditionalGeneration.decode_step

    def counting(self, *args, **kwargs):
        traces.append(1)  # runs only when jax traces the step
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mt5.MT5ForConditionalGeneration, "decode_step", counting)
    model.decoding_cache = None  # a fresh cache: generate compiles again
    ids, mask = padded_batch()
    for num_beams in (1, 2):
        traces.clear()
        model.generate(ids, attention_mask=mask, max_new_tokens=9, num_beams=num_beams)
        assert len(traces) == 1  # one trace for 9 tokens: the while_loop body
        model.generate(ids[::-1], attention_mask=mask[::-1], max_new_tokens=9, num_beams=num_beams)
        assert len(traces) == 1  # same shapes: no retrace


def test_sampling(models):
    _, model = models
    ids, mask = padded_batch()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                       temperature=2.0, top_p=0.9, seed=1)  # fmt: skip
    b = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                       temperature=2.0, top_p=0.9, seed=1)  # fmt: skip
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 7) and (a[:, 0] == 0).all() and (a < 100).all()


def test_generate_refuses_non_generative_heads(tmp_path):
    torch.manual_seed(0)
    transformers.MT5EncoderModel(transformers.MT5Config(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="does not support generate"):
        xj.from_pretrained(tmp_path).generate(np.ones((1, 3), np.int32))


@pytest.mark.parametrize("n", [4096, 5000, 128007])
def test_chunked_top_k_equals_lax(n):
    """Beam search's chunked top-k is `lax.top_k`: values and indices, with -inf (blocked
    tokens), ties and a length that is no multiple of the chunk."""
    rng = np.random.RandomState(n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    x[0, ::7] = -np.inf
    x[1] = np.round(x[1] * 2)  # many ties
    x[2, -5:] = 10.0  # the best entries in the padded last chunk
    for k in (1, 8):
        want = jax.lax.top_k(jnp.asarray(x), k)
        got = jax.jit(decoding.top_k, static_argnums=1)(jnp.asarray(x), k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_rows_equals_take(axis):
    """Beam search's cache reorder (one take per leading index for a row axis > 0) is
    `jnp.take` along the row axis, repeated and dropped rows included."""
    x = np.arange(3 * 4 * 5 * 2, dtype=np.float32).reshape(3, 4, 5, 2)
    rows = jnp.asarray([2, 2, 0, 1][: x.shape[axis]] if axis < 2 else [4, 0, 0, 3, 1])
    got = jax.jit(decoding._take_rows, static_argnums=2)(jnp.asarray(x), rows, axis)
    np.testing.assert_array_equal(np.asarray(got), np.take(x, np.asarray(rows), axis=axis))
