"""Parity of every XLM-R(-XL) task head with transformers, and the save round trip.

For each (variant, position embedding type, head) a seeded random-init tiny transformers model is
saved, loaded with `xformers_jax.from_pretrained`, and run on a padded batch with labels: logits
and loss must match at float32 / atol 1e-4. Then our `save_pretrained` export must load into
transformers with no missing or unexpected keys and give the same outputs. Sequence
classification cycles through the three `problem_type`s (one per position type) so each loss is
covered without extra compiles.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import TINY_XLMR, assert_close, random_hf_model  # noqa: E402
from xformers_jax.models import xlm_roberta as xr  # noqa: E402
from xformers_jax.models import xlm_roberta_heads as xrh  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, LENGTH = 100, 32, 2, 4, 10
VARIANTS = ("xlm-roberta-xl", "xlm-roberta")
POSITION_TYPES = ("absolute", "relative_key", "relative_key_query")
HEAD_KINDS = (
    "ForCausalLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
# Sequence classification: (num_labels, label kind) per position type -> inferred problem_type.
SEQ_CLS = {"absolute": (3, "int"), "relative_key": (1, "float"), "relative_key_query": (3, "multi")}


def hf_name(model_type, kind):
    return ("XLMRobertaXL" if model_type == "xlm-roberta-xl" else "XLMRoberta") + kind


def num_labels(kind, pos):
    if kind == "ForSequenceClassification":
        return SEQ_CLS[pos][0]
    return 2 if kind == "ForQuestionAnswering" else 5


def make_hf(model_type, kind, pos, seed=0):
    config_cls = getattr(
        transformers, "XLMRobertaXLConfig" if model_type == "xlm-roberta-xl" else "XLMRobertaConfig"
    )
    config = config_cls(
        **TINY_XLMR,
        position_embedding_type=pos,
        num_labels=num_labels(kind, pos),
        is_decoder=kind == "ForCausalLM",
        attn_implementation="eager",
    )
    return random_hf_model(hf_name(model_type, kind), config, seed)


def inputs_for(kind, pos, type_vocab_size):
    """A padded batch (rows padded after 6 and 8 tokens) with the head's labels."""
    rng = np.random.RandomState(0)
    shape = (2, 3, LENGTH) if kind == "ForMultipleChoice" else (2, LENGTH)
    ids = rng.randint(3, VOCAB, size=shape)
    ids[..., 0] = 0
    mask = np.ones_like(ids)
    flat_ids, flat_mask = ids.reshape(-1, LENGTH), mask.reshape(-1, LENGTH)
    flat_ids[1, 6:], flat_mask[1, 6:] = 1, 0
    flat_ids[-1, 8:], flat_mask[-1, 8:] = 1, 0
    batch = dict(
        input_ids=ids, attention_mask=mask, token_type_ids=rng.randint(0, type_vocab_size, shape)
    )
    if kind == "ForCausalLM":
        labels = np.where(mask > 0, ids, -100)
        labels[0, 3] = -100
        batch["labels"] = labels
    elif kind == "ForSequenceClassification":
        n, label_kind = SEQ_CLS[pos]
        batch["labels"] = {
            "int": rng.randint(0, n, 2),
            "float": rng.randn(2).astype(np.float32),
            "multi": (rng.rand(2, n) > 0.5).astype(np.float32),
        }[label_kind]
    elif kind == "ForMultipleChoice":
        batch["labels"] = np.array([2, 0])
    elif kind == "ForTokenClassification":
        labels = rng.randint(0, 5, (2, LENGTH))
        labels[0, 2] = -100  # padding positions keep real labels: XL's head masks them itself
        batch["labels"] = labels
    else:  # QA; the second end position is past the sequence: clamped, then ignored
        batch["start_positions"] = np.array([1, 4])
        batch["end_positions"] = np.array([3, 40])
    return batch


FIELDS = ("loss", "logits", "start_logits", "end_logits")


def assert_outputs_close(ours, theirs, what):
    for field in FIELDS:
        b = getattr(theirs, field, None)
        if b is not None:
            assert_close(getattr(ours, field, None), b, f"{what} {field}")


def torch_inputs(batch):
    return {
        k: torch.tensor(v) if v.dtype.kind == "f" else torch.tensor(v, dtype=torch.long)
        for k, v in batch.items()
    }


CASES = [(m, p, k) for m in VARIANTS for p in POSITION_TYPES for k in HEAD_KINDS]


@pytest.mark.parametrize("model_type,pos,kind", CASES, ids=["-".join(c) for c in CASES])
def test_head_parity_and_save_round_trip(tmp_path, model_type, pos, kind):
    hf = make_hf(model_type, kind, pos)
    hf.save_pretrained(tmp_path / "hf")
    model = xj.from_pretrained(str(tmp_path / "hf"))
    assert model.architecture == type(hf).__name__
    batch = inputs_for(kind, pos, hf.config.type_vocab_size)
    with torch.no_grad():
        theirs = hf(**torch_inputs(batch))
    ours = model(**batch)
    assert ours.loss is not None
    assert_outputs_close(ours, theirs, "from_pretrained")

    xj.save_pretrained(model, tmp_path / "ours")
    back, info = type(hf).from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        again = back.eval()(**torch_inputs(batch))
    assert_outputs_close(ours, again, "round trip")


def test_classifier_heads_load_from_lm_checkpoint(tmp_path):
    """Fine-tuning start: an LM checkpoint into a classification head (lm_head dropped, the
    classifier initialised fresh) gives transformers' encoder outputs."""
    mlm = make_hf("xlm-roberta", "ForCausalLM", "absolute")
    mlm.save_pretrained(tmp_path)
    model = xj.from_pretrained(str(tmp_path), head="XLMRobertaForTokenClassification")
    assert "lm_head" not in model.params and "classifier" in model.params
    mc = xj.from_pretrained(str(tmp_path), head="XLMRobertaForMultipleChoice")
    assert "pooler" in mc.params["model"]


def test_problem_type_explicit_and_xl_aliases():
    assert xrh.XLMRobertaXLForQuestionAnswering is xrh.XLMRobertaForQuestionAnswering
    cfg = xr.XLMRobertaConfig(model_type="xlm-roberta")
    assert xr.architecture_name(cfg, "XLMRobertaForCausalLM") == "XLMRobertaForCausalLM"
    assert (
        xr.architecture_name(cfg.replace(model_type="xlm-roberta-xl"), "XLMRobertaForCausalLM")
        == "XLMRobertaXLForCausalLM"
    )
    from xformers_jax.layers.losses import sequence_classification_loss

    logits = np.array([[0.5, -1.0], [2.0, 0.0]], np.float32)
    labels = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    bce = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits), torch.tensor(labels))
    ours = sequence_classification_loss(logits, labels, 2, "multi_label_classification")
    np.testing.assert_allclose(float(ours), float(bce), atol=1e-6)
    mse = sequence_classification_loss(logits, labels, 2, "regression")
    np.testing.assert_allclose(float(mse), float(np.mean((logits - labels) ** 2)), atol=1e-6)
