"""XLM-R(-XL) causal LM generation vs transformers' `generate`, and a compile-once check.

Random-init tiny models (`is_decoder=True`) of both variants on a left-padded prompt batch
(transformers' layout for decoder-only models: `attention_mask` and `pad_token_id` given). Such
models rarely emit the real EOS, so some cases use an EOS the model does produce (picked from a
first greedy run), making rows finish at different steps. Tokens are compared up to each row's
first generated EOS; after it ours must be padding, and the output lengths must agree.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.parity import TINY_XLMR, load_hf, random_hf_model  # noqa: E402
from xformers_jax.models import xlm_roberta_heads  # noqa: E402

PAD = 1
TINY = dict(
    TINY_XLMR,
    is_decoder=True,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=PAD,
    bos_token_id=0,
    eos_token_id=2,
)
VARIANTS = {
    "xl": (transformers.XLMRobertaXLConfig, transformers.XLMRobertaXLForCausalLM, {}),
    "xlmr": (transformers.XLMRobertaConfig, transformers.XLMRobertaForCausalLM, {}),
    "xlmr-relkey": (
        transformers.XLMRobertaConfig,
        transformers.XLMRobertaForCausalLM,
        dict(position_embedding_type="relative_key"),
    ),
}
NEW = 12


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    config_cls, model_cls, extra = VARIANTS[request.param]
    hf = random_hf_model(model_cls, config_cls(**TINY, **extra), perturb=False)
    return hf, load_hf(hf, tmp_path_factory.mktemp(request.param))


def left_padded_batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, size=(3, 6))
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    ids[2, :1], mask[2, :1] = PAD, 0
    return ids, mask


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=PAD,
                          max_new_tokens=NEW, do_sample=False, **kw)  # fmt: skip
    return out.numpy()


def assert_same_tokens(got, want, prompt_len, eos):
    assert got.shape == want.shape, (got, want)
    for g, w in zip(got, want):
        hit = np.flatnonzero(w[prompt_len:] == eos)
        n = prompt_len + hit[0] + 1 if hit.size else len(w)
        np.testing.assert_array_equal(g[:n], w[:n])
        assert (g[n:] == PAD).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(eos_token_id="picked"),
        dict(num_beams=4, length_penalty=0.6),
        dict(num_beams=4, length_penalty=2.0, eos_token_id="picked"),
    ],
    ids=["greedy", "greedy-eos", "beam", "beam-eos"],
)
def test_generate_matches_transformers(models, kwargs):
    hf, ours = models
    ids, mask = left_padded_batch()
    kwargs = dict(kwargs)
    if kwargs.get("eos_token_id") == "picked":
        # A token row 0 emits mid-way: rows then stop at different steps.
        kwargs["eos_token_id"] = int(hf_generate(hf, ids, mask)[0, ids.shape[1] + 3])
    eos = kwargs.get("eos_token_id", 2)
    want = hf_generate(hf, ids, mask, **kwargs)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
    assert_same_tokens(got, want, ids.shape[1], eos)


def test_step_traces_once(models, monkeypatch):
    _, ours = models
    calls = []
    original = xlm_roberta_heads.XLMRobertaForCausalLM.decode_step

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(xlm_roberta_heads.XLMRobertaForCausalLM, "decode_step", counted)
    ours.decoding_cache = None  # a fresh cache: generate compiles again
    ids, mask = left_padded_batch()
    ours.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    ours.generate(ids[::-1].copy(), attention_mask=mask[::-1].copy(), max_new_tokens=NEW)
    assert len(calls) == 1  # one trace of the loop body serves every token of both calls
