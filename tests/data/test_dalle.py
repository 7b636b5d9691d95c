"""The DALL-E dVAE encoder in JAX against the `dall_e` package's `Encoder` (random init, small
sizes), its restricted loader, and BEiT MIM with DALL-E targets."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from xformers_jax import config_lib, paths, train
from xformers_jax.data import dalle

torch = pytest.importorskip("torch")
dall_e = pytest.importorskip("dall_e")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save_encoder(path, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    enc = dall_e.Encoder(**kwargs)
    # Non-zero biases, so that a dropped or misplaced bias shows.
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, dall_e.utils.Conv2d):
                m.b.normal_(std=0.1)
    torch.save(enc, path)
    return enc


@pytest.mark.parametrize(
    "kwargs,size",
    [
        (dict(n_hid=64, vocab_size=512, n_blk_per_group=1), 16),
        (dict(n_hid=64, vocab_size=1024, n_blk_per_group=2), 24),
    ],
)
def test_logits_and_codes_equal_dall_e(tmp_path, kwargs, size):
    path = str(tmp_path / "encoder.pkl")
    enc = _save_encoder(path, **kwargs)
    x = np.random.default_rng(0).random((3, 3, size, size), np.float32)
    with torch.no_grad():
        want = enc(dall_e.map_pixels(torch.from_numpy(x))).numpy()  # [b, vocab, h, w]
    tok = dalle.DalleTokenizer.load(path, size)
    assert tok.vocab_size == kwargs["vocab_size"] and tok.info["n_hid"] == 64
    got = np.asarray(tok.logits(x)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    codes = tok.tokenize(x)
    assert codes.dtype == np.int32 and codes.shape == (3, (size // 8) ** 2)
    np.testing.assert_array_equal(codes, want.argmax(1).reshape(3, -1))


def test_loads_from_gcs(tmp_path, bucket, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = str(tmp_path / "encoder.pkl")
    _save_encoder(local, n_hid=64, vocab_size=512, n_blk_per_group=1)
    url = bucket + "/dalle/encoder.pkl"
    paths.copy(local, url)
    a, _ = dalle.load_encoder(local)
    b, _ = dalle.load_encoder(url)
    np.testing.assert_array_equal(a["output"]["w"], b["output"]["w"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _torch_zip(payload: bytes, path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


def test_restricted_unpickler_refuses_code(tmp_path):
    # A pickle that would run a shell command, inside a torch zip and as a bare pickle.
    evil = tmp_path / "evil.pkl"
    _torch_zip(pickle.dumps(_Evil(), protocol=2), evil)
    with pytest.raises(dalle.UnsafeFileError, match=r"refusing to load: .* references "
                       r"(posix|os)\.system") as err:  # fmt: skip
        dalle.load_encoder(str(evil))
    assert "\n" not in str(err.value)
    # The module's own encoder hidden behind an eval(...) call is refused too.
    sneaky = tmp_path / "sneaky.pkl"
    _torch_zip(pickle.dumps(eval, protocol=2) + b"", sneaky)
    with pytest.raises(dalle.UnsafeFileError, match=r"(__builtin__|builtins)\.eval"):
        dalle.load_encoder(str(sneaky))
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(dalle.EncoderFileError, match="not a torch zip archive"):
        dalle.load_encoder(str(bare))
    # A torch file of something else (a plain tensor dict) is not an encoder.
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(dalle.EncoderFileError, match="not a dall_e Encoder"):
        dalle.load_encoder(str(other))
    with pytest.raises(dalle.EncoderFileError, match="no such DALL-E encoder file"):
        dalle.load_encoder(str(tmp_path / "missing.pkl"))


def test_unpickler_builds_no_torch_objects(tmp_path):
    """What the loader builds is inert stand-ins and numpy arrays, never torch modules."""
    path = str(tmp_path / "encoder.pkl")
    _save_encoder(path, n_hid=64, vocab_size=512, n_blk_per_group=1)
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        root = dalle.SafeUnpickler(z.read(name), z, name[: -len("data.pkl")], path).load()
        assert isinstance(root, dalle._Module) and not isinstance(root, torch.nn.Module)
        assert root.type_name == "dall_e.encoder.Encoder" and root.n_hid == 64
    buf = io.BytesIO()
    np.save(buf, np.zeros(1))  # (a numpy file is not a torch archive either)
    bad = tmp_path / "x.npy"
    bad.write_bytes(buf.getvalue())
    with pytest.raises(dalle.EncoderFileError, match="not a torch zip archive"):
        dalle.load_encoder(str(bad))


@pytest.mark.slow
def test_mim_trains_on_dalle_targets(tmp_path):
    path = str(tmp_path / "encoder.pkl")
    _save_encoder(path, n_hid=64, vocab_size=512, n_blk_per_group=1)
    c = config_lib.load_config(os.path.join(ROOT, "configs/beit/pretrain_mim.py") + ":tiny")
    with c.unlocked():
        c.data.visual_tokenizer = "dalle"
        c.data.tokenizer = path
        c.data.sources = ["digits"]
        c.model.vocab_size = 512
        c.train.steps, c.train.batch_size = 2, 8
        c.train.eval_every_steps, c.train.eval_steps = 1000, 1
        c.checkpoint.async_save = False
        c.log.every_steps, c.log.progress, c.log.tensorboard = 1, False, False
    out = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(out["final_eval"]["loss"])
    c.data.tokenizer = ""
    with pytest.raises(config_lib.ConfigError, match="must name the DALL-E encoder.pkl"):
        config_lib.validate(c)


def test_mim_batches_label_the_second_view(tmp_path):
    """MIM batches carry the DALL-E codes of the tokenizer's own 8 * grid view: the bundled
    images' view is made from the rendered pixels, an image folder's is BEiT's second view."""
    from tests.data.test_image_folder import make_folder
    from xformers_jax.data import image_folder as imf
    from xformers_jax.data.images import _tokenizer_view, default_images, mim_dataset
    from xformers_jax.data.masking import MaskingGenerator

    path = str(tmp_path / "encoder.pkl")
    _save_encoder(path, n_hid=64, vocab_size=512, n_blk_per_group=1)
    tok = dalle.DalleTokenizer.load(path, 16)  # a 2 x 2 grid
    masking = MaskingGenerator(2, 2, 1)
    digits = default_images("train", 32)
    batch = next(iter(mim_dataset(digits, tok, masking, batch_size=4, seed=0)))
    views = np.stack([_tokenizer_view(p, 16) for p in batch["pixel_values"]])
    want = np.where(batch["bool_masked_pos"], tok.tokenize(views), -100)
    np.testing.assert_array_equal(batch["labels"], want)

    folder = make_folder(tmp_path / "images", per_class=2)
    files, labels, classes = imf.scan_folder(folder)
    source = imf.EncodedImages(
        imf.ImageFolder(files, labels, classes), imf.ImageTransform(32, 16, train=False)
    )
    batch = next(iter(mim_dataset(source, tok, masking, batch_size=2, seed=0, train=False)))
    views = np.stack([source.example(i, None)["tokenizer_pixels"] for i in range(2)])
    want = np.where(batch["bool_masked_pos"], tok.tokenize(views), -100)
    np.testing.assert_array_equal(batch["labels"], want)
