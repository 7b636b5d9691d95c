"""mT5: tiny shapes, abstract full-size presets, and parity with transformers' PyTorch models.

Parity cases build a seeded random-init tiny HF model, save it with `save_pretrained` to a tmp dir,
load it with `xformers_jax.from_pretrained` and compare in float32 at atol 1e-4, on padded batches
(encoder and decoder padding); every position is compared, padding included (T5 masks keys only,
so padded queries are well defined on both sides).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_jax.models import mt5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import TINY_MT5, load_hf, random_hf_model  # noqa: E402
from tests.parity import assert_close as close  # noqa: E402

VOCAB = 100
TINY = TINY_MT5
HEADS = (
    "MT5Model",
    "MT5ForConditionalGeneration",
    "MT5EncoderModel",
    "MT5ForSequenceClassification",
    "MT5ForTokenClassification",
    "MT5ForQuestionAnswering",
)


def make_hf(head, seed=0, **overrides):
    """A seeded random-init tiny transformers mT5 in eval mode, norms perturbed off ones."""
    config = transformers.MT5Config(**{**TINY, "dropout_rate": 0.0, **overrides})
    return random_hf_model(head, config, seed)


def load(hf, tmp_path):
    return load_hf(hf, tmp_path / "hf")


def batch():
    """Encoder `[2, 10]` (row 1 padded after 6, EOS last), decoder `[2, 7]` (row 1 after 4)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(2, VOCAB, size=(2, 10))
    mask = np.ones_like(ids)
    ids[0, 9] = ids[1, 5] = 1  # one EOS per row (the classification head needs it)
    ids[1, 6:], mask[1, 6:] = 0, 0
    dec = rng.randint(2, VOCAB, size=(2, 7))
    dec_mask = np.ones_like(dec)
    dec[1, 4:], dec_mask[1, 4:] = 0, 0
    labels = np.where(dec_mask > 0, dec, -100)
    return ids, mask, dec, dec_mask, labels


# ---- shapes -----------------------------------------------------------------------------------


def test_tiny_shapes_every_head():
    cfg = mt5.MT5Config(**TINY, num_labels=3)
    ids = jnp.ones((2, 5), jnp.int32)
    for head in HEADS:
        module = getattr(mt5, head)(cfg)
        kw = {"input_ids": ids}
        if head in ("MT5Model", "MT5ForConditionalGeneration"):
            kw["decoder_input_ids"] = ids[:, :3]
        # Abstract evaluation: shapes and dtypes without compiling six models on a shared CPU.
        out = jax.eval_shape(lambda r, kw=kw, m=module: m.apply(m.init(r, **kw), **kw),
                             jax.random.key(0))  # fmt: skip
        if head == "MT5ForConditionalGeneration":
            assert out.logits.shape == (2, 3, VOCAB) and out.logits.dtype == jnp.float32
        elif head == "MT5Model":
            assert out.last_hidden_state.shape == (2, 3, 32)
            assert out.encoder_last_hidden_state.shape == (2, 5, 32)
        elif head == "MT5EncoderModel":
            assert out.last_hidden_state.shape == (2, 5, 32)
        elif head == "MT5ForSequenceClassification":
            assert out.logits.shape == (2, 3)
        elif head == "MT5ForTokenClassification":
            assert out.logits.shape == (2, 5, 3)
        else:
            assert out.start_logits.shape == out.end_logits.shape == (2, 5)


def test_bf16_compute_keeps_fp32_logits():
    cfg = mt5.MT5Config(**TINY, dtype="bfloat16")
    module = mt5.MT5ForConditionalGeneration(cfg)
    ids = jnp.ones((2, 5), jnp.int32)

    @jax.jit
    def run(rng):
        v = module.init(rng, input_ids=ids, labels=ids)
        return module.apply(v, input_ids=ids, labels=ids)

    out = run(jax.random.key(0))
    assert out.logits.dtype == jnp.float32 and bool(jnp.isfinite(out.loss))


@pytest.mark.parametrize("preset", ["small", "base", "large", "xl", "xxl"])
def test_full_size_presets_abstract(preset):
    cfg = mt5.MT5Config.from_dict(mt5.PRESETS[preset])
    module = mt5.MT5ForConditionalGeneration(cfg)
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(
        lambda r, i: module.init(r, input_ids=i, decoder_input_ids=i), jax.random.key(0), ids
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    expected = {"small": 300e6, "base": 582e6, "large": 1.23e9, "xl": 3.7e9, "xxl": 12.9e9}
    assert abs(n / expected[preset] - 1) < 0.03, n
    assert cfg.vocab_size == 250112


def test_relative_position_buckets_match_transformers():
    rel = np.arange(-300, 300)[None, :]
    fn = transformers.models.mt5.modeling_mt5.MT5Attention._relative_position_bucket
    for bidirectional in (True, False):
        theirs = fn(torch.tensor(rel), bidirectional, 32, 128).numpy()
        ours = jax.jit(mt5.relative_position_bucket, static_argnums=(1, 2, 3))(
            jnp.asarray(rel), bidirectional, 32, 128
        )
        np.testing.assert_array_equal(np.asarray(ours), theirs)


# ---- HF parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_conditional_generation_parity(tmp_path, tie):
    hf = make_hf("MT5ForConditionalGeneration", tie_word_embeddings=tie)
    model = load(hf, tmp_path)
    ids, mask, dec, dec_mask, labels = batch()
    t = torch.tensor
    with torch.no_grad():
        want = hf(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                  decoder_attention_mask=t(dec_mask))  # fmt: skip
        want_l = hf(input_ids=t(ids), attention_mask=t(mask), labels=t(labels),
                    decoder_attention_mask=t(dec_mask))  # fmt: skip
    got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask)  # fmt: skip
    close(got.logits, want.logits, "logits")
    close(got.encoder_last_hidden_state, want.encoder_last_hidden_state, "encoder")
    got_l = model(
        input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask
    )
    close(got_l.logits, want_l.logits, "logits (labels)")
    close(got_l.loss, want_l.loss, "loss")


@pytest.mark.parametrize("tie", [False, True])
def test_model_and_encoder_parity(tmp_path, tie):
    ids, mask, dec, dec_mask, _ = batch()
    t = torch.tensor
    hf = make_hf("MT5Model", tie_word_embeddings=tie)
    model = load(hf, tmp_path / "model")
    with torch.no_grad():
        want = hf(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                  decoder_attention_mask=t(dec_mask), output_hidden_states=True,
                  output_attentions=True)  # fmt: skip
    got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask, output_hidden_states=True,
                output_attentions=True)  # fmt: skip
    close(got.last_hidden_state, want.last_hidden_state, "decoder")
    close(got.encoder_last_hidden_state, want.encoder_last_hidden_state, "encoder")
    for name in ("decoder_hidden_states", "encoder_hidden_states", "cross_attentions",
                 "decoder_attentions"):  # fmt: skip
        for i, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name), strict=True)):
            close(a, b, f"{name}[{i}]")

    hf_enc = make_hf("MT5EncoderModel", tie_word_embeddings=tie)
    enc = load(hf_enc, tmp_path / "enc")
    with torch.no_grad():
        want = hf_enc(input_ids=t(ids), attention_mask=t(mask))
    close(enc(input_ids=ids, attention_mask=mask).last_hidden_state, want.last_hidden_state, "enc")
    # A full checkpoint loads as the encoder alone (the decoder is dropped, as transformers does).
    enc2 = xj.from_pretrained(tmp_path / "model" / "hf", head="MT5EncoderModel")
    close(
        enc2(input_ids=ids, attention_mask=mask).last_hidden_state,
        hf.encoder(input_ids=t(ids), attention_mask=t(mask)).last_hidden_state,
        "enc of full",
    )


def test_classification_heads_parity(tmp_path):
    ids, mask, dec, dec_mask, _ = batch()
    t = torch.tensor
    hf = make_hf("MT5ForSequenceClassification", num_labels=3)
    model = load(hf, tmp_path / "seq")
    labels = np.array([0, 2])
    with torch.no_grad():
        want = hf(input_ids=t(ids), attention_mask=t(mask), labels=t(labels))
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    close(got.logits, want.logits, "seq logits")
    close(got.loss, want.loss, "seq loss")

    hf = make_hf("MT5ForTokenClassification", num_labels=3)
    model = load(hf, tmp_path / "tok")
    labels = np.where(mask > 0, ids % 3, -100)
    with torch.no_grad():
        want = hf(input_ids=t(ids), attention_mask=t(mask), labels=t(labels))
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    close(got.logits, want.logits, "tok logits")
    close(got.loss, want.loss, "tok loss")

    hf = make_hf("MT5ForQuestionAnswering")
    model = load(hf, tmp_path / "qa")
    sp, ep = np.array([1, 3]), np.array([4, 12])  # 12 is out of range: ignored
    with torch.no_grad():
        want = hf(input_ids=t(ids), attention_mask=t(mask), start_positions=t(sp),
                  end_positions=t(ep))  # fmt: skip
    got = model(input_ids=ids, attention_mask=mask, start_positions=sp, end_positions=ep)
    close(got.start_logits, want.start_logits, "start")
    close(got.end_logits, want.end_logits, "end")
    close(got.loss, want.loss, "qa loss")


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip(tmp_path, tie):
    hf = make_hf("MT5ForConditionalGeneration", tie_word_embeddings=tie)
    model = load(hf, tmp_path)
    xj.save_pretrained(model, tmp_path / "ours")
    back = transformers.MT5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, mask, dec, dec_mask, _ = batch()
    t = torch.tensor
    with torch.no_grad():
        a = hf(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec)).logits
        b = back(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec)).logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    again = xj.from_pretrained(tmp_path / "ours")
    close(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, a, "reload")


def test_decoder_depth_differs(tmp_path):
    """`num_decoder_layers != num_layers`: two scan lengths, loaded, run and saved back."""
    hf = make_hf("MT5ForConditionalGeneration", num_decoder_layers=3)
    model = load(hf, tmp_path)
    ids, mask, dec, dec_mask, _ = batch()
    t = torch.tensor
    with torch.no_grad():
        want = hf(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec)).logits
    close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want, "logits")
    xj.save_pretrained(model, tmp_path / "ours")
    back = transformers.MT5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert back.config.num_decoder_layers == 3
    with torch.no_grad():
        again = back(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec)).logits
    np.testing.assert_array_equal(again.numpy(), want.numpy())
