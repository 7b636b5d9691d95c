"""A tiny YOSO masked-LM run in sampled (LSH) mode through the shared trainer lowers the loss."""

import importlib.util
import os

import pytest

from xformers_jax import models, train

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "yoso", "pretrain_mlm.py")


def tiny_yoso_config(corpus: str):
    """`configs/yoso/pretrain_mlm.py:tiny` shrunk to seconds per run (still sampled mode)."""
    spec = importlib.util.spec_from_file_location("yoso_pretrain_mlm", _CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.unlock()
    c.model.hidden_size = 32
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.intermediate_size = 64
    c.model.vocab_size = 2000
    c.model.hash_code_len = 4
    c.model.num_hash = 8
    c.data.vocab_size = 2000
    c.data.seq_len = 32
    c.data.train_files = [corpus]
    c.data.eval_files = [corpus]
    c.train.batch_size = 8
    c.train.steps = 60
    c.train.eval_every_steps = 1000
    c.train.eval_steps = 2
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 60
    c.log.every_steps = 10
    c.log.progress = False
    c.mesh.data = -1
    return c


def test_config_builds_both_presets():
    spec = importlib.util.spec_from_file_location("yoso_pretrain_mlm", _CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for preset in ("tiny", "base"):
        c = mod.get_config(preset)
        _, cfg, arch = models.build_model(c.model, c.task)
        assert arch == "YosoForMaskedLM" and cfg.max_position_embeddings == 4096


@pytest.mark.slow
def test_sampled_mode_mlm_lowers_loss(corpus, tmp_path):
    cfg = tiny_yoso_config(corpus)
    _, model_cfg, _ = models.build_model(cfg.model, cfg.task)
    assert not model_cfg.use_expectation
    result = train.train_and_evaluate(cfg, str(tmp_path))
    print("yoso sampled mlm eval loss", result["first_eval"]["loss"], result["final_eval"]["loss"])
    assert result["final_eval"]["loss"] < result["first_eval"]["loss"] - 0.3
