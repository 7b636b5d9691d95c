"""The numpy/PIL BEiT image processor equals transformers' on scikit-learn's sample photos."""

import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from xformers_jax.data.image_processing import BeitImageProcessor, center_crop, reduce_label

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def photos():
    return list(load_sample_images().images)  # two uint8 [427, 640, 3] photos


def _labels(photo):
    """A label map from a photo: 0..12 (0 = background), uint8 like ADE20k PNGs."""
    return (photo.mean(-1) // 20).astype(np.uint8)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(size={"height": 64, "width": 80}, crop_size={"height": 56, "width": 56},
             do_reduce_labels=True),
        dict(size={"height": 40, "width": 40}, crop_size={"height": 48, "width": 44},
             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        dict(do_resize=False, crop_size={"height": 100, "width": 120}, resample=2),
    ],
)  # fmt: skip
def test_equals_transformers(photos, kw):
    ours = BeitImageProcessor(**kw)
    theirs = transformers.BeitImageProcessor(**kw)
    maps = [_labels(p) for p in photos]
    a = ours(photos, segmentation_maps=maps)
    b = theirs(photos, segmentation_maps=maps, return_tensors="np")
    np.testing.assert_allclose(a["pixel_values"], b["pixel_values"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["labels"].dtype == np.int64 and a["pixel_values"].dtype == np.float32


def test_reduce_label_and_crop_padding():
    np.testing.assert_array_equal(reduce_label(np.array([0, 1, 5, 255], np.uint8)),
                                  [255, 0, 4, 255])  # fmt: skip
    x = np.ones((2, 3), np.uint8)
    y = center_crop(x, (4, 5))
    assert y.shape == (4, 5) and y.sum() == 6


def test_post_process_semantic_segmentation():
    logits = np.random.default_rng(0).normal(size=(2, 5, 8, 8)).astype(np.float32)
    ours, theirs = BeitImageProcessor(), transformers.BeitImageProcessor()

    class Out:
        pass

    out = Out()
    out.logits = torch.from_numpy(logits)
    sizes = [(20, 30), (5, 7)]
    for a, b in zip(ours.post_process_semantic_segmentation(logits, sizes),
                    theirs.post_process_semantic_segmentation(out, sizes)):  # fmt: skip
        np.testing.assert_array_equal(a, b.numpy())
    for a, b in zip(ours.post_process_semantic_segmentation(logits),
                    theirs.post_process_semantic_segmentation(out)):  # fmt: skip
        np.testing.assert_array_equal(a, b.numpy())
