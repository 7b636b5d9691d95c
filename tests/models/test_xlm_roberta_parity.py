"""XLM-R(-XL) parity with transformers' PyTorch models on random-init tiny checkpoints.

Each case builds a tiny HF model (seeded), saves it with `save_pretrained` to a tmp dir, loads it
with `xformers_jax.from_pretrained` and compares outputs in float32 at atol 1e-4. Batches are
padded (rows of different lengths with an attention mask); XLM-R's outputs at padding positions
are well defined (padding keeps position `padding_idx`, attention only masks keys), so every
position is compared, padding included.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import TINY_XLMR, assert_close, random_hf_model, save_hf  # noqa: E402

MODEL_TYPES = ("xlm-roberta-xl", "xlm-roberta")
POSITION_TYPES = ("absolute", "relative_key", "relative_key_query")
VOCAB, HIDDEN, LAYERS, HEADS = 100, 32, 2, 4

# (model_type, head) -> transformers (config class, model class)
_HF = {
    ("xlm-roberta-xl", "mlm"): ("XLMRobertaXLConfig", "XLMRobertaXLForMaskedLM"),
    ("xlm-roberta-xl", "base"): ("XLMRobertaXLConfig", "XLMRobertaXLModel"),
    ("xlm-roberta", "mlm"): ("XLMRobertaConfig", "XLMRobertaForMaskedLM"),
    ("xlm-roberta", "base"): ("XLMRobertaConfig", "XLMRobertaModel"),
}


def make_hf(model_type, head, position_embedding_type="absolute", seed=0):
    """A seeded random-init tiny transformers model in eval mode."""
    config_cls, model_cls = (getattr(transformers, n) for n in _HF[(model_type, head)])
    config = config_cls(
        **TINY_XLMR,
        position_embedding_type=position_embedding_type,
        attn_implementation="eager",  # relative positions and head_mask need it anyway
    )
    return random_hf_model(model_cls, config, seed)


def padded_batch(type_vocab_size=1):
    """Two rows, the second padded after 6 tokens: (input_ids, attention_mask, token_type_ids)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, size=(2, 10))
    mask = np.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 1, 0  # pad_token_id = 1
    types = rng.randint(0, type_vocab_size, size=ids.shape)
    return ids, mask, types


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_masked_lm_parity(tmp_path, model_type, position_embedding_type):
    hf = make_hf(model_type, "mlm", position_embedding_type)
    model = xj.from_pretrained(save_hf(hf, tmp_path))
    assert model.architecture == type(hf).__name__
    ids, mask, types = padded_batch(hf.config.type_vocab_size)
    labels = np.where(np.random.RandomState(1).rand(*ids.shape) < 0.5, ids, -100)
    labels[1, 6:] = -100
    kwargs = dict(attention_mask=mask, token_type_ids=types, labels=labels)
    with torch.no_grad():
        theirs = hf(
            **{k: torch.tensor(v) for k, v in dict(input_ids=ids, **kwargs).items()},
            output_hidden_states=True,
            output_attentions=True,
        )
    ours = model(input_ids=ids, **kwargs, output_hidden_states=True, output_attentions=True)

    assert_close(ours.logits, theirs.logits, "logits")
    assert_close(ours.loss, theirs.loss, "loss")
    assert len(ours.hidden_states) == len(theirs.hidden_states) == LAYERS + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(a, b, f"hidden_states[{i}]")
    assert len(ours.attentions) == len(theirs.attentions) == LAYERS
    for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert_close(a, b, f"attentions[{i}]")


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_base_model_parity_with_head_mask(tmp_path, model_type, position_embedding_type):
    hf = make_hf(model_type, "base", position_embedding_type)
    model = xj.from_pretrained(save_hf(hf, tmp_path))
    assert model.architecture == type(hf).__name__
    ids, mask, types = padded_batch(hf.config.type_vocab_size)
    head_mask = np.ones((LAYERS, HEADS), np.float32)
    head_mask[0, 1] = head_mask[1, 3] = 0.0
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    # (Calls without head_mask are covered by the masked-LM cases: one compile per case here.)
    with torch.no_grad():
        theirs = hf(
            **{k: torch.tensor(v) for k, v in inputs.items()}, head_mask=torch.tensor(head_mask)
        )
    ours = model(**inputs, head_mask=head_mask)
    assert_close(ours.last_hidden_state, theirs.last_hidden_state, "last_hidden_state")
    assert_close(ours.pooler_output, theirs.pooler_output, "pooler_output")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pytorch_bin_checkpoint(tmp_path, model_type):
    hf = make_hf(model_type, "mlm", "relative_key_query", seed=1)
    path = save_hf(hf, tmp_path, safe=False)
    assert (tmp_path / "pytorch_model.bin").exists() and not (
        tmp_path / "model.safetensors"
    ).exists()
    model = xj.from_pretrained(path)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert_close(model(ids, attention_mask=mask).logits, theirs, "logits")


def test_base_model_from_masked_lm_checkpoint(tmp_path):
    """head= a bare model on a head checkpoint: `roberta.` stripped, lm_head dropped, the pooler
    (absent, as transformers' masked-LM heads have none) initialised fresh, as transformers does."""
    hf = make_hf("xlm-roberta-xl", "mlm")
    path = save_hf(hf, tmp_path)
    model = xj.from_pretrained(path, head="XLMRobertaXLModel")
    assert "pooler" in model.params and "lm_head" not in model.params
    base = transformers.XLMRobertaXLModel.from_pretrained(path).eval()
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        theirs = base(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert_close(model(ids, attention_mask=mask).last_hidden_state, theirs, "last_hidden_state")


def test_masked_lm_from_bare_checkpoint_names_missing_head(tmp_path):
    path = save_hf(make_hf("xlm-roberta", "base"), tmp_path)
    with pytest.raises(ValueError, match=r"missing .*lm_head\.dense\.weight"):
        xj.from_pretrained(path, head="XLMRobertaForMaskedLM")
