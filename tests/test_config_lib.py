"""Tests for config_lib: base config, presets, overrides, validation, loading and JSON."""

from __future__ import annotations

import json

import ml_collections
import pytest

from xformers_jax import config_lib
from xformers_jax.config_lib import ConfigError


@pytest.fixture
def config():
    c = config_lib.base_config()
    c.model.family = "xlm_roberta"
    c.model.preset = "tiny"
    c.model.dims = (4, 8)
    return c


def test_base_config_is_valid_and_has_shared_keys():
    c = config_lib.base_config()
    c.model.family = "x"
    config_lib.validate(c)
    for key in [
        "task", "model.family", "model.preset", "data.train_files", "data.eval_files",
        "data.seq_len", "data.tokenizer", "data.vocab_size", "data.mask_prob", "data.num_workers",
        "optim.name", "optim.lr", "optim.warmup_steps", "optim.schedule", "optim.end_lr_factor",
        "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "optim.clip_norm",
        "optim.grad_accum_steps", "optim.layer_decay", "train.steps", "train.batch_size",
        "train.seed", "train.eval_every_steps", "train.eval_steps", "train.skip_nonfinite",
        "checkpoint.every_steps", "checkpoint.max_to_keep", "checkpoint.async_save",
        "log.every_steps", "log.tensorboard", "log.progress", "mesh.data", "mesh.fsdp",
        "mesh.tensor", "mesh.rules", "init_from",
    ]:  # fmt: skip
        node = c
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_overrides_of_each_type(config):
    config.lock()
    config_lib.apply_overrides(
        config,
        [
            "optim.lr=3e-4",
            "train.steps=7",
            "config.optim.weight_decay=0",  # int into a float field.
            "--config.task=clm",
            "data.tokenizer=/tmp/spm.model",
            "log.progress=false",
            "checkpoint.async_save=1",
            "train.skip_nonfinite=True",
            "data.train_files=['a.txt', 'b.txt']",
            "model.dims=[16, 32]",
            "mesh.rules=[('embed', 'fsdp'), ('mlp', None)]",
            "model.preset=123",  # A str field keeps the text.
        ],
    )
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.train.steps == 7
    assert config.optim.weight_decay == 0.0 and isinstance(config.optim.weight_decay, float)
    assert config.task == "clm"
    assert config.data.tokenizer == "/tmp/spm.model"
    assert config.log.progress is False
    assert config.checkpoint.async_save is True
    assert config.train.skip_nonfinite is True
    assert config.data.train_files == ["a.txt", "b.txt"]
    assert config.model.dims == (16, 32)
    assert config.mesh.rules == [("embed", "fsdp"), ("mlp", None)]
    assert config.model.preset == "123"
    config_lib.validate(config)


def test_file_list_can_be_reset_to_none(config):
    config_lib.apply_overrides(config, ["data.train_files=['a.txt']", "data.train_files=None"])
    assert config.data.train_files is None


def test_unknown_key_names_it_and_suggests(config):
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*optim\.lr"):
        config_lib.apply_overrides(config, ["--config.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'.*optim\.lr"):
        config_lib.apply_overrides(config, ["lr=1"])
    with pytest.raises(ConfigError, match=r"'nope\.deeper\.key'"):
        config_lib.apply_overrides(config, ["nope.deeper.key=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.steps=1.5", r"'train\.steps' expects int, got float"),
        ("train.steps=abc", r"'train\.steps' expects int, got str"),
        ("train.steps=True", r"'train\.steps' expects int, got bool"),
        ("optim.lr=fast", r"'optim\.lr' expects float, got str"),
        ("log.progress=maybe", r"'log\.progress' expects bool"),
        ("model.dims=3", r"'model\.dims' expects tuple, got int"),
        ("optim=1", r"'optim' is a group"),
        ("optim.lr", r"key\.path=value"),
    ],
)
def test_wrong_type(config, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_lib.apply_overrides(config, [override])


def test_placeholders(config_file):
    c = config_lib.load_config(config_file)
    assert c.model.dropout is None and c.model.max_len is None
    c = config_lib.load_config(config_file, ["model.dropout=0.1", "model.max_len=512"])
    assert c.model.dropout == 0.1 and c.model.max_len == 512
    with pytest.raises(ConfigError, match=r"'model\.max_len' expects int"):
        config_lib.load_config(config_file, ["model.max_len=0.5"])


def test_load_config_with_preset_and_overrides(config_file):
    c = config_lib.load_config(f"{config_file}:base", ["--config.optim.lr=1e-3"])
    assert c.model.preset == "base" and c.model.num_layers == 12
    assert c.optim.lr == 1e-3
    assert config_lib.load_config(f"{config_file}:").model.preset == "tiny"
    assert c.is_locked
    with pytest.raises(AttributeError):
        c.new_key = 1


def test_unknown_preset(config_file):
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; known presets: base, tiny"):
        config_lib.load_config(f"{config_file}:huge")


def test_parse_arg():
    assert config_lib.parse_arg(None, {"a": 1}, "a") == "a"
    assert config_lib.parse_arg("", {"a": 1, "b": 2}, "a") == "a"
    assert config_lib.parse_arg("b", {"a": 1, "b": 2}, "a") == "b"
    with pytest.raises(ConfigError, match="known presets: a, b"):
        config_lib.parse_arg("c", {"a": 1, "b": 2}, "a")


def test_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_lib.load_config(str(tmp_path / "missing.py:tiny"))
    with pytest.raises(ConfigError, match="path/to/file.py"):
        config_lib.load_config(str(tmp_path / "job.yaml"))
    empty = tmp_path / "empty.py"
    empty.write_text('"""No get_config here."""\n')
    with pytest.raises(ConfigError, match="get_config"):
        config_lib.load_config(str(empty))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.steps=0", "train.steps"),
        ("train.batch_size=-1", "train.batch_size"),
        ("data.seq_len=0", "data.seq_len"),
        ("optim.lr=-1.0", "optim.lr"),
        ("optim.warmup_steps=-5", "optim.warmup_steps"),
        ("optim.name='sgd'", "optim.name"),
        ("optim.schedule=step", "optim.schedule"),
        ("optim.grad_accum_steps=0", "optim.grad_accum_steps"),
        ("optim.layer_decay=1.5", "optim.layer_decay"),
        ("checkpoint.max_to_keep=0", "checkpoint.max_to_keep"),
        ("mesh.fsdp=0", "mesh.fsdp"),
        ("mesh.rules=[('embed', 'model')]", "mesh.rules"),
        ("data.train_files=[]", "data.train_files"),
        ("task=''", "task"),
    ],
)
def test_validate_errors_name_the_key(config, override, key):
    config_lib.apply_overrides(config, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(config)


def test_validate_mesh_single_auto_axis(config):
    config_lib.apply_overrides(config, ["mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        config_lib.validate(config)


def test_validate_missing_key():
    c = config_lib.base_config()
    c.model.family = "x"
    del c.train["steps"]
    with pytest.raises(ConfigError, match="missing the required key 'train.steps'"):
        config_lib.validate(c)


def test_json_round_trip(tmp_path, config_file):
    c = config_lib.load_config(
        f"{config_file}:base",
        ["data.train_files=['a.txt']", "mesh.rules=[('embed', ['data', 'fsdp'])]"],
    )
    path = tmp_path / "out" / "config.json"
    config_lib.save_config(c, path)
    data = json.loads(path.read_text())
    assert data["model"]["preset"] == "base" and data["model"]["dropout"] is None
    back = config_lib.config_from_json(path)
    assert isinstance(back, ml_collections.ConfigDict)
    assert config_lib.to_dict(back) == config_lib.to_dict(c)
    assert back.mesh.rules == [["embed", ["data", "fsdp"]]]
    config_lib.validate(back)
