"""XLNet parity with transformers' PyTorch models on random-init tiny checkpoints.

Each HF model is built once per module (seeded, LayerNorms and biases perturbed so the name maps
are really checked), saved with `save_pretrained`, loaded with `xformers_jax.from_pretrained`, and
compared in float32 at atol 1e-4: every head, perm_mask + target_mapping, mems chained over two
segments, uni attention with same_length, bi_data, clamp_len, reuse_len, padded batches (every
position compared: XLNet's outputs at padding are well defined), and the save round trip.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import assert_close as close  # noqa: E402
from tests.parity import assert_tree_close as close_tree  # noqa: E402
from tests.parity import load_hf as load  # noqa: E402
from tests.parity import random_hf_model  # noqa: E402
from xformers_jax.convert import ConversionError  # noqa: E402

VOCAB, D, LAYERS, HEADS, LEN = 100, 32, 2, 4, 8
HEAD_CLASSES = (
    "XLNetModel", "XLNetLMHeadModel", "XLNetForSequenceClassification",
    "XLNetForTokenClassification", "XLNetForMultipleChoice", "XLNetForQuestionAnsweringSimple",
    "XLNetForQuestionAnswering",
)  # fmt: skip


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, d_model=D, n_layer=LAYERS, n_head=HEADS, d_inner=64,
                mem_len=6, num_labels=3, start_n_top=3, end_n_top=2, pad_token_id=5)  # fmt: skip
    return transformers.XLNetConfig(**{**base, **kw})


def make_hf(cls_name, seed=0, **kw):
    return random_hf_model(cls_name, hf_config(**kw), seed)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """HF model -> our model, for every head with the default config (built lazily, cached)."""
    cache = {}

    def get(cls_name):
        if cls_name not in cache:
            # transformers' simple QA head splits num_labels outputs into start and end.
            hf = make_hf(cls_name, **({"num_labels": 2} if "Simple" in cls_name else {}))
            cache[cls_name] = (hf, load(hf, tmp_path_factory.mktemp(cls_name)))
        return cache[cls_name]

    return get


def batch(b=2, length=LEN, seed=0):
    """Padded rows (XLNet pads on the left), token types with a CLS segment id 2."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(6, VOCAB, size=(b, length))
    mask = np.ones_like(ids)
    ids[-1, :3], mask[-1, :3] = 5, 0
    types = np.zeros_like(ids)
    types[:, length // 2 :] = 1
    types[:, -1] = 2
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def perm_inputs(b=2, length=LEN, seed=1):
    rng = np.random.RandomState(seed)
    perm = (rng.rand(b, length, length) > 0.6).astype(np.float32)
    tm = np.zeros((b, 3, length), np.float32)
    for k, pos in enumerate((1, 4, length - 1)):
        tm[:, k, pos] = 1.0
    return dict(perm_mask=perm, target_mapping=tm)


def torch_call(hf, inputs, **kw):
    t = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    if "attention_mask" in t:
        t["attention_mask"] = t["attention_mask"].float()
    with torch.no_grad():
        return hf(**t, **kw)


def test_base_model_padded_hidden_states_attentions_mems(pairs):
    hf, ours = pairs("XLNetModel")
    inputs = batch()
    kw = dict(output_hidden_states=True, output_attentions=True, use_mems=True)
    theirs, out = torch_call(hf, inputs, **kw), ours(**inputs, **kw)
    close(out.last_hidden_state, theirs.last_hidden_state, "last_hidden_state")
    close_tree(out.hidden_states, theirs.hidden_states, "hidden_states")
    close_tree(out.attentions, theirs.attentions, "attentions")
    close_tree(out.mems, theirs.mems, "mems")


def test_lm_perm_mask_target_mapping_two_streams(pairs):
    hf, ours = pairs("XLNetLMHeadModel")
    inputs = {**batch(), **perm_inputs()}
    labels = np.random.RandomState(2).randint(0, VOCAB, size=(2, 3))
    kw = dict(output_hidden_states=True, output_attentions=True)
    theirs = torch_call(hf, {**inputs, "labels": labels}, **kw)
    out = ours(**inputs, labels=labels, **kw)
    close(out.logits, theirs.logits, "logits")
    close(out.loss, theirs.loss, "loss")
    assert len(out.hidden_states) == 2 * (LAYERS + 1)  # (h, g) per layer input + output
    close_tree(out.hidden_states, theirs.hidden_states, "hidden_states")
    close_tree(out.attentions, theirs.attentions, "attentions (h, g)")


def test_lm_mems_chained_over_two_segments(pairs):
    hf, ours = pairs("XLNetLMHeadModel")
    seg1, seg2 = batch(seed=3), {**batch(seed=4), **perm_inputs(seed=5)}
    t1, o1 = torch_call(hf, seg1, use_mems=True), ours(**seg1, use_mems=True)
    close_tree(o1.mems, t1.mems, "mems after segment 1")
    t2 = torch_call(hf, {**seg2, "mems": t1.mems}, use_mems=True)
    o2 = ours(**seg2, mems=o1.mems, use_mems=True)
    close(o2.logits, t2.logits, "logits of segment 2")
    close_tree(o2.mems, t2.mems, "mems after segment 2 (mem_len 6)")
    # Our stacked [layers, b, mem_len, d] layout is accepted too.
    from xformers_jax.models.xlnet import stack_mems

    o3 = ours(**seg2, mems=stack_mems(o1.mems), use_mems=True)
    close(o3.logits, t2.logits, "logits with stacked mems")


@pytest.mark.parametrize(
    "variant",
    [
        dict(attn_type="uni", same_length=True),
        dict(attn_type="uni", same_length=False, clamp_len=3),
        dict(bi_data=True, clamp_len=4),
        dict(reuse_len=5, same_length=True),
    ],
    ids=["uni_same_length", "uni_clamp", "bi_data_clamp", "reuse_len"],
)
def test_config_variants_with_mems(tmp_path, variant):
    hf = make_hf("XLNetLMHeadModel", seed=7, **variant)
    ours = load(hf, tmp_path)
    # transformers' uni masks only broadcast over a batch of one (an in-place add).
    b = 1 if variant.get("attn_type") == "uni" else 2
    seg1, seg2 = batch(b, seed=8), {**batch(b, seed=9), **perm_inputs(b, seed=10)}
    t1, o1 = torch_call(hf, seg1, use_mems=True), ours(**seg1, use_mems=True)
    close(o1.logits, t1.logits, "segment 1 logits")
    close_tree(o1.mems, t1.mems, "mems")
    t2 = torch_call(hf, {**seg2, "mems": t1.mems}, use_mems=True)
    close(ours(**seg2, mems=o1.mems, use_mems=True).logits, t2.logits, "segment 2 logits")


def test_sequence_classification(pairs):
    hf, ours = pairs("XLNetForSequenceClassification")
    inputs = batch()
    labels = np.array([0, 2])
    theirs, out = torch_call(hf, {**inputs, "labels": labels}), ours(**inputs, labels=labels)
    close(out.logits, theirs.logits, "logits")
    close(out.loss, theirs.loss, "loss")


def test_token_classification(pairs):
    hf, ours = pairs("XLNetForTokenClassification")
    inputs = batch()
    labels = np.random.RandomState(0).randint(0, 3, size=(2, LEN))
    theirs, out = torch_call(hf, {**inputs, "labels": labels}), ours(**inputs, labels=labels)
    close(out.logits, theirs.logits, "logits")
    close(out.loss, theirs.loss, "loss")


def test_multiple_choice(pairs):
    hf, ours = pairs("XLNetForMultipleChoice")
    rows = batch(b=4)
    inputs = {k: v.reshape(2, 2, LEN) for k, v in rows.items()}
    labels = np.array([1, 0])
    theirs, out = torch_call(hf, {**inputs, "labels": labels}), ours(**inputs, labels=labels)
    close(out.logits, theirs.logits, "logits")
    close(out.loss, theirs.loss, "loss")


def test_question_answering_simple(pairs):
    hf, ours = pairs("XLNetForQuestionAnsweringSimple")
    inputs = batch()
    pos = dict(start_positions=np.array([2, 9]), end_positions=np.array([5, 6]))  # 9: ignored
    theirs, out = torch_call(hf, {**inputs, **pos}), ours(**inputs, **pos)
    close(out.start_logits, theirs.start_logits, "start_logits")
    close(out.end_logits, theirs.end_logits, "end_logits")
    close(out.loss, theirs.loss, "loss")


def test_question_answering_beam_and_loss(pairs, tmp_path):
    hf, ours = pairs("XLNetForQuestionAnswering")
    inputs = batch()
    p_mask = np.zeros((2, LEN), np.float32)
    p_mask[:, 0] = 1.0
    cls_index = np.array([LEN - 1, LEN - 1])
    theirs = torch_call(hf, {**inputs, "p_mask": p_mask, "cls_index": cls_index})
    out = ours(**inputs, p_mask=p_mask, cls_index=cls_index)
    # Default: true log-probs; transformers returns probabilities under the same names.
    close(np.exp(out.start_top_log_probs), theirs.start_top_log_probs, "start_top_probs")
    close(np.exp(out.end_top_log_probs), theirs.end_top_log_probs, "end_top_probs")
    close(out.start_top_index, theirs.start_top_index, "start_top_index")
    close(out.end_top_index, theirs.end_top_index, "end_top_index")
    close(out.cls_logits, theirs.cls_logits, "cls_logits")
    compat = xj.from_pretrained(ours_path(hf, tmp_path), hf_compat=True)
    out_c = compat(**inputs, p_mask=p_mask, cls_index=cls_index)
    close(out_c.start_top_log_probs, theirs.start_top_log_probs, "hf_compat start")
    close(out_c.end_top_log_probs, theirs.end_top_log_probs, "hf_compat end")

    labels = dict(start_positions=np.array([1, 4]), end_positions=np.array([3, 6]),
                  cls_index=cls_index, is_impossible=np.array([0.0, 1.0], np.float32))  # fmt: skip
    t_loss = torch_call(hf, {**inputs, **labels, "p_mask": p_mask}).loss
    close(ours(**inputs, **labels, p_mask=p_mask).loss, t_loss, "loss with answer class")


def ours_path(hf, tmp_path):
    hf.save_pretrained(tmp_path / "compat")
    return str(tmp_path / "compat")


def test_save_pretrained_round_trip(pairs, tmp_path):
    hf, ours = pairs("XLNetForQuestionAnsweringSimple")
    xj.save_pretrained(ours, tmp_path / "out")
    back = transformers.XLNetForQuestionAnsweringSimple.from_pretrained(tmp_path / "out").eval()
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2
        close(b, a, k)
    hf_lm, ours_lm = pairs("XLNetLMHeadModel")
    xj.save_pretrained(ours_lm, tmp_path / "lm")
    back_lm = transformers.XLNetLMHeadModel.from_pretrained(tmp_path / "lm").eval()
    inputs = batch()
    close(torch_call(back_lm, inputs).logits, torch_call(hf_lm, inputs).logits, "round trip")


def test_untie_r_false_shares_biases(tmp_path):
    hf = make_hf("XLNetModel", seed=11, untie_r=False)
    with pytest.raises(ConversionError, match="untie_r"):
        load(hf, tmp_path / "differ")  # transformers' per-layer copies differ: not shareable
    with torch.no_grad():  # as in checkpoints converted from the original (shared) ones
        for layer in hf.layer[1:]:
            for n in ("r_w_bias", "r_r_bias", "r_s_bias"):
                getattr(layer.rel_attn, n).copy_(getattr(hf.layer[0].rel_attn, n))
    ours = load(hf, tmp_path / "same")
    assert "biases" in ours.params and "biases" not in ours.params["layers"]["rel_attn"]
    inputs = batch()
    close(ours(**inputs).last_hidden_state, torch_call(hf, inputs).last_hidden_state, "h")
    xj.save_pretrained(ours, tmp_path / "out")
    back = transformers.XLNetModel.from_pretrained(tmp_path / "out").eval()
    close(torch_call(back, inputs).last_hidden_state, torch_call(hf, inputs).last_hidden_state,
          "round trip")  # fmt: skip


def test_inp_q_query_stream_equals_identity_target_mapping(pairs):
    _, ours = pairs("XLNetLMHeadModel")
    inputs = {**batch(), "perm_mask": perm_inputs()["perm_mask"]}
    eye = np.broadcast_to(np.eye(LEN, dtype=np.float32), (2, LEN, LEN))
    a = ours(**inputs, target_mapping=eye).logits
    b = ours(**inputs, inp_q=np.ones((2, LEN), np.float32)).logits
    close(a, b, "inp_q vs identity target_mapping")


def _kv_case(**cfg_kw):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from xformers_jax.models import xlnet

    cfg = xlnet.XLNetConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_inner=64,
                            dropout=0.0, mem_len=None, **cfg_kw)  # fmt: skip
    model = xlnet.XLNetModel(cfg)
    rng = np.random.RandomState(0)
    b, m, q = 2, 5, 3
    ids = jnp.asarray(rng.randint(0, 50, (b, q)))
    mems = jnp.asarray(rng.standard_normal((cfg.n_layer, b, m, cfg.d_model)), jnp.float32)
    params = nn.meta.unbox(model.init(jax.random.key(0), ids, mems=mems)["params"])
    return cfg, model, params, ids, mems


def test_kv_cache_equals_mems():
    """`XLNetModel(kv_cache=...)` (generation's per-layer K/V at absolute slots, with unused
    slots after them) gives what the same states passed as `mems` give, for both streams
    (`target_mapping` and `inp_q`), and returns the inputs' keys / values."""
    import jax.numpy as jnp

    from xformers_jax.models import xlnet

    cfg, model, params, ids, mems = _kv_case()
    _, b, m, _ = mems.shape
    q, slots = ids.shape[1], 12
    w = params["layers"]["rel_attn"]

    def project(states, name):  # [layers, b, t, d] -> [layers, b, heads, t, d_head]
        return jnp.einsum("lbth,lhnd->lbntd", states, w[name])

    pad = ((0, 0), (0, 0), (0, 0), (0, slots - m), (0, 0))
    keys = jnp.swapaxes(jnp.pad(project(mems, "k"), pad), 3, 4)  # [.., d_head, slots]
    cache = dict(k=keys, v=jnp.pad(project(mems, "v"), pad),
                 r=xlnet.kv_position_keys(params, cfg, slots),
                 visible=(jnp.arange(slots) < m)[None], start=m)  # fmt: skip
    perm = np.zeros((b, q, q), np.float32)
    perm[:, :, -1] = 1.0
    perm[0, 0, 1] = 1.0
    target = np.eye(q, dtype=np.float32)[None, -1:].repeat(b, 0)  # predict the last slot
    inp_q = np.array([[0, 1, 1], [1, 0, 1]], np.float32)
    for kw in (dict(perm_mask=perm, target_mapping=target), dict(perm_mask=perm, inp_q=inp_q)):
        want = model.apply({"params": params}, ids, mems=mems, use_mems=True,
                           return_stacked_mems=True, **kw)  # fmt: skip
        got = model.apply({"params": params}, ids, kv_cache=cache, **kw)
        np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)
        inputs = want.mems[:, :, m:]  # the layers' input states of the new tokens
        np.testing.assert_allclose(jnp.swapaxes(got.mems[0], 3, 4), project(inputs, "k"),
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(got.mems[1], project(inputs, "v"), atol=1e-5)
        # Generation's shortcut: the last input (hidden from every query) only places the query
        # rows, and the output projections come transposed.
        o_t = jnp.transpose(w["o"], (0, 2, 3, 1))
        short = model.apply({"params": params}, ids,
                            kv_cache=dict(cache, content_rows=q - 1, o_t=o_t), **kw)  # fmt: skip
        np.testing.assert_allclose(short.last_hidden_state, want.last_hidden_state, atol=1e-5)
        np.testing.assert_allclose(
            jnp.swapaxes(short.mems[0], 3, 4), project(inputs, "k")[:, :, :, : q - 1], atol=1e-5
        )
        np.testing.assert_allclose(short.mems[1], project(inputs, "v")[:, :, :, : q - 1],
                                   atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="content_rows"):
        model.apply(
            {"params": params},
            ids,
            kv_cache=dict(cache, content_rows=0),
            perm_mask=perm,
            target_mapping=target,
        )


@pytest.mark.parametrize("cfg", [dict(attn_type="uni"), dict(bi_data=True)])
def test_kv_cache_rejects_unsupported_configs(cfg):
    import jax.numpy as jnp

    _, model, params, ids, _ = _kv_case()
    model = model.clone(config=model.config.replace(**cfg))
    cache = dict(k=jnp.zeros((2, 2, 4, 8, 8)), v=jnp.zeros((2, 2, 4, 8, 8)),
                 r=jnp.zeros((2, 4, 17, 8)), visible=jnp.ones((1, 8), bool), start=0)  # fmt: skip
    with pytest.raises(ValueError, match="kv_cache needs attn_type='bi'"):
        model.apply({"params": params}, ids, kv_cache=cache)
