"""Parity helpers for the tests against transformers' PyTorch models, defined once.

The tolerance (float32 on both sides, absolute 1e-4), the comparison of one output or a nested
tuple of outputs, and seeded random-init tiny HF models: built, perturbed so that norms and biases
are not ones/zeros (a wrong name map then shows), saved with `save_pretrained` and loaded back with
`xformers_jax.from_pretrained`. torch and transformers are imported only where a helper needs them,
so importing this module never requires them.
"""

from __future__ import annotations

import numpy as np

ATOL = 1e-4

# Tiny sizes shared by the tests; each family's tests add their own fields.
TINY_XLMR = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
TINY_MT5 = dict(
    vocab_size=100,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)


def assert_close(ours, theirs, what: str, atol: float = ATOL) -> float:
    """Asserts equal shapes and `|ours - theirs| <= atol` (rtol 0); returns the largest error.

    `theirs` may be a torch tensor or anything numpy reads; `what` names the output in the message.
    """
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0, err_msg=what)
    return float(np.max(np.abs(ours - theirs))) if ours.size else 0.0


def assert_tree_close(ours, theirs, what: str, atol: float = ATOL) -> None:
    """`assert_close` over nested tuples / lists (hidden states, attentions, mems)."""
    if isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs), what
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_tree_close(a, b, f"{what}[{i}]", atol)
    else:
        assert_close(ours, theirs, what, atol)


def perturb_norms_and_biases(model, scale: float = 0.1):
    """Adds `scale * N(0, 1)` to every bias and LayerNorm parameter of a torch model, in place:
    random-init norms and biases are ones / zeros, which would hide a wrong name map."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(scale * torch.randn_like(p))
    return model


def random_hf_model(model_cls, config, seed: int = 0, perturb: bool = True):
    """A seeded random-init transformers model in eval mode (`model_cls` a class or its name);
    norms and biases perturbed unless `perturb=False`."""
    import torch
    import transformers

    if isinstance(model_cls, str):
        model_cls = getattr(transformers, model_cls)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    return perturb_norms_and_biases(model) if perturb else model


def save_hf(model, path, safe: bool = True) -> str:
    """`model.save_pretrained(path)`; returns the path as a string."""
    model.save_pretrained(path, safe_serialization=safe)
    return str(path)


def load_hf(model, path, safe: bool = True, **kwargs):
    """Saves a transformers model to `path` and loads it with `xformers_jax.from_pretrained`."""
    import xformers_jax as xj

    return xj.from_pretrained(save_hf(model, path, safe), **kwargs)
