"""transformers' API beyond the plain forward pass, against transformers itself.

Generation without an EOS token, tied encoder-decoder mT5 checkpoints, XLM-R(-XL) decoders with
cross-attention, forward-level `past_key_values`, output flags from config.json, head masks,
`inputs_embeds` on every head, 4D attention masks and flattened token labels. Each case builds a
seeded random-init tiny transformers model, saves it to a temp dir, loads it with
`xformers_jax.from_pretrained` and compares in float32 at atol 1e-4 (generated ids exactly).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.parity import (  # noqa: E402
    TINY_MT5,
    TINY_XLMR,
    assert_close,
    assert_tree_close,
    load_hf,
    random_hf_model,
)

XLMR = dict(TINY_XLMR, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MT5 = dict(TINY_MT5, dropout_rate=0.0)
XLNET = dict(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0,
             pad_token_id=5, bos_token_id=1, initializer_range=0.5)  # fmt: skip
XLMR_VARIANTS = {
    "xl": (transformers.XLMRobertaXLConfig, "XLMRobertaXL"),
    "xlmr": (transformers.XLMRobertaConfig, "XLMRoberta"),
}


def t(x):
    return torch.tensor(np.asarray(x))


def ids(batch=2, length=6, seed=0, low=3, high=100):
    return np.random.RandomState(seed).randint(low, high, size=(batch, length))


def hf_run(hf, **kw):
    with torch.no_grad():
        return hf(**{k: t(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()})


# ==================================================================================================
# Generation without an EOS token.
# ==================================================================================================


def _no_eos_model(family, tmp_path):
    if family in XLMR_VARIANTS:
        config_cls, prefix = XLMR_VARIANTS[family]
        config = config_cls(**XLMR, is_decoder=True, eos_token_id=None)
        hf = random_hf_model(f"{prefix}ForCausalLM", config, perturb=False)
    elif family == "xlnet":
        config = transformers.XLNetConfig(**XLNET, eos_token_id=None)
        hf = random_hf_model("XLNetLMHeadModel", config, perturb=False)
    else:
        config = transformers.MT5Config(**MT5, eos_token_id=None)
        hf = random_hf_model("MT5ForConditionalGeneration", config, perturb=False)
    return hf, load_hf(hf, tmp_path / family)


@pytest.mark.parametrize("family", ["xl", "xlmr", "xlnet", "mt5"])
@pytest.mark.parametrize("kw", [dict(max_new_tokens=7), dict(max_length=9, num_beams=3)])
def test_generate_without_eos(family, kw, tmp_path):
    hf, ours = _no_eos_model(family, tmp_path)
    assert hf.generation_config.eos_token_id is None
    prompt = ids(2, 4)
    with torch.no_grad():
        want = hf.generate(t(prompt), do_sample=False, **kw).numpy()
    got = ours.generate(prompt, **kw)
    prompt_len = 1 if family == "mt5" else prompt.shape[1]
    n = prompt_len + kw["max_new_tokens"] if "max_new_tokens" in kw else kw["max_length"]
    assert got.shape == (2, n)
    np.testing.assert_array_equal(got, want)


# ==================================================================================================
# Tied encoder-decoder mT5 checkpoints.
# ==================================================================================================


def _seq2seq_inputs(head):
    enc, dec = ids(2, 7, seed=1, low=2), ids(2, 5, seed=2, low=2)
    enc[:, -1] = 1  # an EOS per row (sequence classification pools there)
    kw = dict(input_ids=enc, attention_mask=np.ones_like(enc))
    if head in ("MT5Model", "MT5ForConditionalGeneration"):
        kw["decoder_input_ids"] = dec
    return kw


def _first_output(out):
    return out.logits if getattr(out, "logits", None) is not None else (
        out.start_logits if getattr(out, "start_logits", None) is not None
        else out.last_hidden_state
    )  # fmt: skip


@pytest.mark.parametrize(
    "head", ["MT5ForConditionalGeneration", "MT5Model", "MT5ForSequenceClassification"]
)
def test_tied_encoder_decoder_load_and_save(head, tmp_path):
    from safetensors.numpy import load_file

    hf = random_hf_model(head, transformers.MT5Config(**MT5, tie_encoder_decoder=True))
    ours = load_hf(hf, tmp_path / "hf")
    kw = _seq2seq_inputs(head)
    assert_close(_first_output(ours(**kw)), _first_output(hf_run(hf, **kw)), head)
    ours.save_pretrained(tmp_path / "ours")
    theirs = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert set(load_file(str(tmp_path / "ours" / "model.safetensors"))) == theirs
    back = getattr(transformers, head).from_pretrained(tmp_path / "ours").eval()
    assert back.config.tie_encoder_decoder
    assert_close(_first_output(ours(**kw)), _first_output(hf_run(back, **kw)), f"{head} back")


def test_tied_encoder_decoder_trained_apart_saves_untied(tmp_path):
    import jax

    hf = random_hf_model("MT5Model", transformers.MT5Config(**MT5, tie_encoder_decoder=True))
    ours = load_hf(hf, tmp_path / "hf")
    params = jax.tree.map(lambda x: x, ours.params)
    q = params["encoder"]["layers"]["self_attention"]["q"]["kernel"]
    params["encoder"]["layers"]["self_attention"]["q"]["kernel"] = q * 1.5
    ours.params = params
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.MT5Model.from_pretrained(tmp_path / "ours").eval()
    assert not back.config.tie_encoder_decoder
    kw = _seq2seq_inputs("MT5Model")
    assert_close(ours(**kw).last_hidden_state, hf_run(back, **kw).last_hidden_state, "untied")


# ==================================================================================================
# XLM-R(-XL) decoders with cross-attention; forward-level caches.
# ==================================================================================================


def _decoder(variant, tmp_path, head="ForCausalLM", cross=True, **extra):
    config_cls, prefix = XLMR_VARIANTS[variant]
    config = config_cls(**XLMR, is_decoder=True, add_cross_attention=cross, **extra)
    hf = random_hf_model(f"{prefix}{head}", config)
    return hf, load_hf(hf, tmp_path / f"{variant}{head}")


def _encoder_states(batch=2, n=5, seed=1):
    enc = np.random.RandomState(seed).randn(batch, n, XLMR["hidden_size"]).astype(np.float32)
    mask = np.ones((batch, n), np.int64)
    mask[1, 3:] = 0
    return enc, mask


def _legacy(cache):
    """transformers' cache as per-layer tuples of the tensors it holds (no empty cross entries)."""
    cache = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
    return tuple(tuple(x for x in layer if x is not None) for layer in cache)


@pytest.mark.parametrize("variant", sorted(XLMR_VARIANTS))
@pytest.mark.parametrize("head", ["ForCausalLM", "Model"])
def test_cross_attention_forward_and_save(variant, head, tmp_path):
    hf, ours = _decoder(variant, tmp_path, head)
    enc, enc_mask = _encoder_states()
    kw = dict(input_ids=ids(2, 6), encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    want = hf_run(hf, **kw, output_attentions=True, output_hidden_states=True)
    got = ours(**kw, output_attentions=True, output_hidden_states=True)
    field = "logits" if head == "ForCausalLM" else "last_hidden_state"
    assert_close(getattr(got, field), getattr(want, field), field)
    assert_tree_close(got.attentions, want.attentions, "attentions")
    assert_tree_close(got.cross_attentions, want.cross_attentions, "cross_attentions")
    assert_tree_close(got.hidden_states, want.hidden_states, "hidden_states")
    ours.save_pretrained(tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    assert back.config.add_cross_attention and back.config.is_decoder
    assert_close(getattr(got, field), getattr(hf_run(back, **kw), field), f"{field} back")


@pytest.mark.parametrize("variant", sorted(XLMR_VARIANTS))
@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3)])
def test_cross_attention_generate(variant, kw, tmp_path):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    # initializer_range 0.2: at 0.02 the tiny model's scores come within float noise.
    hf, ours = _decoder(variant, tmp_path, initializer_range=0.2, pad_token_id=1, eos_token_id=2)
    enc, enc_mask = _encoder_states()
    prompt = ids(2, 3)
    # A decoder-only generate in transformers makes one self-attention cache that the
    # cross-attention appends the encoder's K/V to (wrong tokens, or a shape error with an
    # encoder_attention_mask); an EncoderDecoderCache, as EncoderDecoderModel makes, is right.
    with torch.no_grad():
        want = hf.generate(
            t(prompt), attention_mask=t(np.ones_like(prompt)), encoder_hidden_states=t(enc),
            encoder_attention_mask=t(enc_mask), max_new_tokens=6, do_sample=False,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()), **kw,
        ).numpy()  # fmt: skip
    got = ours.generate(prompt, max_new_tokens=6, encoder_hidden_states=enc,
                        encoder_attention_mask=enc_mask, **kw)  # fmt: skip
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", sorted(XLMR_VARIANTS))
@pytest.mark.parametrize("cross", [False, True])
def test_causal_lm_past_key_values(variant, cross, tmp_path):
    hf, ours = _decoder(variant, tmp_path, cross=cross)
    enc_kw = {}
    if cross:
        enc, enc_mask = _encoder_states()
        enc_kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    full = ids(2, 7)
    full_mask = np.ones_like(full)
    full_mask[0, 0] = 0  # a padded key: the step's mask covers past and new positions
    first = ours(input_ids=full[:, :5], attention_mask=full_mask[:, :5], use_cache=True, **enc_kw)
    want_first = hf_run(hf, input_ids=full[:, :5], attention_mask=full_mask[:, :5],
                        use_cache=True, **enc_kw)  # fmt: skip
    legacy = _legacy(want_first.past_key_values)
    assert len(first.past_key_values) == len(legacy) == XLMR["num_hidden_layers"]
    assert_tree_close(first.past_key_values, legacy, "past_key_values")
    past = first.past_key_values
    step = ours(input_ids=full[:, 5:], attention_mask=full_mask, past_key_values=past,
                use_cache=True, **enc_kw)  # fmt: skip
    whole = ours(input_ids=full, attention_mask=full_mask, **enc_kw)
    assert_close(step.logits, whole.logits[:, 5:], "cached step vs full forward")
    # transformers' own Cache object is taken as well (converted at the call).
    theirs = ours(input_ids=full[:, 5:], attention_mask=full_mask,
                  past_key_values=want_first.past_key_values, **enc_kw)  # fmt: skip
    assert_close(theirs.logits, whole.logits[:, 5:], "step from transformers' cache")
    want = hf_run(hf, input_ids=full, attention_mask=full_mask, **enc_kw)
    assert_close(step.logits, want.logits[:, 5:], "cached step vs transformers")
    assert step.past_key_values[0][0].shape == (2, XLMR["num_attention_heads"], 7, 8)


@pytest.mark.parametrize("head", ["MT5Model", "MT5ForConditionalGeneration"])
def test_mt5_past_key_values(head, tmp_path):
    hf = random_hf_model(head, transformers.MT5Config(**MT5))
    ours = load_hf(hf, tmp_path / "hf")
    kw = _seq2seq_inputs(head)
    kw["attention_mask"][1, 5:] = 0
    dec = kw.pop("decoder_input_ids")
    dec_mask = np.ones_like(dec)
    field = "logits" if head == "MT5ForConditionalGeneration" else "last_hidden_state"
    whole = ours(**kw, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    first = ours(**kw, decoder_input_ids=dec[:, :3], use_cache=True)
    want_first = hf_run(hf, **kw, decoder_input_ids=dec[:, :3], use_cache=True)
    assert_tree_close(first.past_key_values, _legacy(want_first.past_key_values), "past")
    encoder_outputs = (first.encoder_last_hidden_state,)
    step = ours(attention_mask=kw["attention_mask"], decoder_input_ids=dec[:, 3:],
                decoder_attention_mask=dec_mask, encoder_outputs=encoder_outputs,
                past_key_values=first.past_key_values, use_cache=True)  # fmt: skip
    assert_close(getattr(step, field), getattr(whole, field)[:, 3:], "cached step vs full")
    want = hf_run(hf, **kw, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert_close(getattr(step, field), getattr(want, field)[:, 3:], "cached step vs transformers")
    assert step.past_key_values[0][0].shape == (2, MT5["num_heads"], 5, MT5["d_kv"])
    # One token at a time, as generate feeds it, from transformers' own cache object.
    past = want_first.past_key_values
    theirs = ours(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
                  decoder_input_ids=dec[:, 3:4], past_key_values=past)  # fmt: skip
    assert_close(getattr(theirs, field), getattr(whole, field)[:, 3:4], "from transformers' cache")


# ==================================================================================================
# Output flags from config.json; head masks.
# ==================================================================================================


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_output_flags_from_config(family, tmp_path):
    flags = dict(output_hidden_states=True, output_attentions=True)
    if family == "xlmr":
        hf = random_hf_model(
            "XLMRobertaForMaskedLM", transformers.XLMRobertaConfig(**XLMR, **flags)
        )
        kw = dict(input_ids=ids(2, 6))
        fields = ("hidden_states", "attentions")
    else:
        hf = random_hf_model("MT5ForConditionalGeneration", transformers.MT5Config(**MT5, **flags))
        kw = _seq2seq_inputs("MT5ForConditionalGeneration")
        fields = ("decoder_hidden_states", "decoder_attentions", "cross_attentions",
                  "encoder_hidden_states", "encoder_attentions")  # fmt: skip
    ours = load_hf(hf, tmp_path / "hf")
    got, want = ours(**kw), hf_run(hf, **kw)
    for field in fields:
        assert_tree_close(getattr(got, field), getattr(want, field), field)
    off = ours(**kw, output_hidden_states=False, output_attentions=False)
    want_off = hf_run(hf, **kw, output_hidden_states=False, output_attentions=False)
    for field in fields:
        assert getattr(off, field) is None and getattr(want_off, field) is None, field
    ours.save_pretrained(tmp_path / "ours")
    assert type(hf).from_pretrained(tmp_path / "ours").config.output_hidden_states


def _head_masks(n_heads=4, n_layers=2):
    m = np.ones((n_layers, n_heads), np.float32)
    m[0, 1] = m[1, 3] = 0.0
    return m


MT5_HEADS = ("MT5Model", "MT5ForConditionalGeneration", "MT5EncoderModel",
             "MT5ForSequenceClassification", "MT5ForTokenClassification",
             "MT5ForQuestionAnswering")  # fmt: skip


@pytest.mark.parametrize("head", MT5_HEADS)
def test_mt5_head_masks(head, tmp_path):
    hf = random_hf_model(head, transformers.MT5Config(**MT5))
    ours = load_hf(hf, tmp_path / "hf")
    kw = _seq2seq_inputs(head)
    kw["head_mask"] = _head_masks()
    if head not in ("MT5EncoderModel", "MT5ForTokenClassification"):
        kw["decoder_head_mask"] = _head_masks()[::-1].copy()
        kw["cross_attn_head_mask"] = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    got = ours(**kw, output_attentions=True)
    want = hf_run(hf, **kw, output_attentions=True)
    assert_close(_first_output(got), _first_output(want), head)
    for field in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        if getattr(want, field, None) is not None:
            assert_tree_close(getattr(got, field), getattr(want, field), field)


@pytest.mark.parametrize("head", ["XLNetModel", "XLNetLMHeadModel"])
def test_xlnet_head_mask_attentions(head, tmp_path):
    hf = random_hf_model(head, transformers.XLNetConfig(**XLNET))
    ours = load_hf(hf, tmp_path / "hf")
    kw = dict(input_ids=ids(2, 6), head_mask=_head_masks())
    got = ours(**kw, output_attentions=True, use_mems=False)
    want = hf_run(hf, **kw, output_attentions=True, use_mems=False)
    assert_close(got.last_hidden_state if head == "XLNetModel" else got.logits,
                 want[0], head)  # fmt: skip
    assert_tree_close(got.attentions, want.attentions, "attentions")
    assert float(np.abs(np.asarray(got.attentions[0])[:, 1]).max()) == 0.0


# ==================================================================================================
# inputs_embeds everywhere; 4D masks; flattened token labels.
# ==================================================================================================

# transformers' forward arguments we do not take: return_dict (we return dataclasses), and the
# output flags / cache positions that have other spellings here.
_NOT_ARGS = {"self", "return_dict", "kwargs", "cache_position", "logits_to_keep",
             "interpolate_pos_encoding"}  # fmt: skip


def test_every_head_takes_transformers_arguments():
    import inspect

    from xformers_jax.models import FAMILIES

    checked = 0
    for family in FAMILIES.values():
        for arch, cls in sorted(family.heads.items()):
            theirs = getattr(transformers, arch, None)
            if theirs is None:
                continue
            want = set(inspect.signature(theirs.forward).parameters) - _NOT_ARGS
            have = set(inspect.signature(family.head_class(cls).__call__).parameters)
            assert want <= have, f"{arch} lacks {sorted(want - have)}"
            checked += 1
    assert checked >= 35


@pytest.mark.parametrize("head", ["MT5ForQuestionAnswering", "MT5ForConditionalGeneration"])
def test_mt5_inputs_embeds(head, tmp_path):
    hf = random_hf_model(head, transformers.MT5Config(**MT5))
    ours = load_hf(hf, tmp_path / "hf")
    table = hf.get_input_embeddings().weight.detach().numpy()
    enc, dec = ids(2, 7, seed=1, low=2), ids(2, 5, seed=2, low=2)
    kw = dict(inputs_embeds=table[enc], decoder_inputs_embeds=table[dec])
    assert_close(_first_output(ours(**kw)), _first_output(hf_run(hf, **kw)), head)


def test_xlmr_causal_lm_inputs_embeds(tmp_path):
    hf, ours = _decoder("xl", tmp_path, cross=False)
    table = hf.get_input_embeddings().weight.detach().numpy()
    kw = dict(inputs_embeds=table[ids(2, 6)])
    assert_close(ours(**kw).logits, hf_run(hf, **kw).logits, "logits")


@pytest.mark.parametrize("variant", sorted(XLMR_VARIANTS))
def test_xlmr_3d_and_4d_masks(variant, tmp_path):
    config_cls, prefix = XLMR_VARIANTS[variant]
    hf = random_hf_model(f"{prefix}Model", config_cls(**XLMR))
    ours = load_hf(hf, tmp_path / "hf")
    x = ids(2, 6)
    mask = np.ones((2, 6, 6), np.int64)
    mask[0, :, 4:] = 0
    mask[1] = np.tril(mask[1])  # a per-query pattern a 2D mask cannot express
    want = hf_run(hf, input_ids=x, attention_mask=mask).last_hidden_state
    assert_close(ours(input_ids=x, attention_mask=mask).last_hidden_state, want, "3D mask")
    assert_close(ours(input_ids=x, attention_mask=mask[:, None]).last_hidden_state, want, "4D")
    additive = (1.0 - mask[:, None]) * np.finfo(np.float32).min
    got = ours(input_ids=x, attention_mask=additive.astype(np.float32)).last_hidden_state
    assert_close(got, want, "4D additive")
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 4, 6, 6\)"):
        ours(input_ids=x, attention_mask=np.ones((2, 4, 6, 6)))


def test_mt5_4d_masks(tmp_path):
    hf = random_hf_model("MT5Model", transformers.MT5Config(**MT5))
    ours = load_hf(hf, tmp_path / "hf")
    kw = _seq2seq_inputs("MT5Model")
    kw["attention_mask"][1, 5:] = 0
    dec_mask = np.ones((2, 5), np.int64)
    dec_mask[1, 3:] = 0
    want = hf_run(hf, **kw, decoder_attention_mask=dec_mask).last_hidden_state
    # transformers takes a 4D decoder mask in additive form (causal part included).
    causal = np.tril(np.ones((5, 5)))[None, None] * dec_mask[:, None, None, :]
    additive = ((1.0 - causal) * np.finfo(np.float32).min).astype(np.float32)
    assert_close(hf_run(hf, **kw, decoder_attention_mask=additive).last_hidden_state, want, "hf")
    assert_close(ours(**kw, decoder_attention_mask=additive).last_hidden_state, want, "additive")
    assert_close(ours(**kw, decoder_attention_mask=causal).last_hidden_state, want, "0/1 4D")
    # An encoder mask in 4D (transformers fails on it) means the same as its 2D form.
    enc4d = np.broadcast_to(kw["attention_mask"][:, None, None, :], (2, 1, 7, 7))
    got = ours(**{**kw, "attention_mask": enc4d}, decoder_attention_mask=dec_mask)
    assert_close(got.last_hidden_state, want, "encoder 4D")
    with pytest.raises(ValueError, match=r"decoder_attention_mask of shape \(2, 3\)"):
        ours(**kw, decoder_attention_mask=np.ones((2, 3)))


def test_masks_refused_where_unsupported(tmp_path):
    hf = random_hf_model("XLNetModel", transformers.XLNetConfig(**XLNET))
    ours = load_hf(hf, tmp_path / "xlnet")
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 1, 6, 6\)"):
        ours(input_ids=ids(2, 6), attention_mask=np.ones((2, 1, 6, 6)))
    hf = random_hf_model("YosoModel", transformers.YosoConfig(**XLMR))
    ours = load_hf(hf, tmp_path / "yoso")
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 6, 6\)"):
        ours(input_ids=ids(2, 6), attention_mask=np.ones((2, 6, 6)))


@pytest.mark.parametrize("arch", ["XLMRobertaXLForTokenClassification", "MT5ForTokenClassification",
                                  "XLNetForTokenClassification"])  # fmt: skip
def test_flattened_token_labels(arch, tmp_path):
    if arch.startswith("MT5"):
        config = transformers.MT5Config(**MT5, num_labels=3)
    elif arch.startswith("XLNet"):
        config = transformers.XLNetConfig(**XLNET, num_labels=3)
    else:
        config = transformers.XLMRobertaXLConfig(**XLMR, num_labels=3)
    hf = random_hf_model(arch, config)
    ours = load_hf(hf, tmp_path / "hf")
    x = ids(2, 6)
    mask = np.ones_like(x)
    mask[1, 4:] = 0
    labels = np.random.RandomState(3).randint(0, 3, size=(2, 6))
    want = hf_run(hf, input_ids=x, attention_mask=mask, labels=labels.reshape(-1)).loss
    got = ours(input_ids=x, attention_mask=mask, labels=labels.reshape(-1)).loss
    assert_close(got, want, "loss")
    assert_close(ours(input_ids=x, attention_mask=mask, labels=labels).loss, want, "2D labels")
    with pytest.raises(ValueError, match=r"token labels of shape \(2, 5\)"):
        ours(input_ids=x, attention_mask=mask, labels=labels[:, :5])
