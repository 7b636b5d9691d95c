"""XLNet heads, named and behaving as transformers' classes; the base model is in `xlnet.py`.

`XLNetLMHeadModel` (tied LM head and generation), `XLNetForSequenceClassification`,
`XLNetForTokenClassification`, `XLNetForMultipleChoice` (all three through `SequenceSummary` or a
per-token classifier), `XLNetForQuestionAnsweringSimple` and `XLNetForQuestionAnswering` (SQuAD 2.0
start / end beam with an answer class). Every head runs `XLNetModel` as `transformer` (HF's
base_model_prefix), takes HF's argument names, returns HF's output fields (`mems` included) and
with `labels` (`start_positions` / `end_positions` for QA) gives HF's loss. `xlnet.py` re-exports
nothing from here: the registry finds each head in this module.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xformers_jax import decoding
from xformers_jax.layers import DenseGeneral, LayerNorm, get_activation, param_init
from xformers_jax.layers.dense import add_bias
from xformers_jax.layers.losses import (
    cross_entropy_with_ignore,
    sequence_classification_loss,
    span_loss,
    token_classification_loss,
)
from xformers_jax.models import heads, outputs
from xformers_jax.models.xlnet import (
    _NEG,
    KV_SLOT_AXIS,
    XLNetConfig,
    XLNetModel,
    kv_position_keys,
)

# The base model's inputs every head forwards unchanged.
_BASE_ARGS = (
    "input_ids", "attention_mask", "mems", "perm_mask", "target_mapping", "token_type_ids",
    "input_mask", "head_mask", "inputs_embeds", "use_mems", "output_attentions",
    "output_hidden_states", "deterministic", "return_stacked_mems", "mems_mask", "kv_cache",
)  # fmt: skip


def _base(cfg: XLNetConfig, loc: Mapping[str, Any], **override) -> outputs.XLNetModelOutput:
    """Runs `XLNetModel` (named `transformer`, HF's base_model_prefix) on a head's arguments."""
    kw = {k: loc[k] for k in _BASE_ARGS if k in loc}
    kw.update(override)
    return XLNetModel(cfg, name="transformer")(**kw)


def _dense(cfg: XLNetConfig, features: int, axes: tuple, name: str, use_bias: bool = True):
    return DenseGeneral(
        features, axes, use_bias=use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
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
        pd = self.config.param_dtype
        init = param_init(nn.initializers.zeros, ("vocab",))
        return self.param("bias", init, (self.config.vocab_size,), pd)


def _mems_slots(cfg: XLNetConfig, max_length: int) -> int:
    """Slots of the generation mems buffer: transformers' cache never holds more than
    `max_length` states (prompt, dummy and one more per step), nor more than `mem_len`."""
    return min(cfg.mem_len, max_length) if cfg.mem_len else max_length


def _kv_cacheable(cfg: XLNetConfig, max_length: int) -> bool:
    """Whether generation can keep per-layer keys / values at absolute slots (`XLNetModel`'s
    `kv_cache`): bidirectional attention without `bi_data`, and no `reuse_len` cut that would
    drop states transformers' mems keep."""
    return (
        cfg.attn_type == "bi"
        and not cfg.bi_data
        and (not cfg.reuse_len or cfg.reuse_len >= max_length)
    )


def _dummy_inputs(b: int, n: int) -> tuple[jax.Array, jax.Array]:
    """transformers' generation masks for `n` tokens ending in the dummy: `perm_mask`
    `[b, n, n]` hides the last token from every query, `target_mapping` `[b, 1, n]` predicts it."""
    last = (jnp.arange(n) == n - 1).astype(jnp.float32)
    return jnp.broadcast_to(last, (b, n, n)), jnp.broadcast_to(last, (b, 1, n))


def _right_align(x: jax.Array, size: int, axis: int) -> jax.Array:
    """The last `size` entries of `x` along `axis`, zero-padded in front when it has fewer."""
    n = x.shape[axis]
    if n >= size:
        return jax.lax.slice_in_dim(x, n - size, n, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (size - n, 0)
    return jnp.pad(x, pad)


@decoding.generator(decoder_only=True)
class XLNetLMHeadModel(nn.Module):
    """Tied LM head (HF `XLNetLMHeadModel`): `logits` `[b, num_predict or l, vocab]`; `labels`
    (`-100` = ignore) give the mean cross-entropy. `generate` uses the permutation trick.

    Generation (`init_decoding` / `decode_step`, driven by `xformers_jax.decoding`) matches
    transformers' `generate` in both its modes, chosen by the `use_mems` option of `generate`
    (default `config.use_mems_eval`, as transformers). Shapes never change, so the step compiles
    once.

    * `use_mems=True` (transformers' default): the prefill runs the prompt plus transformers'
      dummy token 0 (hidden from every query by `perm_mask`, predicted through a one-hot
      `target_mapping`), keeps its logits for the first step and every layer's input states as
      the mems (`cache_mem`: the last `mem_len`, all when `mem_len` is None / 0, `reuse_len`
      truncation too). Each later step runs the last two tokens plus the dummy against the mems
      minus their last two states (so those two tokens are recomputed seeing the newest one) and
      appends the three new states. The mems live in a fixed `[b, layers, S, d]` buffer,
      `S = min(mem_len or max_length, max_length)`, right-aligned: unused slots come first and
      are hidden by `XLNetModel`'s `mems_mask`. XLNet's relative encoding depends only on query /
      key distances, so positions are those of transformers' variable-length mems. With
      bidirectional attention (the default; `_kv_cacheable`) the buffer holds every layer's keys
      and values instead, at absolute slots: a step runs the content stream of `prev` and the
      new token only (the dummy just places the query row: nothing sees it, and transformers'
      next step drops its state), writes their keys / values in place, and sees the slots of
      transformers' mems (`mem_len` window).
    * `use_mems=False`: a fixed `[b, max_length]` token buffer, recomputed in full every step,
      with the dummy after the last token and every later slot hidden by `perm_mask`.

    As in transformers, the prompt's `attention_mask` is ignored: pass unpadded prompts.
    """

    config: XLNetConfig

    @nn.compact
    def __call__(
        self, input_ids=None, attention_mask=None, mems=None, perm_mask=None,
        target_mapping=None, token_type_ids=None, input_mask=None, head_mask=None,
        inputs_embeds=None, labels=None, inp_q=None, use_mems: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        deterministic: bool = True, return_stacked_mems: bool = False, mems_mask=None,
        kv_cache=None,
    ) -> outputs.XLNetLMHeadModelOutput:  # fmt: skip
        cfg = self.config
        out = _base(cfg, locals(), inp_q=inp_q)
        table = nn.meta.unbox(self.variables["params"]["transformer"]["word_embedding"])
        dt = cfg.dtype
        x = out.last_hidden_state
        if kv_cache is not None and "lm_table" in kv_cache:  # generation's `[d, vocab]` copy
            logits = jnp.einsum("...d,dv->...v", x, kv_cache["lm_table"].astype(dt))
        else:
            logits = jnp.einsum("...d,vd->...v", x, jnp.asarray(table, dt))
        logits = add_bias(logits, jnp.asarray(LMBias(cfg, name="lm_loss")(), dt))
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        loss = None if labels is None else cross_entropy_with_ignore(logits, labels)
        return outputs.XLNetLMHeadModelOutput(loss=loss, logits=logits, **_extras(out))

    @staticmethod
    def decoding_options(config: XLNetConfig, use_mems: bool | None = None) -> dict[str, Any]:
        """This head's own `generate` options (see `xformers_jax.decoding`): `use_mems`, default
        `config.use_mems_eval` as in transformers' `generate`."""
        return dict(use_mems=bool(config.use_mems_eval if use_mems is None else use_mems))

    def init_decoding(
        self, input_ids, attention_mask, max_length: int, use_mems: bool | None = None
    ) -> dict[str, Any]:
        """The generation context; `attention_mask` is ignored (transformers drops it).

        Returns, with `use_mems` (default `config.use_mems_eval`): the prefill's `logits`
        `[b, vocab]` for the first step, `first` `[b]` the index of that step
        (`prompt_len - 1`), `last` `[b]` the latest token and either (`_kv_cacheable`) `kv`
        (`k` `[layers, b, heads, d_head, max_length]`, `v` `[layers, b, heads, max_length,
        d_head]`, the prompt's and the dummy's at their positions: `XLNetModel`'s `kv_cache`)
        with the position keys `r` `[layers, heads, 2 * max_length + 1, d_head]`, or the mems
        buffer `mems` `[b, layers, S, d]` and its `mems_mask` `[b, S]` (True = a state).
        Without: the token buffer `tokens` `[b, max_length]` holding the prompt (zeros after
        it). Row axes: `decoding_batch_axes`.
        """
        del attention_mask
        cfg = self.config
        use_mems = cfg.use_mems_eval if use_mems is None else use_mems
        b, p = input_ids.shape
        ids = input_ids.astype(jnp.int32)
        if not use_mems:
            return dict(tokens=jnp.zeros((b, max_length), jnp.int32).at[:, :p].set(ids))
        ids = jnp.concatenate([ids, jnp.zeros((b, 1), jnp.int32)], axis=1)
        perm_mask, target = _dummy_inputs(b, p + 1)
        out = self(ids, perm_mask=perm_mask, target_mapping=target, use_mems=True,
                   return_stacked_mems=True)  # fmt: skip
        common = dict(logits=out.logits[:, 0].astype(jnp.float32),
                      first=jnp.full((b,), p - 1, jnp.int32), last=ids[:, p - 1])  # fmt: skip
        n = out.mems.shape[2]  # the last mem_len of the p + 1 states: slots p + 1 - n .. p
        if _kv_cacheable(cfg, max_length):
            params = self.variables["params"]["transformer"]
            weights = nn.meta.unbox(params["layers"]["rel_attn"])
            dt = cfg.dtype
            kv = {}
            for name, spec in (("k", "lbth,lhnd->lbndt"), ("v", "lbth,lhnd->lbntd")):
                x = jnp.einsum(spec, out.mems.astype(dt), jnp.asarray(weights[name], dt))
                pad = [(0, 0)] * 5
                pad[KV_SLOT_AXIS[name]] = (p + 1 - n, max_length - p - 1)
                kv[name] = jnp.pad(x, pad)
            return dict(common, kv=kv, r=kv_position_keys(params, cfg, max_length))
        size = _mems_slots(cfg, max_length)
        mems = _right_align(jnp.swapaxes(out.mems, 0, 1), size, axis=2)
        present = jnp.broadcast_to(jnp.arange(size) >= size - n, (b, size))
        return dict(common, mems=mems, mems_mask=present)

    def decoding_constants(self) -> dict[str, Any]:
        """Arrays `generate` derives from the params once per model (see `xformers_jax.decoding`):
        the tied embedding transposed, `lm_table` `[d_model, vocab]` (XLA's CPU matmul reads it
        ~1.7x faster than `[vocab, d_model]` for the few rows of a step), and the layers' output
        projections as `o_t` `[layers, heads, d_head, d_model]`, which a step's matmul reads as
        they are (the params' `[d_model, heads, d_head]` cost a transposed copy every step)."""
        params = nn.meta.unbox(self.variables["params"]["transformer"])
        dt = self.config.dtype
        o_t = jnp.asarray(params["layers"]["rel_attn"]["o"], dt).transpose(0, 2, 3, 1)
        return dict(lm_table=jnp.asarray(params["word_embedding"], dt).T, o_t=o_t)

    @staticmethod
    def decoding_batch_axes(context: dict[str, Any]) -> dict[str, Any]:
        """Row axes of the decoding context (see `xformers_jax.decoding`): the K/V cache is
        layer-major (axis 1), the position keys are the same for every row."""
        axes = {key: jax.tree.map(lambda _: 0, value) for key, value in context.items()}
        if "kv" in context:
            axes.update(kv=dict(k=1, v=1), r=None)
        return axes

    def decode_step(self, tokens, index, context):
        """Predicts slot `index + 1` (the permutation trick, fixed shapes).

        Args:
          tokens: `[b]` the token at slot `index`.
          index: scalar int slot (at most `max_length - 2`).
          context: from `init_decoding` or a previous step.

        Returns:
          `(logits [b, vocab] float32, updated context)`.
        """
        tokens = tokens.astype(jnp.int32)
        if "tokens" in context:
            return self._recompute_step(tokens, index, context)

        first = index == context["first"][0]
        if "kv" in context:
            # The cond only picks the new keys / values; the cache is written outside it, so no
            # branch returns (and XLA never copies) the whole cache.
            start = index - 1

            def prefilled_kv(mdl, ctx):
                old = tuple(jax.lax.dynamic_slice_in_dim(ctx["kv"][n], start, 2, KV_SLOT_AXIS[n])
                            for n in ("k", "v"))  # fmt: skip
                return ctx["logits"], old

            def step_kv(mdl, ctx):
                return mdl._kv_step(ctx["last"], tokens, index, ctx)

            logits, new = nn.cond(first, prefilled_kv, step_kv, self, context)
            kv = {name: jax.lax.dynamic_update_slice_in_dim(context["kv"][name], x, start,
                                                            KV_SLOT_AXIS[name])
                  for name, x in zip(("k", "v"), new)}  # fmt: skip
            return logits, dict(context, kv=kv, last=tokens)

        def prefilled(mdl, ctx):
            return ctx["logits"], ctx["mems"], ctx["mems_mask"]

        def step(mdl, ctx):
            return mdl._mems_step(ctx["last"], tokens, ctx["mems"], ctx["mems_mask"])

        # The first step (the last prompt token) has its logits from the prefill.
        logits, mems, present = nn.cond(first, prefilled, step, self, context)
        return logits, dict(context, mems=mems, mems_mask=present, last=tokens)

    def _kv_step(self, prev, tokens, index, context):
        """transformers' step with mems on the K/V cache: `[prev, tokens, dummy]` at slots
        `index - 1 .. index + 1` see the slots of transformers' mems (its cache minus the last
        two states, the last `mem_len`); returns `(logits, (k, v))`, the keys and values
        `[layers, b, heads, 2, d_head]` of `prev` and `tokens` for slots `index - 1, index`.
        The dummy runs no content stream (`content_rows=2`): every query is blind to it and the
        next step drops its state, as transformers' next step drops it from the mems."""
        cfg = self.config
        b = tokens.shape[0]
        perm_mask, target = _dummy_inputs(b, 3)
        ids = jnp.stack([prev, tokens, jnp.zeros_like(tokens)], axis=1)
        start = index - 1
        kv = context["kv"]
        slots = jnp.arange(kv["v"].shape[KV_SLOT_AXIS["v"]])
        visible = slots < start
        if cfg.mem_len:
            visible &= slots >= start + 2 - cfg.mem_len
        cache = dict(kv, r=context["r"], visible=visible[None], start=start, content_rows=2)
        if "constants" in context:
            cache.update(lm_table=context["constants"]["lm_table"], o_t=context["constants"]["o_t"])
        out = self(ids, perm_mask=perm_mask, target_mapping=target, kv_cache=cache)
        new = tuple(x.astype(kv[name].dtype) for name, x in zip(("k", "v"), out.mems))
        return out.logits[:, 0].astype(jnp.float32), new

    def _mems_step(self, prev, tokens, mems, present):
        """transformers' step with mems: `[prev, tokens, dummy]` against the mems buffer minus its
        last two slots; returns `(logits, mems, mems_mask)`, the three new states appended."""
        cfg = self.config
        b, size = present.shape
        perm_mask, target = _dummy_inputs(b, 3)
        ids = jnp.stack([prev, tokens, jnp.zeros_like(tokens)], axis=1)
        out = self(ids, mems=jnp.swapaxes(mems[:, :, :-2], 0, 1), perm_mask=perm_mask,
                   target_mapping=target, use_mems=True, return_stacked_mems=True,
                   mems_mask=present[:, :-2])  # fmt: skip
        # The same cut as `cache_mem` (first `reuse_len` new states, last `mem_len`) on the mask.
        added = min(3, cfg.reuse_len) if cfg.reuse_len else 3
        present = jnp.concatenate([present[:, :-2], jnp.ones((b, added), bool)], axis=1)
        if cfg.mem_len:
            present = present[:, -cfg.mem_len :]
        new = jnp.swapaxes(out.mems, 0, 1)
        assert new.shape[2] == present.shape[1], (new.shape, present.shape)
        mems = _right_align(new, size, axis=2).astype(mems.dtype)
        return out.logits[:, 0].astype(jnp.float32), mems, _right_align(present, size, axis=1)

    def _recompute_step(self, tokens, index, context):
        """`use_mems=False`: slots `0..index` of the token buffer recomputed, slot `index + 1`
        predicted."""
        buf = jax.lax.dynamic_update_slice_in_dim(context["tokens"], tokens[:, None], index, 1)
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
        return out.logits[:, 0].astype(jnp.float32), dict(context, tokens=buf)


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
        dt, pd = cfg.dtype, cfg.param_dtype
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
        loss = (
            None
            if labels is None
            else sequence_classification_loss(logits, labels, cfg.num_labels, cfg.problem_type)
        )
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
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, heads.token_labels(labels, logits))
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
        start, end = heads.span_logits(functools.partial(_dense, cfg), out.last_hidden_state)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start, end, start_positions, end_positions)
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
        dt, pd = cfg.dtype, cfg.param_dtype
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
