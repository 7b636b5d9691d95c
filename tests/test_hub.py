"""The HF hub API: save_pretrained round trips through transformers, Orbax conversions both ways,
trainer-checkpoint export, sharded and bfloat16 files, meshes, and every error a user can hit."""

import json
import os
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xformers_jax as xj  # noqa: E402
from tests.parity import ATOL, TINY_XLMR, random_hf_model, save_hf  # noqa: E402
from xformers_jax import checkpoint, hf_files, hub  # noqa: E402

CONFIG = TINY_XLMR


def make_hf_dir(path, cls="XLMRobertaXLForMaskedLM", seed=0, safe=True, **overrides):
    """Saves a seeded random-init tiny transformers model to `path`; returns (model, str path)."""
    config_cls = getattr(
        transformers, "XLMRobertaXLConfig" if "RobertaXL" in cls else "XLMRobertaConfig"
    )
    model = random_hf_model(cls, config_cls(**{**CONFIG, **overrides}), seed)
    return model, save_hf(model, path, safe)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def model(hf_dir):
    return xj.from_pretrained(hf_dir[1])


def inputs():
    ids = np.random.RandomState(0).randint(3, CONFIG["vocab_size"], size=(2, 9))
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 1, 0
    return ids, mask


def hf_logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def tensors(path):
    """All tensors of an HF dir, as transformers would read them (HF names)."""
    return hf_files.load_state_dict(path)


# --------------------------------------------------------------------------------------------------
# Public API and calling convention
# --------------------------------------------------------------------------------------------------


def test_public_api_is_lazy_and_exported():
    assert xj.from_pretrained is hub.from_pretrained
    assert xj.save_pretrained is hub.save_pretrained
    assert xj.PretrainedModel is hub.PretrainedModel
    assert {"from_pretrained", "save_pretrained", "PretrainedModel"} <= set(dir(xj))


def test_model_attributes_and_call_conventions(model, hf_dir):
    hf_model, _ = hf_dir
    assert model.architecture == "XLMRobertaXLForMaskedLM"
    assert model.config.hidden_size == 32 and model.config.model_type == "xlm-roberta-xl"
    leaves = jax.tree.leaves(model.params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
    ids, mask = inputs()
    want = hf_logits(hf_model, ids, mask)
    # numpy, positional, jax and torch inputs all give HF's logits; one compile serves them all.
    outs = [
        model(input_ids=ids, attention_mask=mask),
        model(ids, attention_mask=mask),
        model(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
        model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)),
    ]
    for out in outs:
        np.testing.assert_allclose(np.asarray(out.logits), want, atol=ATOL, rtol=0)
    assert len(model._fns) == 1
    with pytest.raises(ValueError, match="dropout_rng"):
        model(ids, deterministic=False)
    dropped = model(ids, deterministic=False, dropout_rng=jax.random.key(0)).logits
    assert not np.allclose(np.asarray(dropped), np.asarray(outs[0].logits))


def test_generate_is_refused_by_encoder_heads(model):
    with pytest.raises(TypeError, match="does not support generate"):
        model.generate(np.ones((1, 4), np.int32))


def test_mesh_placement_matches_single_device(model, hf_dir):
    from xformers_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = xj.from_pretrained(hf_dir[1], mesh=mesh)
    q = sharded.params["model"]["layers"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    ids, mask = inputs()
    np.testing.assert_allclose(
        np.asarray(sharded(ids, attention_mask=mask).logits),
        np.asarray(model(ids, attention_mask=mask).logits),
        atol=1e-5,
        rtol=0,
    )


def test_dtype_and_config_overrides(hf_dir, tmp_path):
    m = xj.from_pretrained(hf_dir[1], dtype=jnp.bfloat16, remat_policy="full")
    assert m.config.dtype == "bfloat16" and m.config.remat_policy == "full"
    assert jax.tree.leaves(m.params)[0].dtype == jnp.float32  # params keep param_dtype
    assert m(inputs()[0]).logits.dtype == jnp.bfloat16
    half = xj.from_pretrained(hf_dir[1], param_dtype="bfloat16")
    assert jax.tree.leaves(half.params)[0].dtype == jnp.bfloat16
    xj.save_pretrained(half, tmp_path / "out")  # HF files are float32 whatever param_dtype
    assert {v.dtype for v in load_file(tmp_path / "out" / "model.safetensors").values()} == {
        np.dtype(np.float32)
    }
    with pytest.raises(ValueError, match="unknown config fields.*no_such_field"):
        xj.from_pretrained(hf_dir[1], no_such_field=1)


# --------------------------------------------------------------------------------------------------
# save_pretrained: transformers reads our export unchanged
# --------------------------------------------------------------------------------------------------


def test_save_pretrained_loads_in_transformers(model, hf_dir, tmp_path, caplog):
    hf_model, src = hf_dir
    out = tmp_path / "export"
    xj.save_pretrained(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["XLMRobertaXLForMaskedLM"]
    assert config["model_type"] == "xlm-roberta-xl" and config["torch_dtype"] == "float32"
    assert config["transformers_version"] == transformers.__version__
    # Same tensors as transformers' own save (it, too, drops the tied lm_head.decoder.*).
    ours, theirs = (
        load_file(out / "model.safetensors"),
        load_file(os.path.join(src, "model.safetensors")),
    )
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == np.float32 and ours[k].flags.c_contiguous
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)

    loaded, info = transformers.XLMRobertaXLForMaskedLM.from_pretrained(
        out, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == []
    ids, mask = inputs()
    np.testing.assert_allclose(
        hf_logits(loaded.eval(), ids, mask),
        np.asarray(model(ids, attention_mask=mask).logits),
        atol=ATOL,
        rtol=0,
    )
    # And back into ours: identical params.
    again = xj.from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


@pytest.mark.parametrize("position_embedding_type", ["relative_key"])
def test_relative_model_export_has_no_newly_initialised_weights(tmp_path, position_embedding_type):
    # HF keeps an (unused) absolute table in relative models; we write zeros so that its load
    # reports nothing missing.
    _, src = make_hf_dir(tmp_path / "src", "XLMRobertaModel",
                         position_embedding_type=position_embedding_type)  # fmt: skip
    m = xj.from_pretrained(src)
    assert m.architecture == "XLMRobertaModel"
    xj.save_pretrained(m, tmp_path / "out")
    _, info = transformers.XLMRobertaModel.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_save_into_existing_dir_keeps_other_files_and_shards(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "pytorch_model.bin").write_bytes(b"stale")  # would shadow nothing, but is stale
    xj.save_pretrained(model, out, max_shard_size=20_000)
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert "tokenizer.json" in names and "pytorch_model.bin" not in names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp")]
    again = xj.from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
    loaded, info = transformers.XLMRobertaXLForMaskedLM.from_pretrained(
        out, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_bfloat16_safetensors_load(tmp_path):
    hf_model, _ = make_hf_dir(tmp_path / "f32")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m = xj.from_pretrained(tmp_path / "bf16")
    want = hf_model.roberta.embeddings.word_embeddings.weight.detach().float().numpy()
    got = m.params["model"]["embeddings"]["word_embeddings"]["embedding"]
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------------------------------
# Orbax: params-only export and trainer checkpoints
# --------------------------------------------------------------------------------------------------


def test_convert_to_orbax_and_export_back_is_lossless(hf_dir, tmp_path):
    _, src = hf_dir
    orbax_dir = tmp_path / "orbax"
    checkpoint.convert_hf_to_orbax(src, orbax_dir)
    assert sorted(os.listdir(orbax_dir)) == ["config.json", "params"]
    assert json.loads((orbax_dir / "config.json").read_text())["architectures"] == [
        "XLMRobertaXLForMaskedLM"
    ]
    with pytest.raises(FileExistsError):
        checkpoint.convert_hf_to_orbax(src, orbax_dir)
    checkpoint.export_orbax_to_hf(orbax_dir, tmp_path / "hf")
    ours, theirs = tensors(tmp_path / "hf"), tensors(src)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


@flax.struct.dataclass
class _TrainState:  # the trainer's TrainState fields; Orbax stores them by name
    step: jax.Array
    params: dict
    opt_state: dict
    extra: dict


def test_export_trainer_checkpoint(model, hf_dir, tmp_path):
    workdir = tmp_path / "run"
    ckpt = checkpoint.Checkpointer(
        str(workdir / "checkpoints"), every_steps=1, max_to_keep=3, async_save=False
    )
    zeros = jax.tree.map(jnp.zeros_like, model.params)
    for step, params in ((1, zeros), (2, model.params)):
        state = _TrainState(jnp.int32(step), params, {"mu": params, "nu": params}, {})
        ckpt.save(step, state, {"pos": step})
    ckpt.close()
    run = {"task": "mlm", "model": {"family": "xlm_roberta", "preset": "tiny", **CONFIG}}
    (workdir / "config.json").write_text(json.dumps(run))

    params, config, arch = checkpoint.load_params_from_checkpoint(workdir)
    assert arch == "XLMRobertaXLForMaskedLM" and config.hidden_size == CONFIG["hidden_size"]
    jax.tree.map(np.testing.assert_array_equal, params, model.params)
    first, _, _ = checkpoint.load_params_from_checkpoint(workdir / "checkpoints", step=1)
    assert not np.any(np.asarray(jax.tree.leaves(first)[0]))

    checkpoint.export_orbax_to_hf(workdir, tmp_path / "hf")  # the latest step
    ours, theirs = tensors(tmp_path / "hf"), tensors(hf_dir[1])
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    with pytest.raises(ValueError, match="no step 7"):
        checkpoint.load_params_from_checkpoint(workdir, step=7)


def test_restore_into_another_head(model, tmp_path):
    """Our export of an MLM (or of the bare model) initialises a classification head leaf by leaf:
    the body is the saved one, the classifier keeps its init, lm_head (or the pooler) is dropped;
    a checkpoint that does not fit is one line naming the paths."""
    import flax.linen as nn

    from xformers_jax import convert

    def init(config, arch):
        ids = np.zeros((1, 2), np.int32)
        module = convert.init_module(config, arch)
        return module, nn.meta.unbox(module.init(jax.random.key(2), input_ids=ids)["params"])

    checkpoint.save_orbax(model, tmp_path / "mlm")
    bare, bare_params = init(model.config, "XLMRobertaXLModel")
    bare_params = {**bare_params, **model.params["model"]}  # the MLM's body, a fresh pooler
    bare_model = hub.PretrainedModel(model.config, bare, bare_params, "XLMRobertaXLModel")
    checkpoint.save_orbax(bare_model, tmp_path / "bare")
    arch = "XLMRobertaXLForSequenceClassification"
    _, fresh = init(model.config, arch)
    for src in ("mlm", "bare"):
        params, state = checkpoint.restore_into(tmp_path / src, model.config, arch, fresh)
        assert state == {}
        jax.tree.map(np.testing.assert_array_equal, params["model"], model.params["model"])
        jax.tree.map(np.testing.assert_array_equal, params["classifier"], fresh["classifier"])
    # The same head must fit leaf for leaf: a resized vocabulary is named with both shapes.
    small = model.config.replace(vocab_size=50)
    _, fresh = init(small, model.architecture)
    with pytest.raises(ValueError) as e:
        checkpoint.restore_into(tmp_path / "mlm", small, model.architecture, fresh)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit XLMRobertaXLForMaskedLM" in msg
    assert "model/embeddings/word_embeddings/embedding (100, 32) (model (50, 32))" in msg


# --------------------------------------------------------------------------------------------------
# Errors: each names the problem
# --------------------------------------------------------------------------------------------------


def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_directory_config_and_weights(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        xj.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        xj.from_pretrained(empty)
    (empty / "config.json").write_text((open(os.path.join(hf_dir[1], "config.json"))).read())
    with pytest.raises(FileNotFoundError, match="model.safetensors.*empty"):
        xj.from_pretrained(empty)


def test_invalid_config_json(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "d")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        xj.from_pretrained(d)


def test_corrupt_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "d")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        xj.from_pretrained(d)


def test_pytorch_bin_without_torch(tmp_path, monkeypatch):
    _, d = make_hf_dir(tmp_path / "bin", safe=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*needs torch"):
        xj.from_pretrained(d)


def test_unknown_architecture_and_model_type(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown architecture 'BertModel'.*XLMRobertaXLModel"):
        xj.from_pretrained(hf_dir[1], head="BertModel")
    d = copy_dir(hf_dir[1], tmp_path / "d")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "architectures": ["XLMRobertaXLForQA"]}))
    with pytest.raises(ValueError, match=r"XLMRobertaXLForQA.*supported: \["):
        xj.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**config, "model_type": "gpt9"}))
    with pytest.raises(ValueError, match="unknown model_type 'gpt9'"):
        xj.from_pretrained(d)


def test_config_weights_shape_mismatch(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "d")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ValueError) as e:
        xj.from_pretrained(d)
    msg = str(e.value)
    assert "roberta.embeddings.word_embeddings.weight" in msg
    assert "(100, 32)" in msg and "(100, 48)" in msg


def test_missing_and_unexpected_tensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "d")
    state = load_file(d / "model.safetensors")
    del state["roberta.encoder.layer.1.intermediate.dense.weight"]
    state["roberta.encoder.layer.1.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        xj.from_pretrained(d)
    msg = str(e.value)
    assert "missing 1 tensors: roberta.encoder.layer.1.intermediate.dense.weight" in msg
    assert "unexpected 1 tensors: roberta.encoder.layer.1.extra.weight" in msg


def test_untied_output_weights_are_refused(hf_dir, tmp_path):
    d = copy_dir(hf_dir[1], tmp_path / "d")
    state = load_file(d / "model.safetensors")
    # Older transformers saved the tied copies too: accepted when they agree...
    state["lm_head.decoder.weight"] = state["roberta.embeddings.word_embeddings.weight"]
    state["lm_head.decoder.bias"] = state["lm_head.bias"]
    state["roberta.embeddings.position_ids"] = np.arange(64)[None]  # a non-persistent buffer
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    xj.from_pretrained(d)
    # ... and refused when they do not (we store one table).
    state["lm_head.decoder.weight"] = state["roberta.embeddings.word_embeddings.weight"] + 1
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head\.decoder\.weight differ"):
        xj.from_pretrained(d)


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.export_orbax_to_hf(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "junk").mkdir()
    with pytest.raises(FileNotFoundError, match="params-only export"):
        checkpoint.export_orbax_to_hf(tmp_path / "junk", tmp_path / "out")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.export_orbax_to_hf(tmp_path / "run", tmp_path / "out")
