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

This file holds the config, the layers and the base `XLNetModel`; the heads (LM head with its
generation, SequenceSummary, classification / token / multiple-choice / QA heads) live in
`xlnet_heads.py`, which imports this module (never the reverse).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax.layers import MLP, LayerNorm, get_activation, param_init
from xformers_jax.layers.attention import attention, resolve_kernel
from xformers_jax.models import outputs
from xformers_jax.models.base import (
    FamilyConfig,
    check_key_mask,
    scan_layers,
)

ATTN_TYPES = ("bi", "uni")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index", "attn")
_NEG = 1e30  # transformers subtracts 1e30 * mask (not -inf): fully masked rows become uniform

# Slot axis of `XLNetModel`'s layer-major `kv_cache`: keys `[layers, b, heads, d_head, S]`,
# values `[layers, b, heads, S, d_head]`.
KV_SLOT_AXIS = {"k": 4, "v": 3}


@dataclasses.dataclass(frozen=True)
class XLNetConfig(FamilyConfig):
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
    hf_compat: bool = False

    LOCAL_FIELDS = ("hf_compat",)

    def __post_init__(self):
        super().__post_init__()
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        if self.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"summary_type must be one of {SUMMARY_TYPES}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        get_activation(self.ff_activation)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def _from_hf(cls, kw: dict[str, Any]) -> None:
        if "use_cache" in kw and "use_mems_eval" not in kw:  # transformers' deprecated name
            kw["use_mems_eval"] = kw["use_cache"]

    def _to_hf(self, d: dict[str, Any]) -> None:
        d["d_head"] = self.d_head


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


def kv_position_keys(params: Any, config: XLNetConfig, slots: int) -> jax.Array:
    """Every layer's position keys for the distances `slots .. -slots` (`kv_cache['r']`):
    `[layers, heads, 2 * slots + 1, d_head]` (head-major), from `XLNetModel`'s params."""
    pos = relative_positional_encoding(slots + 1, slots, config, 1)[0]
    w = jnp.asarray(nn.meta.unbox(params["layers"]["rel_attn"]["r"]), config.dtype)
    return jnp.einsum("rh,lhnd->lnrd", jnp.asarray(pos, w.dtype), w)


def causal_mask(qlen: int, mlen: int, same_length: bool) -> np.ndarray:
    """`[qlen, mlen + qlen]` bool, True = masked: no future keys (uni), and with `same_length`
    every query sees the same number of keys."""
    q = np.arange(qlen)[:, None]
    k = np.arange(mlen + qlen)[None, :]
    mask = k > q + mlen
    if same_length:
        mask |= k < q
    return mask


def attention_masks(cfg, qlen, mlen, input_mask, perm_mask, mems_mask=None):
    """(h-stream mask, g-stream mask), `[b or 1, qlen, mlen + qlen]` bool (True = masked) or None.

    Args:
      input_mask: `[b, qlen]` 1 at padding (keys), or None.
      perm_mask: `[b, qlen, qlen]` 1 where query i may not see token j, or None.
      mems_mask: `[b, mlen]` 1 = a mem slot every query sees, 0 = a slot that counts as absent
        (None: all mems visible, as transformers). Absent slots must come first (right-aligned
        mems) for the relative positions to be those of the mems without them.
    """
    mask = None
    if cfg.attn_type == "uni":
        if mems_mask is None or not cfg.same_length:
            mask = jnp.asarray(causal_mask(qlen, mlen, cfg.same_length))[None]
        else:  # same_length counts keys from the first present mem, not from slot 0
            ones = jnp.ones((mems_mask.shape[0], qlen), bool)
            present = jnp.concatenate([mems_mask > 0, ones], axis=1)
            rank = jnp.cumsum(present, axis=1) - 1  # key index among present keys, [b, klen]
            n_mem = jnp.sum(mems_mask > 0, axis=1)[:, None, None]
            q = jnp.arange(qlen)[None, :, None]
            mask = (rank[:, None] > q + n_mem) | (rank[:, None] < q)
    data = None
    if input_mask is not None:
        data = input_mask[:, None, :] > 0
    if perm_mask is not None:
        data = perm_mask > 0 if data is None else data | (perm_mask > 0)
    if mems_mask is not None:
        absent = jnp.broadcast_to(~(mems_mask[:, None, :] > 0), (mems_mask.shape[0], qlen, mlen))
        if data is None:
            data = jnp.zeros((1, qlen, qlen), bool)
        b = max(data.shape[0], absent.shape[0])
        data = jnp.concatenate([jnp.broadcast_to(absent, (b, qlen, mlen)),
                                jnp.broadcast_to(data, (b, qlen, qlen))], axis=2)  # fmt: skip
    elif data is not None:
        data = jnp.pad(data, ((0, 0), (0, 0), (mlen, 0)))  # mems are always visible
    if data is not None:
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
        shape, pd = (cfg.n_head, cfg.d_head), cfg.param_dtype
        return tuple(self.param(n, init, shape, pd) for n in ("r_w_bias", "r_r_bias", "r_s_bias"))


class RelativeAttention(nn.Module):
    """Two-stream relative multi-head attention + output projection, residual and LayerNorm.

    Params `q k v o r` are `[d_model, heads, head_dim]` (HF's layout); `seg_embed`
    `[2, heads, head_dim]`; the relative biases here when `untie_r`, else passed in (shared).
    """

    config: XLNetConfig
    deterministic: bool = True
    output_attentions: bool = False

    def setup(self):
        cfg = self.config
        pd = cfg.param_dtype
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
        dt = cfg.dtype
        self.layer_norm = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pd)
        self.drop = nn.Dropout(cfg.dropout)

    def _proj(self, x, w):
        dt = self.config.dtype
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
        dt = cfg.dtype
        r_w, r_r, r_s = (jnp.asarray(b, dt) for b in biases)
        dropout = not self.deterministic and cfg.dropout > 0
        fused = "flash" == resolve_kernel(
            cfg.attention_kernel, need_probs=self.output_attentions, head_mask=head_mask,
            dropout=dropout, dtype=dt,
        )  # fmt: skip
        # A fused kernel takes the content term as its q.k and the rest as an additive bias.
        ac = None if fused else jnp.einsum("bind,bjnd->bnij", q + r_w, k)
        if kr.shape[0] == 1:
            bd = jnp.einsum("bind,rnd->bnir", q + r_r, kr[0])
        else:
            bd = jnp.einsum("bind,brnd->bnir", q + r_r, kr)
        score = rel_shift(bd, k.shape[1]).astype(jnp.float32)
        if not fused:
            score = ac.astype(jnp.float32) + score
        if seg is not None:
            ef = jnp.einsum("bind,snd->bnis", q + r_s, jnp.asarray(self.seg_embed, dt))
            ef = ef.astype(jnp.float32)
            score = score + jnp.where(seg[:, None], ef[..., 1:], ef[..., :1])
        if fused:  # masked keys: an additive bias far below any score, as `_softmax`'s
            out, _ = attention(
                q + r_w, k, v, kernel="flash", bias=score, scale=float(cfg.d_head) ** -0.5,
                mask=None if mask is None else ~mask[:, None], dtype=dt,
            )  # fmt: skip
            return out, None
        p, probs = self._softmax(score, mask, head_mask)
        out = jnp.einsum("bnij,bjnd->bind", p, v)
        return out, probs

    def _softmax(self, score, mask, head_mask):
        """Scaled, masked softmax of float32 scores `[b, n, i, j]` -> (weights in `dtype`, the
        same in float32: after dropout and head mask, as transformers returns them)."""
        score = score / np.sqrt(self.config.d_head)
        if mask is not None:
            score = score - _NEG * mask[:, None].astype(jnp.float32)
        probs = jax.nn.softmax(score, axis=-1)
        probs = self.drop(probs, deterministic=self.deterministic)
        if head_mask is not None:
            probs = probs * head_mask[None, :, None, None]
        return probs.astype(self.config.dtype), probs

    def cached(self, x, n_new, cache, ctx, head_mask, shared_biases):
        """Both streams in one pass against a K/V cache (generation, `XLNetModel`'s `kv_cache`).

        The inputs' keys / values go into this layer's cache at their slots `ctx["start"]..`
        (slots no query saw before), so one score and one weighted-value matmul cover cache and
        inputs alike.

        Args:
          x: `[b, rows, d_model]`: the `n_new` input tokens (content stream), then the
            query-stream rows.
          cache: `k` `[b, n, d, S]` and `v` `[b, n, S, d]` (slot = absolute position; keys
            transposed: the score matmul runs ~2x faster on them than on `[S, d]`), `r`
            `[n, R, d]` position keys of the distances `(R - 1) / 2 - row`; optionally `o_t`,
            the output projection as `[n, d, d_model]` (a layout the matmul reads in place).
          ctx: `start` (int) the inputs' first slot, `pos_index` `[b, rows, S]` int, the row of
            `r` for each (query, slot) distance, and `mask` `[b, rows, S]` bool, True = masked.

        Returns:
          (`[b, rows, d_model]`, float32 probs `[b, n, rows, S]`, the inputs' keys
          `[b, n, d, n_new]` and values `[b, n, n_new, d]`).
        """
        cfg = self.config
        dt = cfg.dtype
        biases = self.biases() if cfg.untie_r else shared_biases
        r_w, r_r, _ = (jnp.asarray(b, dt) for b in biases)
        new_k = self._proj(x[:, :n_new], self.k).transpose(0, 2, 3, 1)  # [b, n, d, n_new]
        new_v = self._proj(x[:, :n_new], self.v).transpose(0, 2, 1, 3)  # [b, n, n_new, d]
        start = ctx["start"]
        k = jax.lax.dynamic_update_slice(
            cache["k"], new_k.astype(cache["k"].dtype), (0, 0, 0, start)
        )
        v = jax.lax.dynamic_update_slice(
            cache["v"], new_v.astype(cache["v"].dtype), (0, 0, start, 0)
        )
        new_kv = (new_k, new_v)
        q = self._proj(x, self.q).transpose(0, 2, 1, 3)  # [b, n, rows, d]
        ac = jnp.einsum("bnid,bndj->bnij", q + r_w[:, None], jnp.asarray(k, dt))
        raw = jnp.einsum("bnid,nrd->bnir", q + r_r[:, None], cache["r"])
        index = jnp.broadcast_to(ctx["pos_index"][:, None], ac.shape)
        bd = jnp.take_along_axis(raw, index, axis=-1, mode="clip")
        score = ac.astype(jnp.float32) + bd.astype(jnp.float32)
        p, probs = self._softmax(score, ctx["mask"], head_mask)
        out = jnp.einsum("bnij,bnjd->bnid", p, jnp.asarray(v, dt))
        return self.post(x, out.transpose(0, 2, 1, 3), cache.get("o_t")), probs, new_kv

    def post(self, x, attn_vec, o_t=None):
        if o_t is None:
            out = jnp.einsum("bind,hnd->bih", attn_vec, jnp.asarray(self.o, attn_vec.dtype))
        else:
            out = jnp.einsum("bind,ndh->bih", attn_vec, jnp.asarray(o_t, attn_vec.dtype))
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
    with ys = (new mem `[b, m', d]` or None, h, g, attention probs or None). With a K/V cache
    dict as `mem` (generation), the new "mem" is the inputs' `(k, v)` `[b, n, i, d]` each.
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
        attn = RelativeAttention(cfg, self.deterministic, self.output_attentions, name="rel_attn")
        if isinstance(mem, dict):  # K/V cache: both streams as one block of rows
            n_new = h.shape[1]
            x = h if g is None else jnp.concatenate([h, g], axis=1)
            x, probs, new_mem = attn.cached(x, n_new, mem, ctx, head_mask, shared_biases)
        else:
            new_mem = self._cache(h, mem) if self.use_mems else None
            h, g, probs = attn(h, g, mem, ctx, head_mask, shared_biases)
        dt, pd = cfg.dtype, cfg.param_dtype
        mlp = MLP(cfg.d_inner, cfg.ff_activation, dropout_rate=cfg.dropout, dtype=dt,
                  param_dtype=pd, kernel_init=nn.initializers.normal(cfg.initializer_range),
                  name="ff")  # fmt: skip
        norm = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pd, name="ff_norm")
        drop = nn.Dropout(cfg.dropout)

        def ff(x):
            y = drop(mlp(x, self.deterministic), deterministic=self.deterministic)
            return nn.with_logical_constraint(norm(y + x), ("act_batch", "act_length", "act_embed"))

        if isinstance(mem, dict):
            x = ff(x)
            h, g = x[:, :n_new], (None if g is None else x[:, n_new:])
        else:
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
    `mems_mask` `[b, mem_len]` (ours, used by generation's fixed-size mems buffer): 0 marks mem
    slots no query may see, which must come first; default every mem is visible (transformers).

    `kv_cache` (ours, generation with `attn_type="bi"`, no `bi_data`, no segments): instead of
    `mems`, every layer's keys and values of earlier positions, so a step projects only its own
    tokens: `k` `[layers, b, heads, d_head, S]` (keys transposed) and `v` `[layers, b, heads, S,
    d_head]` (slot = absolute position), `r` `[layers, heads, 2S + 1, d_head]` position keys of
    the distances `S .. -S` (`kv_position_keys`), `visible` `[b or 1, S]` (True = a slot every
    query sees, as mems) and `start` (int, the absolute position of `input_ids[:, 0]`; slots
    `start .. start + length - 1` must exist and be hidden by `visible`: each layer attends to
    its cache with the inputs' keys written there). `mems` then holds the inputs' keys
    `[layers, b, heads, d_head, length]` and values `[layers, b, heads, length, d_head]`, for
    the caller to write at slot `start`.
    Optional entries: `o_t` `[layers, heads, d_head, d_model]`, the output projections
    transposed (generation keeps them so; else each step transposes a copy), and
    `content_rows` (static int c, with a query stream): only the first c inputs run the
    content stream, the later ones just place the query rows (they must be hidden from every
    query by `perm_mask`, as generation's dummy token is); `mems` then holds c keys / values.
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
        mems_mask=None,
        kv_cache=None,
    ) -> outputs.XLNetModelOutput:
        cfg = self.config
        dt, pd = cfg.dtype, cfg.param_dtype
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
        check_key_mask(attention_mask, batch, qlen)
        check_key_mask(input_mask, batch, qlen, "input_mask")
        if attention_mask is not None:
            input_mask = 1 - jnp.asarray(attention_mask)
        if mems_mask is not None:
            if mems is None:
                raise ValueError("mems_mask needs mems")
            mems_mask = jnp.asarray(mems_mask)
            if mems_mask.shape != (batch, mlen):
                raise ValueError(f"mems_mask must be [batch, mem_len] {(batch, mlen)}, got "
                                 f"{mems_mask.shape}")  # fmt: skip
        if kv_cache is not None:
            if mems is not None or mems_mask is not None or token_type_ids is not None:
                raise ValueError("kv_cache excludes mems, mems_mask and token_type_ids")
            if cfg.attn_type != "bi" or cfg.bi_data:
                raise ValueError("kv_cache needs attn_type='bi' and bi_data=False")
            slots = kv_cache["v"].shape[KV_SLOT_AXIS["v"]]
            mems_mask = jnp.broadcast_to(kv_cache["visible"], (batch, slots))
            mlen = slots
        mask_h, mask_g = attention_masks(cfg, qlen, mlen, input_mask, perm_mask, mems_mask)

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
        ctx = dict(mask_h=mask_h, mask_g=mask_g, seg=seg, target_mapping=target_mapping)
        if kv_cache is None:
            if cfg.bi_data and batch % 2:
                raise ValueError(f"bi_data needs an even batch size, got {batch}")
            # The distinct rows only (forward, and backward with bi_data), expanded to the batch
            # on the device along its sharding: a pod's global batch would make the host-side
            # table tens of GiB.
            pos = relative_positional_encoding(qlen, mlen + qlen, cfg, 2 if cfg.bi_data else 1)
            pos = jnp.asarray(pos, dt)
            if cfg.bi_data:
                pos = jnp.repeat(pos, batch // 2, axis=0)
                pos = nn.with_logical_constraint(pos, ("act_batch", "act_length", "act_embed"))
            ctx["pos"] = drop(pos, deterministic=deterministic)
        else:
            # Row of `r` (distance `S - row`) for query i at `start + i` and key slot j (the
            # inputs' keys go to slots start..).
            i = jnp.arange(qlen)[:, None]
            pos_index = (mlen - kv_cache["start"] - i + jnp.arange(mlen)[None]).astype(jnp.int32)
            pos_index = jnp.broadcast_to(pos_index, (batch, qlen, mlen))
            mask = mask_h
            if g is not None:  # query-stream rows follow, at the positions they predict
                rows = jnp.broadcast_to(jnp.arange(qlen), (batch, qlen))
                if target_mapping is not None:  # one-hot rows
                    rows = jnp.argmax(target_mapping, axis=-1)
                take = lambda x: jnp.take_along_axis(x, rows[..., None], axis=1)  # noqa: E731
                pos_index = jnp.concatenate([pos_index, take(pos_index)], axis=1)
                mask = jnp.concatenate([mask, take(jnp.broadcast_to(mask_g, mask_h.shape))], 1)
            keep = kv_cache.get("content_rows", qlen)
            if keep != qlen:  # later inputs only give the query rows their positions
                if g is None or not 0 < keep < qlen:
                    raise ValueError(f"kv_cache['content_rows'] must be in 1..{qlen} with a "
                                     f"query stream, got {keep}")  # fmt: skip
                rows = np.r_[:keep, qlen : pos_index.shape[1]]
                pos_index, mask = (x[:, rows] for x in (pos_index, mask))
                h = h[:, :keep]
            # The layers write the inputs' keys at slots start..: one set of columns, the cache's
            # slots, with the inputs' masking there (the slots were hidden before).
            offset = jnp.arange(mlen) - kv_cache["start"]
            is_new = (offset >= 0) & (offset < keep)
            new_mask = jnp.take(mask[..., mlen:], jnp.clip(offset, 0, keep - 1), axis=-1)
            mask = jnp.where(is_new, new_mask, mask[..., :mlen])
            ctx.update(pos_index=pos_index, mask=mask, start=kv_cache["start"])
            mems = {name: kv_cache[name] for name in ("k", "v", "r", "o_t") if name in kv_cache}
        shared = None if cfg.untie_r else RelativeBiases(cfg, name="biases")()

        emb_h, emb_g = h, g
        (h, g), (new_mems, hs, gs, probs) = scan_layers(
            Layer, cfg.n_layer, cfg.remat_policy,
            dict(config=cfg, deterministic=deterministic, use_mems=use_mems,
                 output_hidden_states=output_hidden_states, output_attentions=output_attentions),
            name="layers", in_axes=(0, 0, nn.broadcast, nn.broadcast), unroll=cfg.scan_unroll,
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
        if kv_cache is not None:
            use_mems = True
        elif use_mems and not return_stacked_mems:
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
