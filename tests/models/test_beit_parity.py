"""BEiT parity with transformers' PyTorch models on random tiny checkpoints (float32, atol 1e-4).

Each case builds a seeded tiny HF model, overwrites every tensor (zero-initialised tables, layer
scales and BatchNorm statistics included) with random values so each path matters, saves it with
`save_pretrained`, loads it with `xformers_jax.from_pretrained` and compares outputs.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import ATOL, random_hf_model  # noqa: E402
from tests.parity import assert_close as _close  # noqa: E402
from tests.parity import load_hf as load  # noqa: E402

SIZE, PATCH = 32, 8

VARIANTS = {
    "rel_per_layer": dict(use_relative_position_bias=True),
    "rel_shared": dict(use_shared_relative_position_bias=True),
    "absolute": dict(use_absolute_position_embeddings=True),
    "abs_cls_pool": dict(use_absolute_position_embeddings=True, use_mean_pooling=False),
    "all_cls_pool": dict(use_relative_position_bias=True, use_shared_relative_position_bias=True,
                         use_absolute_position_embeddings=True, use_mean_pooling=False,
                         layer_scale_init_value=0.0),
}  # fmt: skip


def make_hf(model_cls, seed=0, **kw):
    """A seeded tiny transformers BEiT with every tensor random, in eval mode."""
    kw = dict(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, image_size=SIZE, patch_size=PATCH, num_labels=3,
        use_mask_token=True, auxiliary_channels=16, out_indices=[1, 2],
        layer_norm_eps=1e-6, drop_path_rate=0.1,
    ) | kw  # fmt: skip
    config = transformers.BeitConfig(**kw)
    config._attn_implementation = "eager"
    model = random_hf_model(model_cls, config, seed, perturb=False)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.copy_(torch.randn_like(t) * 0.2)
    return model


def _pixels(batch=2, size=SIZE, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("variant", ["all_cls_pool", "rel_shared"])
def test_base_model_parity(variant, tmp_path):
    hf = make_hf("BeitModel", **VARIANTS[variant])
    ours = load(hf, tmp_path)
    x = _pixels()
    out = ours(pixel_values=x, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), output_hidden_states=True, output_attentions=True)
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    _close(out.pooler_output, ref.pooler_output, "pooler_output")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        _close(a, b, f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions, strict=True)):
        _close(a, b, f"attentions[{i}]")


def test_masked_image_modeling_parity(tmp_path):
    hf = make_hf("BeitForMaskedImageModeling", **VARIANTS["rel_shared"])
    ours = load(hf, tmp_path)
    x = _pixels()
    mask = np.random.default_rng(2).random((2, 16)) < 0.4
    labels = np.random.default_rng(3).integers(0, 32, size=int(mask.sum()))
    out = ours(pixel_values=x, bool_masked_pos=mask, labels=labels)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), bool_masked_pos=torch.from_numpy(mask),
                 labels=torch.from_numpy(labels))  # fmt: skip
    _close(out.logits, ref.logits, "logits")
    _close(out.loss, ref.loss, "loss")
    # Our grid layout of the labels gives the same loss.
    grid = np.full(mask.shape, -100)
    grid[mask] = labels
    np.testing.assert_allclose(ours(pixel_values=x, bool_masked_pos=mask, labels=grid).loss,
                               ref.loss.item(), atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("variant", ["rel_per_layer", "abs_cls_pool"])
def test_image_classification_parity(variant, tmp_path):
    """At the config resolution, then at a larger one with `interpolate_pos_encoding`: the
    relative tables resize bilinearly, the absolute one bicubically, as in transformers."""
    hf = make_hf("BeitForImageClassification", **VARIANTS[variant])
    ours = load(hf, tmp_path)
    x, labels = _pixels(), np.array([0, 2])
    out = ours(pixel_values=x, labels=labels)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), labels=torch.from_numpy(labels))
    _close(out.logits, ref.logits, "logits")
    _close(out.loss, ref.loss, "loss")
    x = _pixels(size=48)
    out = ours(pixel_values=x, interpolate_pos_encoding=True)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), interpolate_pos_encoding=True)
    _close(out.logits, ref.logits, "logits at 48 px")


def test_semantic_segmentation(tmp_path):
    """Eval-mode parity (BatchNorm running stats) at the config resolution, then another
    resolution (transformers fails there; we give logits of the grid's shape), then the
    save -> transformers -> ours round trip with the BatchNorm statistics."""
    hf = make_hf("BeitForSemanticSegmentation", auxiliary_concat_input=True, num_hidden_layers=4,
                 out_indices=[1, 2, 3, 4], **VARIANTS["rel_per_layer"])  # fmt: skip
    ours = load(hf, tmp_path / "hf")
    x = _pixels()
    labels = np.random.default_rng(4).integers(0, 3, size=(2, SIZE, SIZE))
    labels[:, :4] = 255  # ignored
    out = ours(pixel_values=x, labels=labels)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), labels=torch.from_numpy(labels))
    _close(out.logits, ref.logits, "logits")
    _close(out.loss, ref.loss, "loss")

    x2 = _pixels(size=48)[:, :, :, :40]
    labels2 = np.random.default_rng(5).integers(0, 3, size=(2, 48, 40))
    out2 = ours(pixel_values=x2, labels=labels2)
    assert out2.logits.shape == (2, 3, 4 * 48 // PATCH, 4 * 40 // PATCH)
    assert np.isfinite(float(out2.loss))
    with pytest.raises(ValueError, match="hf_compat"):
        xj.from_pretrained(tmp_path / "hf", hf_compat=True)(pixel_values=x2)

    xj.save_pretrained(ours, tmp_path / "ours")
    back = transformers.BeitForSemanticSegmentation.from_pretrained(tmp_path / "ours").eval()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    again = xj.from_pretrained(tmp_path / "ours")
    for tree in ("params", "collections"):
        jax.tree.map(np.testing.assert_array_equal, getattr(again, tree), getattr(ours, tree))


def test_backbone_parity(tmp_path):
    hf = make_hf("BeitBackbone", use_relative_position_bias=True, add_fpn=True,
                 out_features=["stage1", "stage2", "stage3", "stage4"], out_indices=None,
                 batch_norm_eps=1e-3, num_hidden_layers=4)  # fmt: skip
    ours = load(hf, tmp_path)
    x = _pixels()
    out = ours(pixel_values=x)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x))
    assert len(out.feature_maps) == len(ref.feature_maps) == 4
    for i, (a, b) in enumerate(zip(out.feature_maps, ref.feature_maps)):
        _close(a, b, f"feature_maps[{i}]")
