"""The `tiny` XLM-R-XL MLM config shrunk to test size (seconds per run); used in-process and by
subprocess tests through the CLI (`--config tests/configs/tiny_mlm.py`)."""

from xformers_jax import config_lib


def get_config(arg=None):
    pretrain = config_lib.config_module("../../configs/xlm_roberta/pretrain_mlm.py", __file__)
    c = pretrain.get_config("tiny")
    c.model.hidden_size = 32
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.intermediate_size = 64
    c.model.vocab_size = 2000
    c.model.max_position_embeddings = 40
    c.data.vocab_size = 2000
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.train.steps = 6
    c.train.eval_every_steps = 1000
    c.train.eval_steps = 2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.log.every_steps = 1
    c.log.progress = False
    c.mesh.data = -1
    return c
