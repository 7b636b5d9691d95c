"""YOSO: HF parity (expectation mode), the attention's custom backward, sampled-mode statistics.

Parity: each head is built once (seeded random-init tiny transformers model with a depthwise conv,
two token types), saved with `save_pretrained`, loaded with `xformers_jax.from_pretrained`, and
compared in float32 at atol 1e-4 on an unpadded batch (default model) and on a padded batch with
`hf_compat=True` (transformers attends to padding). Sampled mode (transformers needs CUDA there) is
checked against our expectation mode: the error falls like `1 / sqrt(num_hash)`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import ATOL, TINY_XLMR, assert_close, random_hf_model  # noqa: E402
from xformers_jax.models import yoso  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, LENGTH = 100, 32, 2, 4, 10
HEADS_HF = (
    "YosoModel",
    "YosoForMaskedLM",
    "YosoForSequenceClassification",
    "YosoForMultipleChoice",
    "YosoForTokenClassification",
    "YosoForQuestionAnswering",
)


def hf_config(**kw):
    return transformers.YosoConfig(
        **TINY_XLMR, type_vocab_size=2, conv_window=3, hash_code_len=6, num_labels=3, **kw
    )


def make_hf(name, seed=0):
    return random_hf_model(name, hf_config(), seed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """head name -> (HF model, its saved dir); built once for the module."""
    out = {}
    for i, name in enumerate(HEADS_HF):
        hf = make_hf(name, seed=i)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        out[name] = (hf, str(path))
    return out


def batch(name, padded):
    """HF inputs (numpy) for head `name`; row 1 padded after 6 tokens when `padded`."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, size=(2, LENGTH))
    mask = np.ones_like(ids)
    if padded:
        ids[1, 6:], mask[1, 6:] = 1, 0
    types = rng.randint(0, 2, size=ids.shape)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if name == "YosoForMultipleChoice":  # [batch=1, choices=2, length]
        inputs = {k: v[None] for k, v in inputs.items()}
        inputs["labels"] = np.array([1])
    elif name == "YosoForMaskedLM":
        inputs["labels"] = np.where(rng.rand(2, LENGTH) < 0.5, ids, -100)
    elif name == "YosoForSequenceClassification":
        inputs["labels"] = np.array([0, 2])
    elif name == "YosoForTokenClassification":
        inputs["labels"] = rng.randint(0, 3, size=(2, LENGTH))
    elif name == "YosoForQuestionAnswering":
        inputs.update(start_positions=np.array([1, 3]), end_positions=np.array([4, 12]))
    return inputs


FIELDS = ("last_hidden_state", "logits", "loss", "start_logits", "end_logits")


def compare(ours, theirs, what):
    n = 0
    for field in FIELDS:
        b = getattr(theirs, field, None)
        if b is None:
            continue
        assert_close(getattr(ours, field), b, f"{what}.{field}")
        n += 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states, strict=True)):
        assert_close(a, b, f"{what} hs[{i}]")
    for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions, strict=True)):
        assert_close(a, b, f"{what} att[{i}]")
    assert n >= 1


def run_hf(hf, inputs):
    with torch.no_grad():
        return hf(**{k: torch.tensor(v) for k, v in inputs.items()},
                  output_hidden_states=True, output_attentions=True)  # fmt: skip


@pytest.mark.parametrize("name", HEADS_HF)
def test_head_parity_unpadded_and_hf_compat_padded(checkpoints, name):
    hf, path = checkpoints[name]
    model = xj.from_pretrained(path)
    assert model.architecture == name
    inputs = batch(name, padded=False)
    compare(model(**inputs, output_hidden_states=True, output_attentions=True),
            run_hf(hf, inputs), f"{name} unpadded")  # fmt: skip

    padded = batch(name, padded=True)
    theirs = run_hf(hf, padded)
    compat = xj.from_pretrained(path, hf_compat=True)
    compare(compat(**padded, output_hidden_states=True, output_attentions=True),
            theirs, f"{name} padded hf_compat")  # fmt: skip
    if name == "YosoModel":
        # The default honours the mask, so it must differ from transformers on padded rows.
        ours = model(**padded).last_hidden_state
        assert np.abs(np.asarray(ours) - theirs.last_hidden_state.numpy()).max() > 1e-2


@pytest.mark.parametrize("name", ["YosoForMaskedLM", "YosoForMultipleChoice"])
def test_save_round_trip_loads_in_transformers(checkpoints, name, tmp_path):
    hf, path = checkpoints[name]
    model = xj.from_pretrained(path)
    xj.save_pretrained(model, tmp_path)
    back = getattr(transformers, name).from_pretrained(tmp_path).eval()
    inputs = batch(name, padded=False)
    a, b = run_hf(hf, inputs), run_hf(back, inputs)
    np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), atol=1e-6, rtol=0)


def test_attention_gradients_equal_transformers_custom_backward(checkpoints):
    """Grads of the input and of q/k/v/conv weights through YOSO's surrogate backward."""
    hf, path = checkpoints["YosoModel"]
    model = xj.from_pretrained(path)
    attn_hf = hf.encoder.layer[0].attention.self
    rng = np.random.RandomState(3)
    x = rng.randn(2, LENGTH, HIDDEN).astype(np.float32)
    w = rng.randn(2, LENGTH, HIDDEN).astype(np.float32)
    mask = np.ones((2, LENGTH), np.float32)

    xt = torch.tensor(x, requires_grad=True)
    attn_hf.zero_grad()
    out = attn_hf(xt, attention_mask=torch.tensor(mask))[0]
    (out * torch.tensor(w)).sum().backward()

    cfg = model.config
    params = jax.tree.map(lambda a: a[0], model.params["layers"]["attention"])
    module = yoso.SelfAttention(cfg)

    def loss(p, x):
        ctx = module.apply({"params": p}, x, jnp.asarray(mask), 0)
        return jnp.sum(ctx.reshape(2, LENGTH, HIDDEN) * w)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    np.testing.assert_allclose(gx, xt.grad.numpy(), atol=ATOL, rtol=0, err_msg="d input")
    for name in ("query", "key", "value"):
        theirs = getattr(attn_hf, name).weight.grad.numpy().T.reshape(HIDDEN, HEADS, -1)
        np.testing.assert_allclose(gp[name]["kernel"], theirs, atol=ATOL, rtol=0, err_msg=name)
    theirs = np.transpose(attn_hf.conv.weight.grad.numpy(), (2, 3, 1, 0))
    np.testing.assert_allclose(gp["conv"], theirs, atol=ATOL, rtol=0, err_msg="conv")


# ------------------------------------------------------------------------------------------------
# Sampled (LSH) mode: no transformers reference on CPU; checked against our expectation mode.
# ------------------------------------------------------------------------------------------------

SAMPLED = yoso.YosoConfig(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=64, max_position_embeddings=64, hash_code_len=4, use_expectation=False,
    conv_window=3,
)  # fmt: skip


def _attention(cfg, length=64, seed=0):
    module = yoso.SelfAttention(cfg)
    x = jax.random.normal(jax.random.key(seed), (2, length, HIDDEN))
    mask = jnp.ones((2, length))
    # Jitted: an eager init would run the sampled attention op by op.
    init = jax.jit(lambda x, mask: module.init(jax.random.key(1), x, mask, 0))
    params = init(x, mask)
    return module, params, x, mask


def test_sampled_mode_converges_to_expectation_like_inverse_sqrt():
    """RMS error vs expectation mode over 8 seeds; each 4x num_hash should halve it."""
    exp_cfg = SAMPLED.replace(use_expectation=True, conv_window=None)
    module, params, x, mask = _attention(exp_cfg)
    exact = module.apply(params, x, mask, 0)
    errors = []
    for num_hash in (4, 16, 64, 256):
        sampled = yoso.SelfAttention(exp_cfg.replace(use_expectation=False, num_hash=num_hash))
        run = jax.jit(lambda k, m=sampled: m.apply(params, x, mask, 0, rngs={"lsh": k}))
        outs = jnp.stack([run(jax.random.key(s)) for s in range(8)])
        errors.append(float(jnp.sqrt(jnp.mean(jnp.square(outs - exact)))))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    print("num_hash 4/16/64/256 rms error", errors, "ratios", ratios)
    for r in ratios:
        assert 1.5 < r < 2.7, (errors, ratios)


@pytest.mark.parametrize("use_expectation", [False, True])
def test_padding_never_changes_real_positions(use_expectation):
    cfg = SAMPLED.replace(use_expectation=use_expectation)
    module = yoso.YosoForMaskedLM(cfg)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    params = jax.jit(module.init)(jax.random.key(0), ids[:, :2])
    run = jax.jit(
        lambda ids, mask: module.apply(params, ids, mask, rngs={"lsh": jax.random.key(5)})
    )
    a = run(ids, mask).logits
    garbage = np.where(mask == 1, ids, rng.randint(3, VOCAB, size=ids.shape))
    b = run(garbage, mask).logits
    c = run(ids[:, :6], mask[:, :6]).logits  # shorter padding: row 1 is the same sequence
    np.testing.assert_allclose(a[1, :6], b[1, :6], atol=1e-5, rtol=0)
    np.testing.assert_allclose(a[1, :6], c[1, :6], atol=1e-5, rtol=0)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=0)


def test_same_key_same_output_and_fallback_key():
    module, params, x, mask = _attention(SAMPLED.replace(num_hash=8))
    apply = jax.jit(lambda k: module.apply(params, x, mask, 0, rngs={"lsh": k}))
    a, b, c = apply(jax.random.key(1)), apply(jax.random.key(1)), apply(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    # Deterministic eval without an lsh rng: a fixed key, so still reproducible.
    fallback = jax.jit(lambda x: module.apply(params, x, mask, 0))
    np.testing.assert_array_equal(fallback(x), fallback(x))


def test_layers_hash_independently_and_sampled_grads_are_finite():
    cfg = SAMPLED.replace(num_hash=8)
    module = yoso.YosoForMaskedLM(cfg)
    ids = np.random.RandomState(0).randint(3, VOCAB, size=(2, 16))
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), ids[:, :2])["params"])

    def loss(p):
        rngs = {"lsh": jax.random.key(1), "dropout": jax.random.key(2)}
        return module.apply({"params": p}, ids, labels=ids, deterministic=False, rngs=rngs).loss

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    bad = [jax.tree_util.keystr(p) for p, g in flat if not bool(jnp.all(jnp.isfinite(g)))]
    assert not bad, bad
    q = grads["model"]["layers"]["attention"]["query"]["kernel"]
    assert float(jnp.abs(q).max()) > 0


def test_pallas_impl_matches_xla_impl_in_interpret_mode():
    cfg = SAMPLED.replace(num_hash=8)
    module, params, x, mask = _attention(cfg, length=32)
    key = {"lsh": jax.random.key(3)}
    a = module.apply(params, x, mask, 0, rngs=key)
    pallas = yoso.SelfAttention(cfg.replace(attention_impl="pallas"))
    b = pallas.apply(params, x, mask, 0, rngs=key)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_base_preset_eval_shape():
    cfg = yoso.YosoConfig.from_dict(yoso.PRESETS["base"])
    module = yoso.YosoForMaskedLM(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4096), jnp.int32))
    params = shapes["params"]
    table = params["model"]["embeddings"]["position_embeddings"]["embedding"]
    assert table.value.shape == (4098, 768)
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params)))
    assert 120e6 < n < 135e6, n


def test_config_round_trip_and_errors():
    cfg = yoso.YosoConfig.from_dict(yoso.PRESETS["tiny"])
    hf = cfg.to_hf_config()
    assert "attention_impl" not in hf and "hf_compat" not in hf
    assert yoso.YosoConfig.from_hf_config(hf) == cfg
    assert yoso.YosoConfig.from_hf_config(hf_config().to_dict()).conv_window == 3
    with pytest.raises(ValueError, match="attention_impl"):
        cfg.replace(attention_impl="cuda")
    with pytest.raises(ValueError, match="conv_window"):
        cfg.replace(conv_window=4)
