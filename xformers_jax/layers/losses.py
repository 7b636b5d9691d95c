"""Vocabulary-scale losses that never materialise `[tokens, vocab]` logits.

`chunked_cross_entropy` scores features against a (tied) output embedding one vocabulary chunk
at a time under `lax.scan`, keeping a running logsumexp, the label's logit and a running argmax.
Each scan step is rematerialised (`jax.checkpoint`), so the backward pass also holds one
`[tokens, chunk]` block at a time: peak memory is O(tokens * chunk) instead of O(tokens * vocab),
which is what makes 250k (XLM-R-XL) and 900k (XLM-V) vocabularies trainable at long batches.

Chunks are *strided* (chunk `c` holds vocabulary ids `c, c + n_chunks, c + 2 n_chunks, ...`):
with the vocabulary axis of the table sharded contiguously over the `tensor` mesh axis, every
chunk is then spread over all tensor shards instead of living on one of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity" for padded vocabulary rows (keeps gradients NaN-free)


def chunked_cross_entropy(
    features: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    *,
    chunk_size: int = 8192,
    ignore_index: int = -100,
) -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy of `features @ embedding.T + bias` against `labels`, chunked over vocab.

    Equals `optax.softmax_cross_entropy_with_integer_labels` of the full logits (float32), but
    only ever holds one `[tokens, chunk_size]` block of logits, forward and backward.

    Args:
      features: `[..., hidden]` (any float dtype; the matmul runs in its dtype, the softmax in
        float32).
      embedding: `[vocab, hidden]` output table (tied word embeddings).
      bias: `[vocab]` output bias, or None.
      labels: `[...]` int ids; `ignore_index` entries get loss 0.
      chunk_size: vocabulary entries per scan step (rounded so the chunks cover the vocab evenly).
      ignore_index: label value to skip.

    Returns:
      `(losses, predictions)`: float32 `[...]` per-token losses (0 where ignored) and int32 `[...]`
      argmax ids of the logits (for accuracy).
    """
    vocab, hidden = embedding.shape
    lead = labels.shape
    x = features.reshape(-1, hidden)
    y = labels.reshape(-1)
    n_chunks = max(1, -(-vocab // max(1, int(chunk_size))))
    chunk = -(-vocab // n_chunks)
    pad = chunk * n_chunks - vocab
    table = jnp.asarray(embedding, x.dtype)
    b = jnp.zeros((vocab,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    if pad:
        table = jnp.pad(table, ((0, pad), (0, 0)))
        b = jnp.pad(b, (0, pad), constant_values=_NEG)
    # Strided chunks: vocab id = row * n_chunks + c for row < chunk, chunk c < n_chunks.
    table = jnp.swapaxes(table.reshape(chunk, n_chunks, hidden), 0, 1)
    table = nn.with_logical_constraint(table, (None, "act_vocab", None))
    b = b.reshape(chunk, n_chunks).T

    valid = y != ignore_index
    safe = jnp.where(valid, y, 0)
    label_chunk, label_row = safe % n_chunks, safe // n_chunks
    n = x.shape[0]

    def body(carry, inputs):
        m, s, label_logit, best, best_id = carry
        c, w, bc = inputs
        logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32) + bc
        logits = nn.with_logical_constraint(logits, (None, "act_vocab"))
        cmax = jnp.max(logits, axis=-1)
        new_m = jnp.maximum(m, cmax)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=-1)
        here = jnp.take_along_axis(logits, label_row[:, None], axis=-1)[:, 0]
        label_logit = jnp.where(label_chunk == c, here, label_logit)
        arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) * n_chunks + c
        # Ties go to the smaller id, as a plain argmax over the whole vocabulary does.
        better = (cmax > best) | ((cmax == best) & (arg < best_id))
        best_id = jnp.where(better, arg, best_id)
        best = jnp.maximum(best, cmax)
        return (new_m, s, label_logit, best, best_id), None

    init = (
        jnp.full((n,), _NEG, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.int32),
    )
    xs = (jnp.arange(n_chunks, dtype=jnp.int32), table, b)
    (m, s, label_logit, _, best_id), _ = jax.lax.scan(
        jax.checkpoint(body, prevent_cse=False), init, xs
    )
    losses = jnp.where(valid, m + jnp.log(s) - label_logit, 0.0)
    return losses.reshape(lead), best_id.reshape(lead)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """`x[b, positions[b, p]]`: `[batch, length, ...]`, `[batch, P]` -> `[batch, P, ...]`.

    Negative positions (padding of a fixed-size position list) read position 0; mask them with
    the labels.
    """
    idx = jnp.maximum(positions, 0)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)
