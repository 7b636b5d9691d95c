"""A tiny test config: base_config + presets + placeholders (for the config_lib and CLI tests)."""

from ml_collections import config_dict

from xformers_jax import config_lib

PRESETS = {"tiny": 2, "base": 12}


def get_config(arg=None):
    c = config_lib.base_config()
    c.model.family = "xlm_roberta"
    c.model.preset = config_lib.parse_arg(arg, PRESETS, "tiny")
    c.model.num_layers = PRESETS[c.model.preset]
    c.model.dropout = config_dict.placeholder(float)
    c.model.max_len = config_dict.placeholder(int)
    return c
