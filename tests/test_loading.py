"""Checkpoint I/O without holding the model: bfloat16 / float16 sharded HF checkpoints loaded slice
by slice onto an 8-device mesh (logits equal to transformers), host memory of loading (VmHWM in a
subprocess), init_from of every source onto a sharded state, streaming convert, bfloat16 export
through transformers, and the same from and to gs:// (the emulator)."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import TINY_XLMR, random_hf_model  # noqa: E402
from xformers_jax import checkpoint, cli, hf_files, hub, paths, sharding  # noqa: E402
from xformers_jax.bench import loading  # noqa: E402
from xformers_jax.convert import ConversionError  # noqa: E402
from xformers_jax.convert import param_map as pm  # noqa: E402

ARCH = "XLMRobertaXLForMaskedLM"


def fsdp_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def make_hf(path, dtype="bfloat16", safe=True, cls=ARCH, seed=0):
    """A tiny random transformers model saved in `dtype`, sharded (index + several files)."""
    config = transformers.XLMRobertaXLConfig(**TINY_XLMR)
    model = random_hf_model(cls, config, seed).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=safe, max_shard_size="40KB")
    index = hf_files.SAFE_INDEX if safe else hf_files.TORCH_INDEX
    assert os.path.isfile(os.path.join(path, index))
    return str(path)


def inputs():
    ids = np.random.RandomState(0).randint(3, TINY_XLMR["vocab_size"], size=(2, 9))
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 1, 0
    return ids, mask


def hf_logits(path, cls=ARCH):
    ids, mask = inputs()
    ref = getattr(transformers, cls).from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def our_logits(model):
    ids, mask = inputs()
    return np.asarray(model(input_ids=ids, attention_mask=mask).logits)


def assert_sharded_like(tree, config, arch, mesh):
    want = pm.flatten(hub.param_shardings(config, arch, mesh))
    for path, x in pm.flatten(tree).items():
        assert x.sharding.is_equivalent_to(want[path], x.ndim), path


# --------------------------------------------------------------------------------------------------
# from_pretrained onto a mesh
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,safe", [("bfloat16", True), ("float16", True), ("bfloat16", False)])
def test_half_precision_sharded_checkpoint_loads_onto_mesh(tmp_path, dtype, safe):
    path = make_hf(tmp_path / "hf", dtype, safe)
    mesh = fsdp_mesh()
    model = xj.from_pretrained(path, mesh=mesh, dtype="float32")
    assert_sharded_like(model.params, model.config, model.architecture, mesh)
    wi = model.params["model"]["layers"]["mlp"]["wi"]["kernel"]
    assert len({str(s.index) for s in wi.addressable_shards}) == 8  # split over fsdp, not copied
    assert wi.dtype == np.float32  # param_dtype; the file's values exactly
    np.testing.assert_allclose(our_logits(model), hf_logits(path), atol=1e-4)


def test_lazy_reads_touch_only_the_box(tmp_path):
    """A row box of a safetensors tensor is one ranged read of its rows; a column box reads rows
    in chunks; both equal numpy's slicing of the whole tensor."""
    path = make_hf(tmp_path / "hf")
    sd = hf_files.open_state_dict(path)
    full = hf_files.load_state_dict(path)
    key = "roberta.embeddings.word_embeddings.weight"
    ref = sd[key]
    assert isinstance(ref, hf_files.SafetensorsTensor) and ref.dtype.name == "bfloat16"
    np.testing.assert_array_equal(ref.read((slice(3, 7),)), full[key][3:7])
    np.testing.assert_array_equal(ref.read((slice(None), slice(8, 16))), full[key][:, 8:16])
    old = hf_files._CHUNK
    hf_files._CHUNK = 3 * 64  # three rows of 32 bf16 per read
    try:
        np.testing.assert_array_equal(ref.read((slice(1, 99), slice(4, 12))), full[key][1:99, 4:12])
    finally:
        hf_files._CHUNK = old


def test_tied_alias_that_differs_is_an_error(tmp_path):
    from safetensors.numpy import save_file

    path = make_hf(tmp_path / "hf")
    full = hf_files.load_state_dict(path)
    full = {k: np.asarray(v, np.float32) for k, v in full.items()}
    decoder = full["roberta.embeddings.word_embeddings.weight"] + 1.0
    full["lm_head.decoder.weight"] = decoder
    for name in os.listdir(path):
        if name.endswith((".safetensors", ".json")) and name != "config.json":
            os.remove(os.path.join(path, name))
    save_file(full, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="differ"):
        xj.from_pretrained(path, mesh=fsdp_mesh())


# --------------------------------------------------------------------------------------------------
# Host memory: loading holds a shard, not the model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """An XLM-R-XL-shaped bfloat16 checkpoint of 35M params (140 MB as float32 params), in 40 MB
    shards: big enough that holding the model (2x to 3x of it) and holding a shard differ by far."""
    path = str(tmp_path_factory.mktemp("big") / "hf")
    loading.make_checkpoint(path, (8, 512, 16000), shard_gb=0.04)
    return path


def test_from_pretrained_and_init_from_peak_memory_is_a_fraction_of_the_model(big_ckpt):
    """Reading the model whole (the file, then float32 params) costs 1.5x-3x of it on top; a
    shard at a time costs about the largest shard (4 MB here)."""
    for op in ("from_pretrained", "init_from"):
        r = loading.measure(op, big_ckpt, devices=8)
        assert r["loaded"] > 130e6
        assert r["transient"] < 0.2 * r["loaded"], r


def test_convert_peak_memory_is_a_fraction_of_the_model(big_ckpt):
    r = loading.measure("convert", big_ckpt, devices=8)
    # Nothing is kept: the increase is one group of params in flight, Orbax's host copy of it
    # and its writers (about 150 MB here); through from_pretrained it was 3-4x the model.
    assert r["peak"] - r["before"] < 1.3 * 140e6, r


# --------------------------------------------------------------------------------------------------
# init_from: HF dir, Orbax export, trainer workdir onto a sharded state
# --------------------------------------------------------------------------------------------------


def fresh_state(config, arch, mesh):
    return loading._fresh_params(config, arch, hub.param_shardings(config, arch, mesh))


def assert_same(a, b):
    fa, fb = pm.flatten(a), pm.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_init_from_every_source_onto_a_sharded_state(tmp_path):
    path = make_hf(tmp_path / "hf")
    mesh = fsdp_mesh()
    ref = xj.from_pretrained(path, mesh=mesh)
    config, arch = ref.config, ref.architecture

    # An HF dir.
    params, _ = checkpoint.load_hf_into(path, config, arch, fresh_state(config, arch, mesh))
    assert_sharded_like(params, config, arch, mesh)
    assert_same(params, ref.params)

    # An Orbax export written by convert (streamed, param groups of a few KB).
    out = str(tmp_path / "orbax")
    checkpoint.convert_hf_to_orbax(path, out, mesh=mesh, group_bytes=20_000)
    params, _ = checkpoint.restore_into(out, config, arch, fresh_state(config, arch, mesh))
    assert_sharded_like(params, config, arch, mesh)
    assert_same(params, ref.params)

    # A pretraining checkpoint into a classification head: the body loads, the head keeps the
    # run's init (the very arrays given, never gathered), the LM head is dropped.
    cls_arch = "XLMRobertaXLForSequenceClassification"
    cls_config = ref.config
    init = fresh_state(cls_config, cls_arch, mesh)
    params, _ = checkpoint.load_hf_into(path, cls_config, cls_arch, init)
    assert params["classifier"]["dense"]["kernel"] is init["classifier"]["dense"]["kernel"]
    assert_same(params["model"], ref.params["model"])
    assert_sharded_like(params, cls_config, cls_arch, mesh)


def test_init_from_trainer_workdir_onto_a_sharded_state(tmp_path, corpus):
    from tests.helpers import tiny_mlm_config
    from xformers_jax import train

    c = tiny_mlm_config(corpus, train__steps=1, checkpoint__every_steps=1)
    train.train_and_evaluate(c, str(tmp_path / "run"))
    trained = train.load_trained_model(str(tmp_path / "run"))
    mesh = fsdp_mesh()
    config, arch = trained.config, trained.architecture
    params, _ = checkpoint.restore_into(
        str(tmp_path / "run"), config, arch, fresh_state(config, arch, mesh)
    )
    assert_sharded_like(params, config, arch, mesh)
    assert_same(params, trained.params)


# --------------------------------------------------------------------------------------------------
# convert -> train -> export --dtype bfloat16 -> transformers
# --------------------------------------------------------------------------------------------------


def test_convert_train_export_bfloat16_loads_in_transformers(tmp_path, corpus, capsys):
    from tests.helpers import tiny_mlm_config
    from xformers_jax import models, train

    c = tiny_mlm_config(corpus, train__steps=2, checkpoint__every_steps=2)
    module, config, arch = models.build_model(c.model.to_dict(), task="mlm")
    ids = np.zeros((1, 2), np.int32)
    init = jax.jit(lambda r: nn.meta.unbox(module.init(r, input_ids=ids)["params"]))
    start = hub.PretrainedModel(config, module, init(jax.random.key(1)), arch)
    hf = str(tmp_path / "hf")
    xj.save_pretrained(start, hf, dtype="bfloat16")

    orbax = str(tmp_path / "orbax")
    assert cli.main(["convert", "--hf", hf, "--out", orbax, "--mesh", "fsdp=8"]) == 0
    with c.unlocked():
        c.init_from = orbax
    train.train_and_evaluate(c, str(tmp_path / "run"))
    assert "Initialised params from" in capsys.readouterr().out
    out = str(tmp_path / "export")
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--hf-out", out]
    assert cli.main([*args, "--dtype", "bfloat16", "--max-shard-size", "60000"]) == 0

    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["torch_dtype"] == "bfloat16"
    assert os.path.isfile(os.path.join(out, hf_files.SAFE_INDEX))
    assert {v.dtype.name for v in hf_files.open_state_dict(out).values()} == {"bfloat16"}
    ours = train.load_trained_model(str(tmp_path / "run"))
    ids = np.random.RandomState(0).randint(3, 2000, size=(2, 9))
    mask = np.ones_like(ids)
    want = np.asarray(ours(input_ids=ids, attention_mask=mask).logits)
    ref = transformers.AutoModelForMaskedLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.02 * scale + 1e-3  # bfloat16 weights: ~3 digits


def test_export_dtype_errors_are_one_line(tmp_path):
    path = make_hf(tmp_path / "hf")
    model = xj.from_pretrained(path)
    with pytest.raises(ValueError, match="unsupported export dtype 'int8'"):
        xj.save_pretrained(model, str(tmp_path / "out"), dtype="int8")
    xj.save_pretrained(model, str(tmp_path / "f16"), dtype="float16")
    assert json.load(open(tmp_path / "f16" / "config.json"))["torch_dtype"] == "float16"
    np.testing.assert_allclose(
        our_logits(xj.from_pretrained(str(tmp_path / "f16"))), our_logits(model), atol=2e-2
    )


# --------------------------------------------------------------------------------------------------
# The same from and to gs://
# --------------------------------------------------------------------------------------------------


def test_gs_from_pretrained_convert_init_from_export(tmp_path, bucket):
    local = make_hf(tmp_path / "hf")
    remote = paths.join(bucket, "models", "hf")
    paths.upload_tree(local, remote)
    mesh = fsdp_mesh()

    model = xj.from_pretrained(remote, mesh=mesh, dtype="float32")
    np.testing.assert_allclose(our_logits(model), hf_logits(local), atol=1e-4)
    config, arch = model.config, model.architecture

    params, _ = checkpoint.load_hf_into(remote, config, arch, fresh_state(config, arch, mesh))
    assert_same(params, model.params)

    orbax = paths.join(bucket, "orbax")
    assert cli.main(["convert", "--hf", remote, "--out", orbax, "--devices", "8"]) == 0
    params, _ = checkpoint.restore_into(orbax, config, arch, fresh_state(config, arch, mesh))
    assert_sharded_like(params, config, arch, mesh)
    assert_same(params, model.params)

    out = paths.join(bucket, "export")
    args = ["export", "--checkpoint", orbax, "--hf-out", out, "--dtype", "bfloat16"]
    assert cli.main([*args, "--max-shard-size", "20000"]) == 0
    assert hf_files.SAFE_INDEX in paths.listdir(out)
    back = tmp_path / "back"
    for name in paths.listdir(out):
        paths.copy(paths.join(out, name), str(back / name))
    # The source was bfloat16: a bfloat16 export holds exactly its values.
    np.testing.assert_allclose(hf_logits(str(back)), hf_logits(local), atol=1e-5)


def test_export_of_a_sharded_model_streams_the_same_tensors(tmp_path):
    """Sharded params are gathered one HF tensor at a time (a layer of a scanned param, cast on
    the device): the files equal those of the same model on one device."""
    path = make_hf(tmp_path / "hf", "float16")
    mesh = fsdp_mesh()
    sharded = xj.from_pretrained(path, mesh=mesh)
    single = xj.from_pretrained(path)
    xj.save_pretrained(sharded, str(tmp_path / "a"), dtype="bfloat16", max_shard_size=20000)
    xj.save_pretrained(single, str(tmp_path / "b"), dtype="bfloat16")
    a, b = hf_files.load_state_dict(tmp_path / "a"), hf_files.load_state_dict(tmp_path / "b")
    assert len(os.listdir(tmp_path / "a")) > 3 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # An Orbax export read back onto a mesh (what `export` does on accelerators / pods).
    checkpoint.convert_hf_to_orbax(path, str(tmp_path / "orbax"), mesh=mesh)
    back = checkpoint.load_orbax(str(tmp_path / "orbax"), mesh=mesh)
    assert_sharded_like(back.params, back.config, back.architecture, mesh)
    assert_same(back.params, sharded.params)
