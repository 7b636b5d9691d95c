"""XLNet generation (permutation trick, fixed shapes) vs transformers' `generate`.

Both of transformers' modes are matched token for token: its default `use_mems=True` (prompt plus
dummy once, then the last two tokens plus the dummy against the mems) and `use_mems=False` (the
whole sequence recomputed every step). The tiny model is random-init with `initializer_range` 0.5:
at transformers' default 0.02 greedy decoding repeats one or two tokens and both modes give the
same ids, so the comparison could not tell them apart (`test_modes_differ` guards that).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tests.parity import load_hf, random_hf_model  # noqa: E402
from xformers_jax.models import xlnet, xlnet_heads  # noqa: E402

TINY = dict(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0,
            pad_token_id=5, bos_token_id=1, eos_token_id=2, initializer_range=0.5)  # fmt: skip
NEW = 100


def build(path, **kw):
    config = transformers.XLNetConfig(**{**TINY, **kw})
    hf = random_hf_model(transformers.XLNetLMHeadModel, config, perturb=False)
    return hf, load_hf(hf, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build(tmp_path_factory.mktemp("xlnet"))


@pytest.fixture(scope="module")
def short_mems(tmp_path_factory):
    """The same weights with `mem_len=8`: transformers' cache keeps its last 8 states."""
    return build(tmp_path_factory.mktemp("xlnet_mem8"), mem_len=8)


def prompt():
    return np.random.RandomState(0).randint(6, 100, size=(2, 5))


def hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor(ids), do_sample=False, pad_token_id=5, **kw).numpy()


@pytest.fixture(scope="module")
def reference(models):
    """transformers' greedy ids for `prompt()`, `NEW` new tokens: default and `use_mems=False`."""
    hf, _ = models
    return dict(default=hf_generate(hf, prompt(), max_new_tokens=NEW),
                no_mems=hf_generate(hf, prompt(), max_new_tokens=NEW, use_mems=False))  # fmt: skip


def test_modes_differ(reference):
    """The cases below would not test the mems path if transformers' modes agreed."""
    assert (reference["default"] != reference["no_mems"]).any()


def test_greedy_matches_transformers_default(models, reference):
    """transformers' default generate (`use_mems=config.use_mems_eval`, True), 2 prompts."""
    _, ours = models
    got = ours.generate(prompt(), max_new_tokens=NEW)
    np.testing.assert_array_equal(got, reference["default"])
    # The explicit option resolves to the same settings: no second compile.
    np.testing.assert_array_equal(ours.generate(prompt(), max_new_tokens=NEW, use_mems=True), got)


def test_greedy_matches_transformers_no_mems(models, reference):
    _, ours = models
    got = ours.generate(prompt(), max_new_tokens=NEW, use_mems=False)
    np.testing.assert_array_equal(got, reference["no_mems"])


def test_mem_len_truncation(short_mems, reference):
    """`mem_len=8` < the sequence: the cache drops its oldest states every step, also in the
    prefill (a 12-token prompt)."""
    hf, ours = short_mems
    want = hf_generate(hf, prompt(), max_new_tokens=40)
    assert (want != reference["default"][:, :45]).any()  # the truncation changes the ids
    np.testing.assert_array_equal(ours.generate(prompt(), max_new_tokens=40), want)
    ids = np.random.RandomState(1).randint(6, 100, size=(2, 12))
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=40),
                                  hf_generate(hf, ids, max_new_tokens=40))  # fmt: skip


def test_single_token_prompt(models):
    hf, ours = models
    ids = prompt()[:1, :1]
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=20),
                                  hf_generate(hf, ids, max_new_tokens=20))  # fmt: skip


@pytest.mark.parametrize("use_mems", [True, False])
def test_beam_search_matches_transformers(models, use_mems):
    hf, ours = models
    ids = prompt()
    kw = dict(max_new_tokens=30, num_beams=3, num_return_sequences=2, length_penalty=0.5)
    want = hf_generate(hf, ids, use_mems=use_mems, **kw)
    np.testing.assert_array_equal(ours.generate(ids, use_mems=use_mems, **kw), want)


def test_sampling_top_k_1_is_greedy(models, reference):
    """Sampling goes through the same mems step: with top_k=1 it is greedy."""
    _, ours = models
    got = ours.generate(prompt(), max_new_tokens=NEW, do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(got, reference["default"])


def test_unknown_option_raises(models):
    _, ours = models
    with pytest.raises(TypeError):
        ours.generate(prompt(), max_new_tokens=2, use_memz=True)


@pytest.mark.parametrize("cfg", [{}, dict(attn_type="uni", same_length=True)])
def test_mems_mask_hides_leading_slots(cfg):
    """Leading mem slots hidden by `mems_mask` act as if absent: outputs and new mems equal those
    of the mems without them (relative positions only depend on distances)."""
    config = xlnet.XLNetConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_inner=32,
                               dropout=0.0, mem_len=None, **cfg)  # fmt: skip
    model = xlnet.XLNetModel(config)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 50, size=(2, 3)))
    mems = jnp.asarray(rng.randn(2, 2, 4, 16), jnp.float32)
    perm = jnp.asarray(np.broadcast_to(np.eye(3)[-1], (2, 3, 3)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), ids, mems=mems)["params"]

    @jax.jit
    def run(mems, mems_mask=None):
        return model.apply({"params": params}, ids, mems=mems, perm_mask=perm, use_mems=True,
                           return_stacked_mems=True, mems_mask=mems_mask)  # fmt: skip

    want = run(mems)
    padded = jnp.concatenate([jnp.full((2, 2, 3, 16), 7.0), mems], axis=2)
    got = run(padded, jnp.asarray(np.arange(7) >= 3)[None].repeat(2, 0))
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)
    np.testing.assert_allclose(got.mems[:, :, 3:], want.mems, atol=1e-5)


@pytest.mark.parametrize("use_mems", [True, False])
def test_step_traces_once(models, monkeypatch, use_mems):
    _, ours = models
    calls = []
    original = xlnet_heads.XLNetLMHeadModel.decode_step

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(xlnet_heads.XLNetLMHeadModel, "decode_step", counted)
    ours.decoding_cache = None  # a fresh cache: generate compiles again
    ours.generate(prompt(), max_new_tokens=8, use_mems=use_mems)
    ours.generate(prompt()[::-1].copy(), max_new_tokens=8, use_mems=use_mems)
    assert len(calls) == 1


@pytest.mark.parametrize("cfg, path", [
    (dict(clamp_len=3), "kv"),  # the K/V cache with clamped distances
    (dict(attn_type="uni"), "mems"),  # causal attention: the right-aligned mems buffer
    (dict(reuse_len=2), "mems"),  # transformers' mems keep only 2 new states per call
])  # fmt: skip
def test_cache_paths_match_transformers(tmp_path, cfg, path):
    """Both generation caches (per-layer K/V at absolute slots, or the mems buffer) give
    transformers' default generate, and each config takes the cache it should. One row:
    transformers' `attn_type="uni"` fails to broadcast its masks for a batch of two."""
    hf, ours = build(tmp_path, **cfg)
    ids = prompt()[:1]
    context = ours.module.apply({"params": ours.params}, jnp.asarray(ids), None, 30,
                                method="init_decoding")  # fmt: skip
    assert path in context
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=24),
                                  hf_generate(hf, ids, max_new_tokens=24))  # fmt: skip


def test_decoding_constants_follow_the_params(models):
    """The transposed LM table is made once per params, and again when a leaf is replaced."""
    _, ours = models
    ids = prompt()
    ours.generate(ids, max_new_tokens=4)
    consts = ours.decoding_cache.constants
    ours.generate(ids, max_new_tokens=4)
    assert ours.decoding_cache.constants is consts
    old = ours.params
    try:
        ours.params = jax.tree.map(lambda x: x * 1.5, old)
        ours.generate(ids, max_new_tokens=4)
        now = ours.decoding_cache.constants["lm_table"]
        np.testing.assert_allclose(now, 1.5 * np.asarray(consts["lm_table"]), rtol=1e-6)
    finally:
        ours.params = old
