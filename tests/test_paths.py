"""paths: local and gs:// (the emulator in tests/gcs.py) through one set of functions."""

import os

import numpy as np
import pytest

from xformers_jax import paths


def test_only_loopback_is_reachable():
    from tests import gcs

    assert gcs.network_isolated(), gcs.interfaces()


@pytest.mark.parametrize("url", ["s3://b/x", "http://host/x", "gcs://b/x", "file://x"])
def test_unknown_scheme_is_a_one_line_error(url):
    with pytest.raises(ValueError, match="unsupported URL scheme") as e:
        paths.resolve(url)
    assert "\n" not in str(e.value)


def test_url_is_never_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("gs://b/run/") == "gs://b/run"
    assert paths.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert paths.resolve("rel") == os.path.join(str(tmp_path), "rel")
    with pytest.raises(ValueError, match="names no bucket"):
        paths.resolve("gs://")


def _round_trip(root: str) -> None:
    f = paths.join(root, "a", "b.txt")
    paths.write_text(f, "one")
    paths.write_text(f, "two")  # overwrite is whole
    assert paths.read_text(f) == "two"
    paths.write_bytes(paths.join(root, "a", "c", "d.bin"), b"\x00\x01")
    assert paths.isdir(paths.join(root, "a"))
    assert paths.isfile(f) and not paths.isfile(paths.join(root, "a"))
    assert paths.listdir(paths.join(root, "a")) == ["b.txt", "c"]
    assert paths.glob(paths.join(root, "**", "*.bin")) == [paths.join(root, "a", "c", "d.bin")]
    assert paths.glob(paths.join(root, "a", "*.txt")) == [f]
    with paths.local_file(f) as local:
        assert open(local).read() == "two"
    with paths.local_dir_for_writing(paths.join(root, "out")) as d:
        np.save(os.path.join(d, "x.npy"), np.arange(3))
    with paths.local_file(paths.join(root, "out", "x.npy")) as local:
        assert np.load(local).tolist() == [0, 1, 2]
    paths.remove(paths.join(root, "a"))
    assert not paths.exists(f)


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path))


def test_gcs_round_trip(bucket, gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _round_trip(bucket + "/run")
    assert gcs_emulator.objects(bucket) == ["run/out/x.npy"]
    assert not os.path.exists(tmp_path / "gs:")


def test_orbax_and_tensorstore_on_gcs(bucket, tmp_path, monkeypatch):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(2)}
    target = paths.path(bucket + "/ckpt/params")
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(target, tree)
        back = ckptr.restore(target)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert not os.path.exists(tmp_path / "gs:")
