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
