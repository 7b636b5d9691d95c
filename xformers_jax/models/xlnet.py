"""XLNet: two-stream relative-position attention with Transformer-XL memory (all HF heads).

Every layer attends with three score terms over the keys `[mems; h]`: content (`q + r_w_bias`
against content keys), position (`q + r_r_bias` against sinusoid relative-position keys, aligned by
the rel-shift) and segment (`q + r_s_bias` against a learned same / different segment embedding).
A content stream `h` (sees itself) and, for permutation LM, a query stream `g` (sees only its
context through `perm_mask`, starts from `mask_emb`) run through the same weights. Layers are
stacked with `nn.scan` carrying `(h, g)`; per-layer mems go in and come out of the scan.

Layouts: activations are batch-major (`[batch, length, d_model]`). Inside the model mems are
`[layers, batch, mem_len, d_model]`; at the `mems=` boundary of every head's `__call__` we accept
either that stacked array or HF's tuple of `[mem_len, batch, d_model]` per layer, and return HF's
tuple (`stack_mems` converts it back for a training loop).

Differences from transformers (documented in the README): `untie_r=False` really shares one set of
relative biases across layers (transformers keeps per-layer copies); `ForQuestionAnswering` returns
true log-probabilities (`hf_compat=True`: transformers' softmax probabilities); the query stream can
also start from an `inp_q` marking (original XLNet) when no `target_mapping` is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax.layers import MLP, DenseGeneral, LayerNorm, get_activation, param_init
from xformers_jax.models import outputs
from xformers_jax.models.common import (
    REMAT_POLICIES,
    cross_entropy_with_ignore,
    dtype_from_name,
    scan_layers,
)

ATTN_TYPES = ("bi", "uni")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index", "attn")
_NEG = 1e30  # transformers subtracts 1e30 * mask (not -inf): fully masked rows become uniform


@dataclasses.dataclass(frozen=True)
class XLNetConfig:
    """Hyper-parameters; field names are transformers' `XLNetConfig` names.

    `dtype`, `param_dtype`, `remat_policy` and `hf_compat` are ours and never written to
    config.json. `mem_len=None` keeps every past state (the mems grow, so shapes change per call).
    """

    model_type: str = "xlnet"
    vocab_size: int = 32000
    d_model: int = 1024
    n_layer: int = 24
    n_head: int = 16
    d_inner: int = 4096
    ff_activation: str = "gelu"
    untie_r: bool = True
    attn_type: str = "bi"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    mem_len: int | None = 512
    reuse_len: int | None = None
    use_mems_eval: bool = True
    use_mems_train: bool = False
    bi_data: bool = False
    clamp_len: int = -1
    same_length: bool = False
    summary_type: str = "last"
    summary_use_proj: bool = True
    summary_activation: str | None = "tanh"
    summary_last_dropout: float = 0.1
    summary_first_dropout: float = 0.0
    summary_proj_to_labels: bool = False
    start_n_top: int = 5
    end_n_top: int = 5
    pad_token_id: int = 5
    bos_token_id: int = 1
    eos_token_id: int = 2
    num_labels: int = 2
    problem_type: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    hf_compat: bool = False

    def __post_init__(self):
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        if self.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"summary_type must be one of {SUMMARY_TYPES}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}")
        get_activation(self.ff_activation)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def replace(self, **kw) -> XLNetConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> XLNetConfig:
        """Builds from a mapping, ignoring keys that are not fields (config.json extras)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> XLNetConfig:
        kw = dict(hf)
        if "id2label" in kw and "num_labels" not in kw:
            kw["num_labels"] = len(kw["id2label"])
        if "use_cache" in kw and "use_mems_eval" not in kw:  # transformers' deprecated name
            kw["use_mems_eval"] = kw["use_cache"]
        return cls.from_dict(kw)

    def to_hf_config(self) -> dict[str, Any]:
        skip = {"dtype", "param_dtype", "remat_policy", "hf_compat", "num_labels"}
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d["d_head"] = self.d_head
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d


_BASE = dict(vocab_size=32000, d_model=768, n_layer=12, n_head=12, d_inner=3072, mem_len=None)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, for the default run and the tests.
    "tiny": dict(vocab_size=8000, d_model=128, n_layer=4, n_head=4, d_inner=512, mem_len=32),
    # xlnet/xlnet-base-cased and xlnet/xlnet-large-cased.
    "base": _BASE,
    "large": dict(_BASE, d_model=1024, n_layer=24, n_head=16, d_inner=4096),
}


def architecture_name(config: XLNetConfig, class_name: str) -> str:
    del config
    return class_name


# --------------------------------------------------------------------------------------------------
# Position encoding, masks, the rel-shift.
# --------------------------------------------------------------------------------------------------


def relative_positional_encoding(
    qlen: int, klen: int, config: XLNetConfig, batch: int
) -> np.ndarray:
    """Sinusoids of the relative distances `klen .. -qlen+1` (bi) or `klen .. 0` (uni).

    Returns `[1 or batch, R, d_model]` float32; with `bi_data` the first half of the batch gets
    forward distances, the second half backward ones (`batch` must then be even).
    """
    end = -qlen if config.attn_type == "bi" else -1
    inv_freq = 1.0 / 10000 ** (np.arange(0, config.d_model, 2.0) / config.d_model)

    def emb(seq):
        if config.clamp_len > 0:
            seq = np.clip(seq, -config.clamp_len, config.clamp_len)
        x = np.einsum("i,d->id", seq.astype(np.float64), inv_freq)
        return np.concatenate([np.sin(x), np.cos(x)], -1).astype(np.float32)

    fwd = emb(np.arange(klen, end, -1.0))
    if not config.bi_data:
        return fwd[None]
    if batch % 2:
        raise ValueError(f"bi_data needs an even batch size, got {batch}")
    bwd = emb(np.arange(-klen, -end, 1.0))
    return np.repeat(np.stack([fwd, bwd]), batch // 2, axis=0)


def rel_shift(x: jax.Array, klen: int) -> jax.Array:
    """Aligns position scores to keys: `[b, n, i, R] -> [b, n, i, klen]`, out[i,j] = x[i,qlen-i+j].

    The Transformer-XL reshape trick (no gather): drop one row of the transposed view.
    """
    b, n, i, r = x.shape
    x = x.reshape(b, n, r, i)[:, :, 1:]
    return x.reshape(b, n, i, r - 1)[..., :klen]


def causal_mask(qlen: int, mlen: int, same_length: bool) -> np.ndarray:
    """`[qlen, mlen + qlen]` bool, True = masked: no future keys (uni), and with `same_length`
    every query sees the same number of keys."""
    q = np.arange(qlen)[:, None]
    k = np.arange(mlen + qlen)[None, :]
    mask = k > q + mlen
    if same_length:
        mask |= k < q
    return mask


def attention_masks(cfg, qlen, mlen, input_mask, perm_mask):
    """(h-stream mask, g-stream mask), `[b or 1, qlen, mlen + qlen]` bool (True = masked) or None.

    Args:
      input_mask: `[b, qlen]` 1 at padding (keys), or None.
      perm_mask: `[b, qlen, qlen]` 1 where query i may not see token j, or None.
    """
    mask = None
    if cfg.attn_type == "uni":
        mask = jnp.asarray(causal_mask(qlen, mlen, cfg.same_length))[None]
    data = None
    if input_mask is not None:
        data = input_mask[:, None, :] > 0
    if perm_mask is not None:
        data = perm_mask > 0 if data is None else data | (perm_mask > 0)
    if data is not None:
        data = jnp.pad(data, ((0, 0), (0, 0), (mlen, 0)))  # mems are always visible
        mask = data if mask is None else mask | data
    if mask is None:
        return None, None
    # The content stream always sees its own token.
    eye = jnp.asarray(np.eye(qlen, mlen + qlen, mlen, dtype=bool))[None]
    return mask & ~eye, mask


# --------------------------------------------------------------------------------------------------
# Attention and the layer.
# --------------------------------------------------------------------------------------------------


class RelativeBiases(nn.Module):
    """`r_w_bias`, `r_r_bias`, `r_s_bias`, each `[heads, head_dim]` (content, position, segment)."""

    config: XLNetConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        init = param_init(nn.initializers.normal(cfg.initializer_range), ("heads", "kv"))
        shape, pd = (cfg.n_head, cfg.d_head), dtype_from_name(cfg.param_dtype)
        return tuple(self.param(n, init, shape, pd) for n in ("r_w_bias", "r_r_bias", "r_s_bias"))


class RelativeAttention(nn.Module):
    """Two-stream relative multi-head attention + output projection, residual and LayerNorm.

    Params `q k v o r` are `[d_model, heads, head_dim]` (HF's layout); `seg_embed`
    `[2, heads, head_dim]`; the relative biases here when `untie_r`, else passed in (shared).
    """

    config: XLNetConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        pd = dtype_from_name(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        shape = (cfg.d_model, cfg.n_head, cfg.d_head)
        axes = ("embed", "heads", "kv")
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, self.param(name, param_init(init, axes), shape, pd))
        self.seg_embed = self.param(
            "seg_embed", param_init(init, (None, "heads", "kv")), (2, cfg.n_head, cfg.d_head), pd
        )
        if cfg.untie_r:
            self.biases = RelativeBiases(cfg, name="biases")
        dt = dtype_from_name(cfg.dtype)
        self.layer_norm = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pd)
        self.drop = nn.Dropout(cfg.dropout)

    def _proj(self, x, w):
        dt = dtype_from_name(self.config.dtype)
        return jnp.einsum("...h,hnd->...nd", jnp.asarray(x, dt), jnp.asarray(w, dt))

    def core(self, q, k, v, kr, seg, mask, head_mask, biases):
        """Scores, softmax, weighted values.

        Args:
          q: `[b, i, n, d]`; k, v: `[b, j, n, d]`; kr: `[b or 1, R, n, d]` position keys.
          seg: `[b, i, j]` bool "different segment", or None (no segment term).
          mask: `[b or 1, i, j]` bool, True = masked, or None.
          head_mask: `[n]` or None.

        Returns:
          (`[b, i, n, d]` attention output, `[b, n, i, j]` float32 probs).
        """
        cfg = self.config
        dt = dtype_from_name(cfg.dtype)
        r_w, r_r, r_s = (jnp.asarray(b, dt) for b in biases)
        ac = jnp.einsum("bind,bjnd->bnij", q + r_w, k)
        if kr.shape[0] == 1:
            bd = jnp.einsum("bind,rnd->bnir", q + r_r, kr[0])
        else:
            bd = jnp.einsum("bind,brnd->bnir", q + r_r, kr)
        score = ac.astype(jnp.float32) + rel_shift(bd, k.shape[1]).astype(jnp.float32)
        if seg is not None:
            ef = jnp.einsum("bind,snd->bnis", q + r_s, jnp.asarray(self.seg_embed, dt))
            ef = ef.astype(jnp.float32)
            score = score + jnp.where(seg[:, None], ef[..., 1:], ef[..., :1])
        score = score / np.sqrt(cfg.d_head)
        if mask is not None:
            score = score - _NEG * mask[:, None].astype(jnp.float32)
        probs = jax.nn.softmax(score, axis=-1)
        p = self.drop(probs, deterministic=self.deterministic)
        if head_mask is not None:
            p = p * head_mask[None, :, None, None]
        out = jnp.einsum("bnij,bjnd->bind", p.astype(dt), v)
        return out, probs

    def post(self, x, attn_vec):
        out = jnp.einsum("bind,hnd->bih", attn_vec, jnp.asarray(self.o, attn_vec.dtype))
        return self.layer_norm(self.drop(out, deterministic=self.deterministic) + x)

    def __call__(self, h, g, mem, ctx, head_mask, shared_biases):
        biases = self.biases() if self.config.untie_r else shared_biases
        cat = h if mem is None else jnp.concatenate([jnp.asarray(mem, h.dtype), h], axis=1)
        k, v = self._proj(cat, self.k), self._proj(cat, self.v)
        kr = self._proj(ctx["pos"], self.r)
        args = (k, v, kr, ctx["seg"])
        vec_h, probs_h = self.core(self._proj(h, self.q), *args, ctx["mask_h"], head_mask, biases)
        out_h = self.post(h, vec_h)
        if g is None:
            return out_h, None, probs_h
        q_g = self._proj(g, self.q)
        tm = ctx["target_mapping"]
        if tm is not None:  # predicted slots m -> the positions l they stand for, and back
            q_g = jnp.einsum("bmnd,bml->blnd", q_g, tm.astype(q_g.dtype))
        vec_g, probs_g = self.core(q_g, *args, ctx["mask_g"], head_mask, biases)
        if tm is not None:
            vec_g = jnp.einsum("blnd,bml->bmnd", vec_g, tm.astype(vec_g.dtype))
        return out_h, self.post(g, vec_g), (probs_h, probs_g)


class Layer(nn.Module):
    """Attention then feed-forward (post-LN), shared by both streams; scanned over `layers`.

    Scan signature: `((h, g), mem, head_mask, ctx, shared_biases) -> ((h, g), per-layer ys)`
    with ys = (new mem `[b, m', d]` or None, h, g, attention probs or None).
    """

    config: XLNetConfig
    deterministic: bool = True
    use_mems: bool = False
    output_hidden_states: bool = False
    output_attentions: bool = False

    @nn.compact
    def __call__(self, carry, mem, head_mask, ctx, shared_biases):
        cfg = self.config
        h, g = carry
        new_mem = self._cache(h, mem) if self.use_mems else None
        attn = RelativeAttention(cfg, self.deterministic, name="rel_attn")
        h, g, probs = attn(h, g, mem, ctx, head_mask, shared_biases)
        dt, pd = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        mlp = MLP(cfg.d_inner, cfg.ff_activation, dropout_rate=cfg.dropout, dtype=dt,
                  param_dtype=pd, kernel_init=nn.initializers.normal(cfg.initializer_range),
                  name="ff")  # fmt: skip
        norm = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pd, name="ff_norm")
        drop = nn.Dropout(cfg.dropout)

        def ff(x):
            y = drop(mlp(x, self.deterministic), deterministic=self.deterministic)
            return nn.with_logical_constraint(norm(y + x), ("act_batch", "act_length", "act_embed"))

        h = ff(h)
        g = None if g is None else ff(g)
        keep = self.output_hidden_states
        ys = (new_mem, h if keep else None, g if keep else None)
        return (h, g), (*ys, probs if self.output_attentions else None)

    def _cache(self, h, mem):
        """This layer's input (first `reuse_len` tokens) appended to its mems, last `mem_len`."""
        cfg = self.config
        cur = h[:, : cfg.reuse_len] if cfg.reuse_len else h
        cur = jax.lax.stop_gradient(cur)
        new = cur if mem is None else jnp.concatenate([jnp.asarray(mem, cur.dtype), cur], axis=1)
        return new[:, -cfg.mem_len :] if cfg.mem_len else new


# --------------------------------------------------------------------------------------------------
# The base model.
# --------------------------------------------------------------------------------------------------


def stack_mems(mems: Any) -> jax.Array | None:
    """HF's tuple of `[mem_len, batch, d]` per layer (or our stacked array) ->
    `[layers, batch, mem_len, d]`."""
    if mems is None:
        return None
    if isinstance(mems, (tuple, list)):
        return jnp.stack([jnp.swapaxes(jnp.asarray(m), 0, 1) for m in mems])
    mems = jnp.asarray(mems)
    if mems.ndim != 4:
        raise ValueError(
            f"mems must be HF's per-layer tuple or [layers, b, m, d], got {mems.shape}"
        )
    return mems


def unstack_mems(mems: jax.Array | None) -> tuple | None:
    """`[layers, batch, mem_len, d]` -> HF's tuple of `[mem_len, batch, d]`."""
    return None if mems is None else tuple(jnp.swapaxes(m, 0, 1) for m in mems)


class XLNetModel(nn.Module):
    """The base model (HF `XLNetModel`).

    Inputs are `[batch, length]` (HF's names: `perm_mask` `[b, l, l]`, `target_mapping`
    `[b, num_predict, l]`, `mems` see the module docstring). `last_hidden_state` is the query
    stream `[b, num_predict, d]` when two streams run, else `[b, l, d]`. `mems` come out when
    `use_mems` (default `use_mems_eval` / `use_mems_train` by `deterministic`).
    `return_stacked_mems=True` returns them as `[layers, b, mem_len, d]` instead (training loops).
    """

    config: XLNetConfig

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        mems=None,
        perm_mask=None,
        target_mapping=None,
        token_type_ids=None,
        input_mask=None,
        head_mask=None,
        inputs_embeds=None,
        inp_q=None,
        use_mems: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        return_stacked_mems: bool = False,
    ) -> outputs.XLNetModelOutput:
        cfg = self.config
        dt, pd = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and input_mask is not None:
            raise ValueError("pass only one of attention_mask (0 = pad) and input_mask (1 = pad)")
        if use_mems is None:
            use_mems = cfg.use_mems_eval if deterministic else cfg.use_mems_train
        init = nn.initializers.normal(cfg.initializer_range)
        table = self.param("word_embedding", param_init(init, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), pd)  # fmt: skip
        if input_ids is not None:
            word = jnp.take(jnp.asarray(table, dt), input_ids, axis=0)
        else:
            word = jnp.asarray(inputs_embeds, dt)
        batch, qlen = word.shape[:2]
        mems = stack_mems(mems)
        mlen = 0 if mems is None else mems.shape[2]
        if attention_mask is not None:
            input_mask = 1 - jnp.asarray(attention_mask)
        mask_h, mask_g = attention_masks(cfg, qlen, mlen, input_mask, perm_mask)

        drop = nn.Dropout(cfg.dropout)
        h = drop(word, deterministic=deterministic)
        g = None
        mask_emb = self.param("mask_emb", param_init(init, (None, None, "embed")),
                              (1, 1, cfg.d_model), pd)  # fmt: skip
        mask_emb = jnp.asarray(mask_emb, dt)
        if target_mapping is not None:
            g = jnp.broadcast_to(mask_emb, (batch, target_mapping.shape[1], cfg.d_model))
        elif inp_q is not None:  # original XLNet: mask_emb where inp_q = 1, the token elsewhere
            q = jnp.asarray(inp_q, dt)[..., None]
            g = q * mask_emb + (1 - q) * word
        if g is not None:
            g = drop(g, deterministic=deterministic)

        seg = None
        if token_type_ids is not None:  # no ids: no segment term at all (as transformers)
            tt = jnp.asarray(token_type_ids)
            cat = jnp.pad(tt, ((0, 0), (mlen, 0)))  # mems count as segment 0
            seg = tt[:, :, None] != cat[:, None, :]
        pos = jnp.asarray(relative_positional_encoding(qlen, mlen + qlen, cfg, batch), dt)
        ctx = dict(mask_h=mask_h, mask_g=mask_g, seg=seg, target_mapping=target_mapping,
                   pos=drop(pos, deterministic=deterministic))  # fmt: skip
        shared = None if cfg.untie_r else RelativeBiases(cfg, name="biases")()

        emb_h, emb_g = h, g
        (h, g), (new_mems, hs, gs, probs) = scan_layers(
            Layer, cfg.n_layer, cfg.remat_policy,
            dict(config=cfg, deterministic=deterministic, use_mems=use_mems,
                 output_hidden_states=output_hidden_states, output_attentions=output_attentions),
            name="layers", in_axes=(0, 0, nn.broadcast, nn.broadcast),
        )((h, g), mems, _layer_head_mask(head_mask, cfg), ctx, shared)  # fmt: skip
        out = drop(g if g is not None else h, deterministic=deterministic)

        hidden = attentions = None
        if output_hidden_states:
            # HF: every layer's input, then the last output; (h, g) pairs flattened.
            h_all = [emb_h, *(hs[i] for i in range(cfg.n_layer))]
            if g is None:
                hidden = tuple(h_all)
            else:
                g_all = [emb_g, *(gs[i] for i in range(cfg.n_layer))]
                hidden = tuple(x for pair in zip(h_all, g_all) for x in pair)
        if output_attentions:
            attentions = tuple(jax.tree.map(lambda a, i=i: a[i], probs) for i in range(cfg.n_layer))
        if use_mems and not return_stacked_mems:
            new_mems = unstack_mems(new_mems)
        return outputs.XLNetModelOutput(
            last_hidden_state=out, mems=new_mems if use_mems else None,
            hidden_states=hidden, attentions=attentions,
        )  # fmt: skip


def _layer_head_mask(head_mask, cfg: XLNetConfig):
    """HF head_mask `[heads]` or `[layers, heads]` (1 keep, 0 drop) -> `[layers, heads]` or None."""
    if head_mask is None:
        return None
    head_mask = jnp.asarray(head_mask, jnp.float32)
    if head_mask.ndim == 1:
        head_mask = jnp.broadcast_to(head_mask, (cfg.n_layer, head_mask.shape[0]))
    if head_mask.shape != (cfg.n_layer, cfg.n_head):
        raise ValueError(f"head_mask must be [heads] or [layers, heads], got {head_mask.shape}")
    return head_mask


# --------------------------------------------------------------------------------------------------
# Heads.
# --------------------------------------------------------------------------------------------------

# The base model's inputs every head forwards unchanged.
_BASE_ARGS = (
    "input_ids", "attention_mask", "mems", "perm_mask", "target_mapping", "token_type_ids",
    "input_mask", "head_mask", "inputs_embeds", "use_mems", "output_attentions",
    "output_hidden_states", "deterministic", "return_stacked_mems",
)  # fmt: skip


def _base(cfg: XLNetConfig, loc: Mapping[str, Any], **override) -> outputs.XLNetModelOutput:
    """Runs `XLNetModel` (named `transformer`, HF's base_model_prefix) on a head's arguments."""
    kw = {k: loc[k] for k in _BASE_ARGS if k in loc}
    kw.update(override)
    return XLNetModel(cfg, name="transformer")(**kw)


def _dense(cfg: XLNetConfig, features: int, axes: tuple, name: str, use_bias: bool = True):
    return DenseGeneral(
        features, axes, use_bias=use_bias, dtype=dtype_from_name(cfg.dtype),
        param_dtype=dtype_from_name(cfg.param_dtype),
        kernel_init=nn.initializers.normal(cfg.initializer_range), name=name,
    )  # fmt: skip


def _extras(out: outputs.XLNetModelOutput) -> dict[str, Any]:
    return dict(mems=out.mems, hidden_states=out.hidden_states, attentions=out.attentions)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x[b, index[b]]`: `[b, l, ...]`, `[b]` int -> `[b, ...]`."""
    return jnp.take_along_axis(x, index.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


class LMBias(nn.Module):
    """The `[vocab]` output bias of the tied LM head (HF `lm_loss.bias`)."""

    config: XLNetConfig

    @nn.compact
    def __call__(self):
        pd = dtype_from_name(self.config.param_dtype)
        init = param_init(nn.initializers.zeros, ("vocab",))
        return self.param("bias", init, (self.config.vocab_size,), pd)


class XLNetLMHeadModel(nn.Module):
    """Tied LM head (HF `XLNetLMHeadModel`): `logits` `[b, num_predict or l, vocab]`; `labels`
    (`-100` = ignore) give the mean cross-entropy. `generate` uses the permutation trick.

    Generation (`init_decoding` / `decode_step`, driven by `xformers_jax.decoding`) keeps the
    sequence in a fixed `[b, max_length]` token buffer: each step puts transformers' dummy token
    after the last one, hides it and every later slot from all queries with `perm_mask`, and
    predicts it through a one-hot `target_mapping`. Shapes never change, so the step compiles
    once; it recomputes the whole buffer each step, which equals transformers' `generate` with
    `use_mems=False` (its `use_mems=True` path re-uses bidirectionally computed mems, not done
    here). As in transformers, the prompt's `attention_mask` is ignored: pass unpadded prompts.
    """

    config: XLNetConfig
    can_generate = True
    decoder_only = True

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, mems=None, perm_mask=None,
        target_mapping=None, token_type_ids=None, input_mask=None, head_mask=None,
        inputs_embeds=None, labels=None, inp_q=None, use_mems: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, return_stacked_mems: bool = False,
    ) -> outputs.XLNetLMHeadModelOutput:  # fmt: skip
        cfg = self.config
        out = _base(cfg, locals(), inp_q=inp_q)
        table = nn.meta.unbox(self.variables["params"]["transformer"]["word_embedding"])
        dt = dtype_from_name(cfg.dtype)
        x = out.last_hidden_state
        logits = jnp.einsum("...d,vd->...v", x, jnp.asarray(table, dt))
        logits = logits + jnp.asarray(LMBias(cfg, name="lm_loss")(), dt)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
        return outputs.XLNetLMHeadModelOutput(loss=loss, logits=logits, **_extras(out))

    def init_decoding(self, input_ids, attention_mask, max_length: int) -> dict[str, Any]:
        """The token buffer `tokens` `[b, max_length]` holding the prompt (zeros after it).

        `attention_mask` is ignored, as transformers' `prepare_inputs_for_generation` drops it.
        """
        del attention_mask
        b, p = input_ids.shape
        buf = jnp.zeros((b, max_length), jnp.int32).at[:, :p].set(input_ids.astype(jnp.int32))
        return dict(tokens=buf)

    def decode_step(self, tokens, index, context):
        """Predicts slot `index + 1` from slots `0..index` (the permutation trick, fixed shapes).

        Args:
          tokens: `[b]` the token at slot `index`.
          index: scalar int slot (at most `max_length - 2`, so the dummy slot exists).
          context: `tokens` `[b, max_length]` from `init_decoding` or a previous step.

        Returns:
          `(logits [b, vocab] float32, updated context)`.
        """
        buf = jax.lax.dynamic_update_slice_in_dim(
            context["tokens"], tokens[:, None].astype(jnp.int32), index, 1
        )
        b, length = buf.shape
        slots = jnp.arange(length)
        # transformers' dummy (token 0) sits right after the last token; later slots hold stale
        # or no tokens: every query is blind to both, so they act as if absent.
        ids = jnp.where(slots[None] == index + 1, 0, buf)
        hidden = (slots > index).astype(jnp.float32)
        perm_mask = jnp.broadcast_to(hidden[None, None], (b, length, length))
        target = jnp.broadcast_to((slots == index + 1).astype(jnp.float32)[None, None],
                                  (b, 1, length))  # fmt: skip
        out = self(ids, perm_mask=perm_mask, target_mapping=target, use_mems=False)
        return out.logits[:, 0].astype(jnp.float32), dict(tokens=buf)


class SequenceSummary(nn.Module):
    """One vector per sequence (HF `XLNetSequenceSummary`): `[b, l, d] -> [b, d or classes]`.

    `summary_type`: `last`, `first`, `mean`, `cls_index` (the token at `cls_index`, default the
    last) or `attn` (original XLNet: a learned query attends over the sequence, padding masked;
    transformers raises NotImplementedError for it). Then the optional projection, activation and
    dropouts.
    """

    config: XLNetConfig
    num_classes: int | None = None

    @nn.compact
    def __call__(self, x, cls_index=None, pad_mask=None, deterministic: bool = True):
        cfg = self.config
        kind = cfg.summary_type
        if kind == "last":
            out = x[:, -1]
        elif kind == "first":
            out = x[:, 0]
        elif kind == "mean":
            out = jnp.mean(x, axis=1)
        elif kind == "cls_index":
            if cls_index is None:
                out = x[:, -1]
            else:
                out = _gather(x, jnp.asarray(cls_index, jnp.int32))
        else:
            out = self._attn(x, pad_mask, deterministic)
        if cfg.summary_first_dropout > 0:
            out = nn.Dropout(cfg.summary_first_dropout)(out, deterministic=deterministic)
        if cfg.summary_use_proj:
            n = self.num_classes if cfg.summary_proj_to_labels and self.num_classes else None
            out = _dense(cfg, n or cfg.d_model, ("embed", "mlp"), "summary")(out)
        if cfg.summary_activation:
            out = get_activation(cfg.summary_activation)(out)
        if cfg.summary_last_dropout > 0:
            out = nn.Dropout(cfg.summary_last_dropout)(out, deterministic=deterministic)
        return out

    def _attn(self, x, pad_mask, deterministic):
        """Multi-head attention from a learned `[d]` query; output proj + LayerNorm, no residual."""
        cfg = self.config
        dt, pd = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        shape, axes = (cfg.d_model, cfg.n_head, cfg.d_head), ("embed", "heads", "kv")
        w = {n: jnp.asarray(self.param(n, param_init(init, axes), shape, pd), dt) for n in "qkvo"}
        query = self.param("summary_bias", param_init(init, ("embed",)), (cfg.d_model,), pd)
        q = jnp.einsum("h,hnd->nd", jnp.asarray(query, dt), w["q"])
        k = jnp.einsum("blh,hnd->blnd", x, w["k"])
        v = jnp.einsum("blh,hnd->blnd", x, w["v"])
        score = jnp.einsum("nd,blnd->bnl", q, k).astype(jnp.float32) / np.sqrt(cfg.d_head)
        if pad_mask is not None:
            score = score - _NEG * pad_mask[:, None, :].astype(jnp.float32)
        probs = nn.Dropout(cfg.dropout)(jax.nn.softmax(score, -1), deterministic=deterministic)
        out = jnp.einsum("bnl,blnd,hnd->bh", probs.astype(dt), v, w["o"])
        norm = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pd, name="attn_norm")
        return norm(nn.Dropout(cfg.dropout)(out, deterministic=deterministic))


def _pad_mask(attention_mask, input_mask):
    """`[b, l]` bool, True at padding, or None."""
    if attention_mask is not None:
        return jnp.asarray(attention_mask) == 0
    return None if input_mask is None else jnp.asarray(input_mask) > 0


def _classification_loss(cfg: XLNetConfig, logits, labels):
    """HF's `problem_type` rule: regression (1 label), single-label (int labels) or multi-label."""
    kind = cfg.problem_type
    if kind is None:
        if cfg.num_labels == 1:
            kind = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            kind = "single_label_classification"
        else:
            kind = "multi_label_classification"
    logits = logits.astype(jnp.float32)
    if kind == "regression":
        labels = labels.astype(jnp.float32)
        if cfg.num_labels == 1:
            return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels)) ** 2)
        return jnp.mean((logits - labels) ** 2)
    if kind == "single_label_classification":
        return cross_entropy_with_ignore(logits.reshape(-1, cfg.num_labels), labels.reshape(-1))
    labels = labels.astype(jnp.float32)
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))))


class XLNetForSequenceClassification(nn.Module):
    """SequenceSummary + `logits_proj` (HF `XLNetForSequenceClassification`): `[b, num_labels]`."""

    config: XLNetConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, mems=None, perm_mask=None,
        target_mapping=None, token_type_ids=None, input_mask=None, head_mask=None,
        inputs_embeds=None, labels=None, use_mems: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, return_stacked_mems: bool = False,
    ) -> outputs.XLNetLMHeadModelOutput:  # fmt: skip
        cfg = self.config
        out = _base(cfg, locals())
        pad = _pad_mask(attention_mask, input_mask)
        x = SequenceSummary(cfg, cfg.num_labels, name="sequence_summary")(
            out.last_hidden_state, pad_mask=pad, deterministic=deterministic
        )
        logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "logits_proj")(x)
        loss = None if labels is None else _classification_loss(cfg, logits, jnp.asarray(labels))
        return outputs.XLNetForSequenceClassificationOutput(loss=loss, logits=logits,
                                                            **_extras(out))  # fmt: skip


class XLNetForTokenClassification(nn.Module):
    """Per-token `classifier` (HF `XLNetForTokenClassification`): `[b, l, num_labels]`."""

    config: XLNetConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, mems=None, perm_mask=None,
        target_mapping=None, token_type_ids=None, input_mask=None, head_mask=None,
        inputs_embeds=None, labels=None, use_mems: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, return_stacked_mems: bool = False,
    ) -> outputs.XLNetLMHeadModelOutput:  # fmt: skip
        cfg = self.config
        out = _base(cfg, locals())
        logits = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(
            out.last_hidden_state
        )
        loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
        return outputs.XLNetForTokenClassificationOutput(loss=loss, logits=logits,
                                                         **_extras(out))  # fmt: skip


class XLNetForMultipleChoice(nn.Module):
    """Choices `[b, choices, l]` flattened through the base model, SequenceSummary and a 1-unit
    `logits_proj` (HF `XLNetForMultipleChoice`): `logits` `[b, choices]`."""

    config: XLNetConfig

    @nn.compact
    def __call__(
        self, input_ids=None, token_type_ids=None, input_mask=None, attention_mask=None,
        mems=None, perm_mask=None, target_mapping=None, labels=None, head_mask=None,
        inputs_embeds=None, use_mems: bool | None = None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
        return_stacked_mems: bool = False,
    ) -> outputs.XLNetLMHeadModelOutput:  # fmt: skip
        cfg = self.config
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        n_choices = ref.shape[1]

        def flat(x):
            return None if x is None else jnp.reshape(x, (-1, *x.shape[2:]))

        loc = dict(locals())
        for k in ("input_ids", "token_type_ids", "input_mask", "attention_mask", "inputs_embeds"):
            loc[k] = flat(loc[k])
        out = _base(cfg, loc)
        pad = _pad_mask(loc["attention_mask"], loc["input_mask"])
        x = SequenceSummary(cfg, cfg.num_labels, name="sequence_summary")(
            out.last_hidden_state, pad_mask=pad, deterministic=deterministic
        )
        logits = _dense(cfg, 1, ("embed", "classes"), "logits_proj")(x).reshape(-1, n_choices)
        loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
        return outputs.XLNetForMultipleChoiceOutput(loss=loss, logits=logits, **_extras(out))


def _qa_span_loss(start_logits, end_logits, start_positions, end_positions):
    """HF's simple-QA loss: positions clamped to `[0, l]`, `l` ignored, mean of the two."""
    n = start_logits.shape[1]
    s = jnp.clip(jnp.asarray(start_positions).reshape(-1), 0, n)
    e = jnp.clip(jnp.asarray(end_positions).reshape(-1), 0, n)
    return (
        cross_entropy_with_ignore(start_logits, s, ignore_index=n)
        + cross_entropy_with_ignore(end_logits, e, ignore_index=n)
    ) / 2


class XLNetForQuestionAnsweringSimple(nn.Module):
    """`qa_outputs` span logits (HF `XLNetForQuestionAnsweringSimple`): `start_logits`,
    `end_logits` `[b, l]`."""

    config: XLNetConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, mems=None, perm_mask=None,
        target_mapping=None, token_type_ids=None, input_mask=None, head_mask=None,
        inputs_embeds=None, start_positions=None, end_positions=None,
        use_mems: bool | None = None, output_attentions: bool = False,
        output_hidden_states: bool = False, deterministic: bool = True,
        return_stacked_mems: bool = False,
    ) -> outputs.XLNetForQuestionAnsweringSimpleOutput:  # fmt: skip
        cfg = self.config
        out = _base(cfg, locals())
        if cfg.num_labels != 2:  # transformers builds qa_outputs with num_labels, splits it in 2
            raise ValueError(
                f"XLNetForQuestionAnsweringSimple needs num_labels=2, not {cfg.num_labels}"
            )
        logits = _dense(cfg, 2, ("embed", "classes"), "qa_outputs")(out.last_hidden_state)
        start, end = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = _qa_span_loss(start, end, start_positions, end_positions)
        return outputs.XLNetForQuestionAnsweringSimpleOutput(
            loss=loss, start_logits=start, end_logits=end, **_extras(out)
        )


def _p_masked(x, p_mask):
    """HF's `x * (1 - p_mask) - 1e30 * p_mask` (1 = position that cannot be an answer)."""
    if p_mask is None:
        return x
    p = jnp.asarray(p_mask, jnp.float32)
    return x.astype(jnp.float32) * (1 - p) - _NEG * p


class PoolerEndLogits(nn.Module):
    """End logits from `[hidden; start state]`: dense_0, tanh, LayerNorm, dense_1. `[..., l]`."""

    config: XLNetConfig

    @nn.compact
    def __call__(self, x, start_states, p_mask=None):
        cfg = self.config
        y = _dense(cfg, cfg.d_model, ("mlp", "embed"), "dense_0")(
            jnp.concatenate([x, start_states], -1)
        )
        dt, pd = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        y = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pd, name="norm")(jnp.tanh(y))
        return _p_masked(_dense(cfg, 1, ("embed", "classes"), "dense_1")(y)[..., 0], p_mask)


class PoolerAnswerClass(nn.Module):
    """SQuAD 2.0 answerability logit from `[start state; cls state]`. `[b]`."""

    config: XLNetConfig

    @nn.compact
    def __call__(self, x, start_states, cls_index=None):
        cfg = self.config
        cls = x[:, -1] if cls_index is None else _gather(x, jnp.asarray(cls_index, jnp.int32))
        y = _dense(cfg, cfg.d_model, ("mlp", "embed"), "dense_0")(
            jnp.concatenate([start_states, cls], -1)
        )
        return _dense(cfg, 1, ("embed", "classes"), "dense_1", use_bias=False)(jnp.tanh(y))[..., 0]


class XLNetForQuestionAnswering(nn.Module):
    """SQuAD 2.0 head with start / end top-k beam and an answer class (HF
    `XLNetForQuestionAnswering`).

    With `start_positions` and `end_positions`: `loss` only (end logits conditioned on the true
    start; plus half the BCE answer-class loss when `cls_index` and `is_impossible` are given).
    Otherwise: `start_top_log_probs`, `start_top_index` `[b, start_n_top]`, `end_top_log_probs`,
    `end_top_index` `[b, end_n_top * start_n_top]`, `cls_logits` `[b]`. The "log_probs" are true
    log-probabilities; `hf_compat=True` gives transformers' softmax probabilities instead.
    `p_mask` `[b, l]`: 1 where the answer cannot be.
    """

    config: XLNetConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, mems=None, perm_mask=None,
        target_mapping=None, token_type_ids=None, input_mask=None, head_mask=None,
        inputs_embeds=None, start_positions=None, end_positions=None, is_impossible=None,
        cls_index=None, p_mask=None, use_mems: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, return_stacked_mems: bool = False,
    ) -> outputs.XLNetForQuestionAnsweringOutput:  # fmt: skip
        cfg = self.config
        out = _base(cfg, locals())
        x = out.last_hidden_state
        start_logits = _p_masked(
            _dense(cfg, 1, ("embed", "classes"), "start_logits")(x)[..., 0], p_mask
        )
        end_pool = PoolerEndLogits(cfg, name="end_logits")
        answer = PoolerAnswerClass(cfg, name="answer_class")
        if start_positions is not None and end_positions is not None:
            sp = jnp.asarray(start_positions, jnp.int32).reshape(-1)
            start_states = jnp.broadcast_to(_gather(x, sp)[:, None], x.shape)
            end_logits = end_pool(x, start_states, p_mask)
            loss = (
                cross_entropy_with_ignore(start_logits, sp)
                + cross_entropy_with_ignore(end_logits, jnp.asarray(end_positions).reshape(-1))
            ) / 2
            if cls_index is not None and is_impossible is not None:
                cls_logits = answer(x, _gather(x, sp), jnp.asarray(cls_index).reshape(-1))
                y = jnp.asarray(is_impossible, jnp.float32).reshape(-1)
                z = cls_logits.astype(jnp.float32)
                bce = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
                loss = loss + 0.5 * jnp.mean(bce)
            return outputs.XLNetForQuestionAnsweringOutput(loss=loss, **_extras(out))

        b, n, d = x.shape
        # At most the sequence length (transformers fails on shorter sequences).
        k_start, k_end = min(cfg.start_n_top, n), min(cfg.end_n_top, n)
        start_lp = jax.nn.log_softmax(start_logits.astype(jnp.float32), -1)
        start_top_lp, start_top_index = jax.lax.top_k(start_lp, k_start)  # [b, ks]
        start_states = jnp.take_along_axis(x, start_top_index[..., None], axis=1)  # [b, ks, d]
        start_states = jnp.broadcast_to(start_states[:, None], (b, n, k_start, d))
        x_exp = jnp.broadcast_to(x[:, :, None], (b, n, k_start, d))
        pm = None if p_mask is None else jnp.asarray(p_mask)[:, :, None]
        end_logits = end_pool(x_exp, start_states, pm)  # [b, l, ks]
        end_lp = jax.nn.log_softmax(end_logits.astype(jnp.float32), axis=1)
        end_top_lp, end_top_index = jax.lax.top_k(jnp.swapaxes(end_lp, 1, 2), k_end)  # [b,ks,ke]
        end_top_lp = jnp.swapaxes(end_top_lp, 1, 2).reshape(b, k_start * k_end)
        end_top_index = jnp.swapaxes(end_top_index, 1, 2).reshape(b, k_start * k_end)
        # The expected START state under the start distribution.
        weighted = jnp.einsum("blh,bl->bh", x, jnp.exp(start_lp).astype(x.dtype))
        cls_logits = answer(x, weighted, cls_index)
        if cfg.hf_compat:  # transformers returns softmax probabilities under these names
            start_top_lp, end_top_lp = jnp.exp(start_top_lp), jnp.exp(end_top_lp)
        return outputs.XLNetForQuestionAnsweringOutput(
            start_top_log_probs=start_top_lp, start_top_index=start_top_index,
            end_top_log_probs=end_top_lp, end_top_index=end_top_index, cls_logits=cls_logits,
            **_extras(out),
        )  # fmt: skip
