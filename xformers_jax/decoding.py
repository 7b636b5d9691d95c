"""Autoregressive generation under `jax.jit`: greedy, sampling and beam search in `lax.while_loop`.

A head that generates implements the `Generator` protocol and declares it with the `@generator`
class decorator (which checks the hooks and sets `can_generate = True`). Two hooks are required
(called through `module.apply(..., method=...)`):

  init_decoding(input_ids, attention_mask, max_length) -> context
      everything the steps need (a dict of arrays): for encoder-decoders the encoder mask, a
      fixed-size self-attention K/V cache and the cross-attention K/V (computed once here); a
      decoder-only head prefills its prompt here.
  decode_step(tokens [rows], index, context) -> (logits [rows, vocab] float32, context)
      one position for every row (a sequence: an input, or one of its beams); `index` is the
      position of `tokens`.

Every context leaf holds one row per sequence on axis 0, unless the head says otherwise with a
static method `decoding_batch_axes(context) -> pytree` (the context's structure, one entry per
leaf): an int, the leaf's row axis (e.g. 1 for layer-major caches `[layers, rows, ...]`), or None
for a leaf that holds one row per *input* and is the same for all its beams (the encoder's
cross-attention K/V): beam search neither repeats nor reorders it, and `decode_step` sees
`rows = inputs * num_beams` rows against it (row `i * num_beams + j` is beam j of input i).

A head may also declare append-only caches with a static method `decoding_slot_caches(context) ->
pytree` (the context's structure, a bool per leaf): True for a leaf that a step writes only at
slot `index` of every row, in place, leaving the other slots as they were (MT5's self-attention
K/V). Beam search never reorders such a leaf: it keeps `slot_rows` `[rows, max_length]` int32,
the row of the leaf that holds slot s of beam r (the row its ancestor occupied when slot s was
written), reorders that small table instead, and passes it to `decode_step` as
`context["slot_rows"]` (absent outside beam search); the step reads slot s of row r from row
`slot_rows[r, s]`. Reordering the cache itself would copy all of it every step.

A head may take array inputs besides the prompt (e.g. a decoder's `encoder_hidden_states`): it
names them in a class attribute `decoding_inputs` (a tuple of keyword names); `generate` passes
those of its keyword arguments to `init_decoding` as arrays (traced, not part of the compile key).

A head with options of its own (e.g. XLNet's `use_mems`) also has a static method
`decoding_options(config, **options) -> dict` that validates them and fills their defaults; the
keyword arguments of `generate` that are not its own go there (a TypeError for a head without
one), and the dict it returns (hashable values: it is part of the compile key) is passed to
`init_decoding` as keyword arguments.

A head may also derive arrays from its params alone with a method `decoding_constants() -> pytree`
(called through `module.apply`; e.g. a weight in the layout the step's matmul reads fastest):
`generate` computes them once per model and params (kept in the model's `DecodingCache`, recomputed
when a params leaf is replaced) and the steps find them as `context["constants"]`, shared by every
row.

A decoder-only head is declared with `@generator(decoder_only=True)`: `init_decoding` then
prefills its cache with the whole prompt, sequences start with the prompt (left-padded rows as
transformers expects them), the first step re-runs the last prompt token at
`index = prompt_len - 1`, and `max_length`, `min_length` and the length penalty count as
transformers' do (prompt included in the lengths, penalty over generated tokens only).

Shapes never change inside the loop (the cache has `max_length` slots and each step writes one),
so the whole generation compiles once per (batch, input length, settings). Beam search keeps the
beams flattened into the batch (`[batch * num_beams, ...]`) and reorders the context with a gather
(all but the slot caches).

The search follows transformers' `generate` for encoder-decoders, so outputs match token for token:
sequences start with `decoder_start_token_id`; finished rows are padded with `pad_token_id`; beam
search is transformers' vectorised one (2 * num_beams candidates per step, length penalty
`score / generated_len ** length_penalty`, `early_stopping` True / False / "never").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1.0e9  # transformers' "impossible" score in beam search

Context = dict[str, Any]


# ==================================================================================================
# The head protocol and the per-model cache.
# ==================================================================================================


class Generator(Protocol):
    """The hooks of a head that generates (see the module docstring for their contracts).

    `init_decoding` and `decode_step` are required; the others are optional, with these defaults:
    `decoder_only` False; `decoding_batch_axes` every leaf's rows on axis 0;
    `decoding_slot_caches` no slot cache; `decoding_options` none (any option is a TypeError);
    `decoding_constants` none.
    """

    config: Any
    can_generate: ClassVar[bool]
    decoder_only: ClassVar[bool]

    def init_decoding(self, input_ids, attention_mask, max_length: int, **options) -> Context:
        """Everything the steps need, from `[rows, n]` inputs, for `max_length` positions."""

    def decode_step(self, tokens, index, context: Context) -> tuple[jax.Array, Context]:
        """`[rows]` tokens at position `index` -> (`[rows, vocab]` float32 logits, context)."""

    @staticmethod
    def decoding_batch_axes(context: Context) -> Any:
        """Per context leaf: its row axis, or None for a leaf per input (shared by its beams)."""

    @staticmethod
    def decoding_slot_caches(context: Context) -> Any:
        """Per context leaf: True for an append-only cache a step writes at slot `index` only."""

    @staticmethod
    def decoding_options(config: Any, **options: Any) -> dict[str, Any]:
        """The head's own `generate` options, validated and defaulted."""

    def decoding_constants(self) -> Any:
        """Arrays derived from the params alone, computed once per params."""


_REQUIRED = ("init_decoding", "decode_step")


def generator(cls: type | None = None, *, decoder_only: bool = False) -> Any:
    """Class decorator: declares that a head implements `Generator` (checked here).

    `@generator` for encoder-decoders, `@generator(decoder_only=True)` for heads whose sequences
    start with the prompt.
    """

    def declare(head: type) -> type:
        missing = [name for name in _REQUIRED if not callable(getattr(head, name, None))]
        if missing:
            raise TypeError(f"{head.__name__} declares Generator but lacks {missing}")
        head.can_generate = True
        head.decoder_only = decoder_only
        return head

    return declare if cls is None else declare(cls)


@dataclasses.dataclass(frozen=True)
class _Hooks:
    """A `Generator` head's optional hooks, the defaults filled in."""

    decoder_only: bool
    batch_axes: Callable[[Context], Any]
    slot_caches: Callable[[Context], Any]
    options: Callable[..., dict[str, Any]] | None
    has_constants: bool
    inputs: tuple[str, ...] = ()

    @classmethod
    def of(cls, head: type) -> _Hooks:
        if not getattr(head, "can_generate", False):
            raise TypeError(f"{head.__name__} is not declared a decoding.Generator")
        rows_first = lambda context: jax.tree.map(lambda _: 0, context)  # noqa: E731
        no_slots = lambda context: jax.tree.map(lambda _: False, context)  # noqa: E731
        return cls(
            decoder_only=bool(head.decoder_only),
            batch_axes=getattr(head, "decoding_batch_axes", rows_first),
            slot_caches=getattr(head, "decoding_slot_caches", no_slots),
            options=getattr(head, "decoding_options", None),
            has_constants=hasattr(head, "decoding_constants"),
            inputs=tuple(getattr(head, "decoding_inputs", ())),
        )


class DecodingCache:
    """What `generate` keeps per model (`PretrainedModel.decoding_cache`): one jitted function
    per settings (jax then keeps one trace per input shape), and the head's `decoding_constants`
    with the params leaves they were computed from (jax arrays are immutable: the same leaf
    objects mean the same values)."""

    def __init__(self):
        self.fns: dict[tuple, Callable] = {}
        self.constants: Any = None
        self._constants_of: list | None = None

    def compiled(self, module: Any, settings: tuple) -> Callable:
        if settings not in self.fns:
            self.fns[settings] = _build(module, settings)
        return self.fns[settings]

    def constants_for(self, module: Any, params: Any) -> Any:
        """`module`'s `decoding_constants` for `params`, recomputed when a leaf was replaced."""
        leaves = jax.tree.leaves(params)
        same = self._constants_of is not None and len(leaves) == len(self._constants_of)
        if not (same and all(a is b for a, b in zip(leaves, self._constants_of))):
            fn = jax.jit(lambda p: module.apply({"params": p}, method="decoding_constants"))
            self.constants, self._constants_of = fn(params), leaves
        return self.constants


def _cache(model: Any) -> DecodingCache:
    if model.decoding_cache is None:
        model.decoding_cache = DecodingCache()
    return model.decoding_cache


# ==================================================================================================
# Logits processors (pure functions of `[rows, vocab]` float32 logits).
# ==================================================================================================


def apply_min_length(logits, cur_len, min_length: int, eos_token_id: int):
    """Forbids EOS while the sequence (start token included) is shorter than `min_length`
    (nothing to forbid without an EOS: `eos_token_id < 0`)."""
    if min_length <= 0 or eos_token_id < 0:
        return logits
    blocked = logits.at[:, eos_token_id].set(-jnp.inf)
    return jnp.where(cur_len < min_length, blocked, logits)


def warp_logits(logits, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then top-p (nucleus) filtering, as transformers orders them."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)  # always keep the best token
        remove = jnp.zeros_like(remove_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order
        ].set(remove_sorted)  # fmt: skip
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def first_argmax(logits):
    """`jnp.argmax` over the last axis (the first maximum) as two plain reductions, which XLA's
    CPU backend vectorises (its variadic arg-reduce is ~4x slower on a `[8, 32000]` row block).
    A row holding NaN gives its last index."""
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab)
    return jnp.minimum(jnp.min(ids, axis=-1), vocab - 1)


def top_k(x, k: int, chunk: int = 128):
    """`jax.lax.top_k` over the last axis, exactly, for long rows (beam search's
    `[batch, beams * vocab]`): the k largest entries lie in the k chunks with the largest maxima,
    so one max-reduction, a top-k over chunk maxima and one over k chunks replace XLA's CPU
    top-k over the whole row (~15x faster on `[8, 128000]`). Chunks are taken in index order, so
    ties resolve to the lower index as in `lax.top_k`."""
    n = x.shape[-1]
    if n < 4 * k * chunk:
        return jax.lax.top_k(x, k)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, -n % chunk)]
    chunks = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(*x.shape[:-1], -1, chunk)
    ids = jnp.sort(jax.lax.top_k(jnp.max(chunks, axis=-1), k)[1], axis=-1)
    candidates = jnp.take_along_axis(chunks, ids[..., None], axis=-2)
    values, pos = jax.lax.top_k(candidates.reshape(*x.shape[:-1], k * chunk), k)
    return values, jnp.take_along_axis(ids, pos // chunk, axis=-1) * chunk + pos % chunk


# ==================================================================================================
# Greedy and sampling.
# ==================================================================================================


def _sample_loop(step, context, rng, *, batch, max_length, seqs, prompt_len, eos, pad, min_length,
                 sample, temperature, top_k, top_p):  # fmt: skip
    """Greedy (or sampled) decoding from the `[b, max_length]` buffer `seqs`, whose first
    `prompt_len` tokens are given; returns `(sequences [b, max_length], lengths [b])`."""
    state = dict(seqs=seqs, done=jnp.zeros((batch,), bool), cur=jnp.int32(prompt_len), ctx=context,
                 rng=rng, lengths=jnp.full((batch,), max_length, jnp.int32))  # fmt: skip

    def cond(s):
        return (s["cur"] < max_length) & ~jnp.all(s["done"])

    def body(s):
        cur = s["cur"]
        logits, ctx = step(s["seqs"][:, cur - 1], cur - 1, s["ctx"])
        logits = apply_min_length(logits, cur, min_length, eos)
        rng, key = jax.random.split(s["rng"])
        if sample:
            logits = warp_logits(logits, temperature, top_k, top_p)
            tokens = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        else:
            tokens = first_argmax(logits)
        tokens = jnp.where(s["done"], pad, tokens)
        seqs = jax.lax.dynamic_update_slice_in_dim(s["seqs"], tokens[:, None], cur, axis=1)
        now_done = ~s["done"] & (tokens == eos)
        lengths = jnp.where(now_done, cur + 1, s["lengths"])
        return dict(seqs=seqs, done=s["done"] | now_done, cur=cur + 1, ctx=ctx, rng=rng,
                    lengths=lengths)  # fmt: skip

    out = jax.lax.while_loop(cond, body, state)
    return out["seqs"], jnp.minimum(out["lengths"], out["cur"])


# ==================================================================================================
# Beam search.
# ==================================================================================================


def _gather_beams(x, idx):
    """`x` `[b, n, ...]`, `idx` `[b, k]` -> `[b, k, ...]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _take_rows(x, rows, axis: int):
    """`jnp.take(x, rows, axis=axis)`; with leading axes (a layer-major cache `[layers, rows,
    ...]`) one take per leading index, stacked: a single gather there makes XLA:CPU keep the
    loop-carried cache rows-major and copy it back to layer-major every step."""
    if axis == 0:
        return jnp.take(x, rows, axis=0)
    return jnp.stack([_take_rows(x[i], rows, axis - 1) for i in range(x.shape[0])])


def _beam_loop(step, context, axes, slot_caches, *, batch, num_beams, max_length, seqs,
               prompt_len, eos, pad, min_length, length_penalty, early_stopping,
               num_return_sequences):  # fmt: skip
    """transformers' vectorised beam search from the `[b, max_length]` buffer `seqs` (first
    `prompt_len` tokens given); returns `(sequences, lengths)` of the best beams."""
    k, b, big_k = num_beams, batch, 2 * num_beams
    # The context arrives with one row per input; every beam starts from the same one. Leaves
    # with no row axis (None) stay per input.
    is_none = lambda a: a is None  # noqa: E731
    per_leaf = lambda f: lambda a, x: x if a is None else f(x, a)  # noqa: E731
    context = jax.tree.map(per_leaf(lambda x, a: jnp.repeat(x, k, axis=a)), axes, context,
                           is_leaf=is_none)  # fmt: skip
    # Slot caches are never reordered: `slot_rows[r, s]` is the row that holds slot s of beam r.
    reorder = jax.tree.map(lambda a, lazy: None if lazy else a, axes, slot_caches, is_leaf=is_none)
    lazy = any(jax.tree.leaves(slot_caches))
    rows = jnp.arange(b * k, dtype=jnp.int32)
    seqs = jnp.repeat(seqs[:, None], k, axis=1)
    state = dict(
        run_seqs=seqs, run_scores=jnp.zeros((b, k)).at[:, 1:].set(NEG_INF),
        seqs=seqs, scores=jnp.full((b, k), NEG_INF), finished=jnp.zeros((b, k), bool),
        unsatisfied=jnp.ones((b, 1), bool), any_open=jnp.bool_(True), cur=jnp.int32(prompt_len),
        ctx=context,
    )  # fmt: skip
    if lazy:
        state["slot_rows"] = jnp.broadcast_to(rows[:, None], (b * k, max_length))
    top_mask = jnp.arange(big_k) < k

    def cond(s):
        return (s["cur"] < max_length) & s["any_open"]

    def body(s):
        cur = s["cur"]
        ctx = dict(s["ctx"], slot_rows=s["slot_rows"]) if lazy else s["ctx"]
        logits, ctx = step(s["run_seqs"][:, :, cur - 1].reshape(b * k), cur - 1, ctx)
        if lazy:
            ctx = {key: value for key, value in ctx.items() if key != "slot_rows"}
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = apply_min_length(logp, cur, min_length, eos)
        vocab = logp.shape[-1]
        logp = logp.reshape(b, k, vocab) + s["run_scores"][:, :, None]
        top_lp, top_idx = top_k(logp.reshape(b, k * vocab), big_k)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather_beams(s["run_seqs"], parent)
        top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[:, :, None], cur, axis=2)
        hits = (token == eos) | (cur + 1 >= max_length)

        # The best num_beams candidates that have not stopped keep running.
        run_lp = top_lp + hits * NEG_INF
        next_idx = jax.lax.top_k(run_lp, k)[1]
        run_seqs = _gather_beams(top_seqs, next_idx)
        run_scores = _gather_beams(run_lp, next_idx)
        flat_parent = (_gather_beams(parent, next_idx) + jnp.arange(b)[:, None] * k).reshape(-1)
        ctx = jax.tree.map(per_leaf(lambda x, a: _take_rows(x, flat_parent, a)), reorder, ctx,
                           is_leaf=is_none)  # fmt: skip
        extra = {}
        if lazy:  # this step wrote slot cur - 1 of every row in place; then the beams moved
            extra["slot_rows"] = s["slot_rows"].at[:, cur - 1].set(rows)[flat_parent]

        # Candidates among the top num_beams that stopped compete with the finished hypotheses.
        just_done = hits & top_mask[None]
        # transformers normalises by the generated length (`cur_len + 1 - decoder_prompt_len`).
        fin_lp = top_lp / ((cur + 1 - prompt_len).astype(jnp.float32) ** length_penalty)
        if early_stopping is True:
            fin_lp = fin_lp + jnp.all(s["finished"], -1, keepdims=True) * NEG_INF
        fin_lp = fin_lp + (~s["unsatisfied"]) * NEG_INF + (~just_done) * NEG_INF
        merged_scores = jnp.concatenate([s["scores"], fin_lp], axis=1)
        keep = jax.lax.top_k(merged_scores, k)[1]
        seqs = _gather_beams(jnp.concatenate([s["seqs"], top_seqs], axis=1), keep)
        scores = _gather_beams(merged_scores, keep)
        finished = _gather_beams(jnp.concatenate([s["finished"], just_done], axis=1), keep)

        # transformers' early-stop heuristic: can a running beam still beat the worst finished one?
        cur = cur + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = jnp.asarray(max_length - prompt_len, jnp.float32)
        else:
            best_len = (cur - prompt_len).astype(jnp.float32)
        best_running = run_scores[:, :1] / best_len**length_penalty
        worst_done = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG_INF)
        unsatisfied = s["unsatisfied"] & jnp.any(best_running > worst_done, -1, keepdims=True)
        open_beam = ~(jnp.all(finished) & (early_stopping is True))
        any_open = jnp.any(unsatisfied) & open_beam & ~jnp.all(hits)
        return dict(run_seqs=run_seqs, run_scores=run_scores, seqs=seqs, scores=scores,
                    finished=finished, unsatisfied=unsatisfied, any_open=any_open, cur=cur,
                    ctx=ctx, **extra)  # fmt: skip

    out = jax.lax.while_loop(cond, body, state)
    seqs = out["seqs"][:, :num_return_sequences].reshape(b * num_return_sequences, max_length)
    is_eos = seqs[:, prompt_len:] == eos  # an EOS inside a prompt ends nothing
    first = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + prompt_len + 1, max_length)
    # Positions after the EOS hold whatever the buffer had: make them padding.
    seqs = jnp.where(jnp.arange(max_length)[None] < first[:, None], seqs, pad)
    return seqs, first.astype(jnp.int32)


def _token_id(cfg: Any, value: int | None, name: str) -> int | None:
    """A special token id: the argument, else the config's (None where neither has one, as a
    config.json with `"eos_token_id": null`: then generation runs to `max_length`)."""
    value = getattr(cfg, name, None) if value is None else value
    if isinstance(value, (list, tuple)):  # transformers allows several EOS ids; the first counts
        if len(value) > 1:
            raise ValueError(f"{name}={list(value)}: only one id is supported")
        value = value[0] if value else None
    return None if value is None else int(value)


# ==================================================================================================
# Entry point.
# ==================================================================================================


def _build(module: Any, settings: tuple):
    opts = dict(settings)

    def run(params, constants, input_ids, attention_mask, rng, inputs):
        variables = {"params": params}
        context = module.apply(variables, input_ids, attention_mask, opts["max_length"],
                               method="init_decoding", **inputs,
                               **dict(opts["head_options"]))  # fmt: skip
        hooks = _Hooks.of(type(module))
        axes, slot_caches = hooks.batch_axes(context), hooks.slot_caches(context)
        if constants is not None:
            context = dict(context, constants=constants)
            axes = dict(axes, constants=jax.tree.map(lambda _: None, constants))
            slot_caches = dict(slot_caches, constants=jax.tree.map(lambda _: False, constants))

        def step(tokens, index, ctx):
            logits, new = module.apply(variables, tokens, index, ctx, method="decode_step")
            if constants is not None:  # the same arrays every step, whatever the head returns
                new = dict(new, constants=constants)
            return logits, new

        batch, max_length = input_ids.shape[0], opts["max_length"]
        if opts["decoder_only"]:
            # The prompt is the start of every sequence; the head's prefill cached it.
            prompt_len = input_ids.shape[1]
            seqs = jnp.full((batch, max_length), opts["pad"], jnp.int32)
            seqs = seqs.at[:, :prompt_len].set(input_ids.astype(jnp.int32))
        else:
            prompt_len = 1
            seqs = jnp.full((batch, max_length), opts["pad"], jnp.int32).at[:, 0].set(opts["start"])
        common = dict(batch=batch, max_length=max_length, seqs=seqs, prompt_len=prompt_len,
                      eos=opts["eos"], pad=opts["pad"], min_length=opts["min_length"])  # fmt: skip
        if opts["num_beams"] > 1:
            return _beam_loop(
                step, context, axes, slot_caches, num_beams=opts["num_beams"],
                length_penalty=opts["length_penalty"], early_stopping=opts["early_stopping"],
                num_return_sequences=opts["num_return_sequences"], **common,
            )  # fmt: skip
        return _sample_loop(step, context, rng, sample=opts["do_sample"],
                            temperature=opts["temperature"], top_k=opts["top_k"],
                            top_p=opts["top_p"], **common)  # fmt: skip

    return jax.jit(run)


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_length: int = 0,
    min_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    prng_key: Any = None,
    seed: int = 0,
    **head_options: Any,
) -> np.ndarray:
    """Generates token ids for a `PretrainedModel` whose head can generate (see module docstring).

    Arguments mirror transformers' `generate` (same names, same defaults: `max_length` 20 when
    neither it nor `max_new_tokens` is given; `top_k` 50 only applies when sampling).

    Args:
      model: a `PretrainedModel` (e.g. `MT5ForConditionalGeneration`).
      input_ids: `[batch, length]` encoder inputs.
      attention_mask: `[batch, length]`, 1 = token, 0 = padding (default: all ones).
      prng_key / seed: randomness for `do_sample=True`.
      **head_options: the head's own options (its `decoding_options`), e.g. XLNet's `use_mems`,
        and its array inputs (`decoding_inputs`), e.g. a decoder's `encoder_hidden_states`.

    Returns:
      `[batch * num_return_sequences, n]` int32 numpy array, starting with the decoder start
      token (the prompt for `decoder_only` heads), finished rows padded with `pad_token_id`, `n`
      the longest generated length.
    """
    cfg = model.config
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    hooks = _Hooks.of(type(model.module))
    decoder_only = hooks.decoder_only
    # Lengths count the prompt for decoder-only heads, the start token for encoder-decoders.
    prompt_len = ids.shape[1] if decoder_only else 1
    if max_new_tokens is not None:
        max_length = prompt_len + max_new_tokens
    elif max_length is None:
        max_length = 20
    if max_length <= prompt_len:
        raise ValueError(f"max_length {max_length} leaves no room after {prompt_len} prompt tokens")
    if min_new_tokens is not None:
        min_length = prompt_len + min_new_tokens
    if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
        raise ValueError("need num_beams >= 1 and 1 <= num_return_sequences <= num_beams")
    if do_sample and num_beams > 1:
        raise NotImplementedError("beam sampling (do_sample with num_beams > 1) is not supported")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    inputs = {
        name: jnp.asarray(np.asarray(head_options.pop(name)))
        for name in hooks.inputs
        if head_options.get(name) is not None
    }
    head_options = {k: v for k, v in head_options.items() if k not in hooks.inputs}
    if hooks.options is None and head_options:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(head_options)}")
    head_opts = {} if hooks.options is None else hooks.options(cfg, **head_options)
    eos = _token_id(cfg, eos_token_id, "eos_token_id")
    # As transformers: no pad token -> the EOS pads; neither -> rows never finish, 0 fills prompts.
    pad = _token_id(cfg, pad_token_id, "pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    start = (
        None if decoder_only else _token_id(cfg, decoder_start_token_id, "decoder_start_token_id")
    )
    if start is None and not decoder_only:
        raise ValueError("generate needs a decoder_start_token_id (none given, none in the config)")
    settings = dict(
        max_length=int(max_length), min_length=int(min_length), num_beams=int(num_beams),
        do_sample=bool(do_sample), temperature=float(temperature), top_k=int(top_k or 0),
        top_p=float(top_p), length_penalty=float(length_penalty), early_stopping=early_stopping,
        num_return_sequences=int(num_return_sequences), eos=-1 if eos is None else eos, pad=pad,
        start=-1 if decoder_only else start,
        decoder_only=decoder_only, head_options=tuple(sorted(head_opts.items())),
    )  # fmt: skip
    cache = _cache(model)
    fn = cache.compiled(model.module, tuple(sorted(settings.items())))
    constants = cache.constants_for(model.module, model.params) if hooks.has_constants else None
    rng = jax.random.key(seed) if prng_key is None else prng_key
    seqs, lengths = fn(model.params, constants, jnp.asarray(ids), jnp.asarray(mask), rng, inputs)
    seqs, lengths = np.asarray(seqs), np.asarray(lengths)
    return seqs[:, : int(lengths.max())]
