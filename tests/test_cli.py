"""Tests for the `xformers-jax` CLI: parsing, overrides, dispatch and one-line user errors."""

from __future__ import annotations

import os
import sys
import types

import pytest

from xformers_jax import cli, config_lib


@pytest.fixture
def fake_train(monkeypatch):
    """A stand-in `xformers_jax.train` recording its calls."""
    calls = []
    mod = types.ModuleType("xformers_jax.train")

    def train_and_evaluate(config, workdir):
        calls.append(("train", config, workdir))
        return {"loss": 1.5, "step": config.train.steps}

    def evaluate(config, workdir):
        calls.append(("eval", config, workdir))
        return {"accuracy": 0.5}

    mod.train_and_evaluate, mod.evaluate = train_and_evaluate, evaluate
    monkeypatch.setitem(sys.modules, "xformers_jax.train", mod)
    return calls


def _error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


def test_parse_args_collects_overrides():
    args, overrides = cli.parse_args(
        [
            "train",
            "--config.optim.lr=1e-3",
            "--config",
            "configs/x.py:tiny",
            "--workdir",
            "/tmp/w",
            "--config.mesh.data",
            "-1",
            "--config.data.train_files=['a.txt']",
        ]
    )
    assert (args.command, args.config, args.workdir) == ("train", "configs/x.py:tiny", "/tmp/w")
    assert overrides == ["optim.lr=1e-3", "mesh.data=-1", "data.train_files=['a.txt']"]


def test_parse_args_other_commands():
    args, overrides = cli.parse_args(["convert", "--hf", "h", "--out", "o", "--head", "H"])
    assert (args.hf, args.out, args.head, overrides) == ("h", "o", "H", [])
    args, _ = cli.parse_args(["export", "--checkpoint", "c", "--hf-out", "h"])
    assert (args.checkpoint, args.hf_out) == ("c", "h")
    args, _ = cli.parse_args(["bench", "--family", "yoso", "xlnet", "--family", "beit"])
    assert (args.family, args.out) == (["yoso", "xlnet", "beit"], None)
    assert cli.parse_args(["bench"])[0].family is None


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "c.py", "--workdir", "w", "--bogus"],
        ["train", "--config", "c.py", "--workdir", "w", "--config.optim.lr"],
        ["convert", "--hf", "h", "--out", "o", "--config.optim.lr=1"],
        ["train", "--workdir", "w"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_train_dispatch(fake_train, config_file, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    rc = cli.main(
        ["train", "--config", f"{config_file}:base", "--workdir", workdir, "--config.train.steps=3"]
    )
    assert rc == 0
    (kind, config, wd), *_ = fake_train
    assert kind == "train" and wd == workdir
    assert config.model.preset == "base" and config.train.steps == 3
    assert '"step": 3' in capsys.readouterr().out


def test_eval_dispatch(fake_train, config_file, tmp_path):
    assert cli.main(["eval", "--config", config_file, "--workdir", str(tmp_path)]) == 0
    assert fake_train[0][0] == "eval"


def test_bad_config_key_is_one_line_exit_2(fake_train, config_file, tmp_path, capsys):
    argv = ["train", "--config", config_file, "--workdir", str(tmp_path), "--config.optim.lrr=1"]
    assert cli.main(argv) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("xformers-jax: error: unknown config key 'optim.lrr'")
    assert "optim.lr" in lines[0]
    assert not fake_train  # Nothing ran.


@pytest.mark.parametrize(
    ("spec_suffix", "override", "pattern"),
    [
        (":huge", "train.steps=1", "unknown preset 'huge'"),
        ("", "train.steps=1.5", "'train.steps' expects int"),
        ("", "train.steps=0", "'train.steps' must be an int >= 1"),
    ],
)
def test_config_errors_one_line(
    fake_train, config_file, tmp_path, capsys, spec_suffix, override, pattern
):
    argv = ["train", "--config", config_file + spec_suffix, "--workdir", str(tmp_path)]
    assert cli.main([*argv, f"--config.{override}"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and pattern in lines[0]


def test_missing_config_file(fake_train, tmp_path, capsys):
    argv = ["train", "--config", str(tmp_path / "nope.py:tiny"), "--workdir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert _error_lines(capsys) == [
        f"xformers-jax: error: config file not found: {tmp_path}/nope.py"
    ]


def test_workdir_is_a_file(fake_train, config_file, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cli.main(["train", "--config", config_file, "--workdir", str(a_file)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "exists and is not a directory" in lines[0]
    assert cli.main(["train", "--config", config_file, "--workdir", str(a_file / "sub")]) == 2
    assert "is not a directory" in _error_lines(capsys)[0]
    assert not fake_train


def test_workdir_not_writable(config_file, tmp_path, fake_train, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    # Faked: chmod does not stop root, and tests often run as root in containers.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: os.fspath(p) != str(ro) and real_access(p, m))
    assert cli.main(["train", "--config", config_file, "--workdir", str(ro / "run")]) == 2
    assert "is not writable" in _error_lines(capsys)[0]
    assert cli.main(["eval", "--config", config_file, "--workdir", str(ro)]) == 2
    assert _error_lines(capsys) == [f"xformers-jax: error: workdir {ro} is not writable"]
    assert not fake_train


def test_os_errors_from_implementations(monkeypatch, tmp_path, capsys):
    mod = types.ModuleType("xformers_jax.checkpoint")

    def convert_command(hf_dir, out_dir, **kw):
        raise FileNotFoundError(2, "No such file or directory", os.path.join(hf_dir, "config.json"))

    def export_orbax_to_hf(checkpoint_dir, hf_out, **kw):
        raise config_lib.UserError(f"no checkpoint in {checkpoint_dir}\n(run train first)")

    mod.convert_command, mod.export_orbax_to_hf = convert_command, export_orbax_to_hf
    monkeypatch.setitem(sys.modules, "xformers_jax.checkpoint", mod)
    assert cli.main(["convert", "--hf", "hfdir", "--out", str(tmp_path)]) == 2
    assert _error_lines(capsys) == [
        "xformers-jax: error: No such file or directory: hfdir/config.json"
    ]
    assert cli.main(["export", "--checkpoint", "ck", "--hf-out", str(tmp_path)]) == 2
    assert _error_lines(capsys) == ["xformers-jax: error: no checkpoint in ck (run train first)"]


def test_bench_and_convert_dispatch(monkeypatch):
    seen = {}
    bench = types.ModuleType("xformers_jax.bench.train")
    bench.main = lambda families, out_dir, **kw: seen.update(bench=(families, out_dir, kw))
    bench.bench_config = lambda name, overrides: dict(name=name)
    ckpt = types.ModuleType("xformers_jax.checkpoint")
    ckpt.convert_command = lambda hf, out, **kw: seen.update(convert=(hf, out, kw))
    ckpt.export_orbax_to_hf = lambda ck, out, **kw: seen.update(export=(ck, out, kw))
    monkeypatch.setitem(sys.modules, "xformers_jax.bench.train", bench)
    monkeypatch.setitem(sys.modules, "xformers_jax.checkpoint", ckpt)
    assert cli.main(["bench", "--family", "yoso", "--out", "b"]) == 0
    assert cli.main(["convert", "--hf", "h", "--out", "o"]) == 0
    assert cli.main(["export", "--checkpoint", "c", "--hf-out", "e"]) == 0
    kw = dict(config="default", dtype="float32", overrides=None)
    convert = ("h", "o", dict(head=None, mesh=None, devices=None))
    export = ("c", "e", dict(dtype="float32", step=None))
    assert seen == {"bench": (["yoso"], "b", kw), "convert": convert, "export": export}


def test_bugs_still_raise(monkeypatch, config_file, tmp_path):
    """A plain ValueError from our code is a bug: it keeps its traceback."""
    mod = types.ModuleType("xformers_jax.train")

    def train_and_evaluate(config, workdir):
        raise ValueError("shape mismatch")

    mod.train_and_evaluate = train_and_evaluate
    monkeypatch.setitem(sys.modules, "xformers_jax.train", mod)
    with pytest.raises(ValueError, match="shape mismatch"):
        cli.main(["train", "--config", config_file, "--workdir", str(tmp_path)])
