"""Fused (flash) attention kernels behind `attention.attention(..., kernel="flash")`.

Never materialises the `[batch, heads, q, k]` probabilities: the score matrix lives only in
on-chip blocks, and the backward recomputes it from the saved row statistics.

- TPU: the Pallas kernel `jax.experimental.pallas.ops.tpu.flash_attention` (additive bias `ab`,
  segment ids, causal), run per device under `shard_map` (a Mosaic call is opaque to XLA's
  partitioner, which would otherwise gather its operands onto every device). Sequence lengths
  are padded to a multiple of 128 (the kernel's smallest block); padded keys are masked through
  the segment ids and padded queries dropped.
- CPU: the same TPU kernel in Pallas's TPU interpret mode (`pltpu.force_tpu_interpret_mode`),
  forward and backward: slow, for tests and checks against `einsum`.
- GPU: `jax.nn.dot_product_attention(..., implementation="cudnn")` (bias and mask; bfloat16 or
  float16 only).

Masks come structured (`attention.Mask`: a `[batch, k]` key mask and a causal flag): the key
mask becomes segment ids (queries id 1, keys id 1 or 0 at padding). Any other boolean mask is
folded into the additive bias.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the TPU kernel's smallest block (lanes); lengths are padded to a multiple of it
# Added to masked scores folded into a bias. Finite and far below any real score, yet far from
# float32's limits: `score + MASKED` rounds to MASKED, so a fully masked row stays uniform as in
# `dot_product_attention`.
MASKED = -1e30


def block_sizes(q_len: int, kv_len: int):
    """The TPU kernel's `BlockSizes` for padded lengths (multiples of 128): the largest of 512 /
    256 / 128 dividing each."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    def pick(n: int) -> int:
        return next(b for b in (512, 256, BLOCK) if n % b == 0)

    bq, bk = pick(q_len), pick(kv_len)
    return tpu_flash.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
    )  # fmt: skip


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _tpu_kernel(q, k, v, bias, q_seg, kv_seg, *, causal: bool, scale: float):
    """Per-device kernel call: `q` `[b, h, q, d]`, `k`/`v` `[b, h, k, d]` (padded lengths), `bias`
    `[b or 1, h, q, k]` or None, segment ids `[b, q]` / `[b, k]` or None."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    if bias is not None:
        bias = jnp.broadcast_to(bias, (q.shape[0], *bias.shape[1:]))
    seg = None if q_seg is None else tpu_flash.SegmentIds(q=q_seg, kv=kv_seg)
    return tpu_flash.flash_attention(
        q, k, v, bias, seg, causal=causal, sm_scale=scale,
        block_sizes=block_sizes(q.shape[2], k.shape[2]),
    )  # fmt: skip


def _interpreted(fn):
    """`fn` with every Pallas call of its forward and backward traced in TPU interpret mode.

    The interpret switch is read when a kernel is traced; a backward is traced after the
    forward's call returned, so both are wrapped here (the forward's VJP closure is a pytree of
    residuals, carried to the backward).
    """
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def run(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def fwd(*args):
        with pltpu.force_tpu_interpret_mode():
            out, vjp = jax.vjp(fn, *args)
        return out, vjp

    def bwd(vjp, dout):
        with pltpu.force_tpu_interpret_mode():
            return vjp(dout)

    run.defvjp(fwd, bwd)
    return run


def _mesh_specs(batch: int, heads: int):
    """(mesh, batch spec, heads spec) of the current mesh and logical rules, or None without a
    mesh: the batch on `act_batch`'s mesh axes, the heads on `act_heads'`, each only where
    they divide it (else that dim is whole on every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None

    def divides(axes, n):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = 1
        for a in names:
            size *= mesh.shape[a]
        return axes if n % size == 0 else None

    spec = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
    return mesh, divides(spec[0], batch), divides(spec[1], heads)


def tpu_flash_attention(q, k, v, *, key_mask, causal, bias, scale, interpret: bool):
    """The Pallas TPU kernel on `[b, L, h, d]` layouts; `key_mask` `[b, k]` or None, `bias`
    broadcastable to `[b, h, q, k]` (float32) or None. Returns `[b, q, h, d]`."""
    b, q_len, h, _ = q.shape
    kv_len = k.shape[1]
    if causal and q_len != kv_len:
        raise ValueError(f"causal flash attention needs q_len == kv_len, got {q_len}, {kv_len}")
    qp, kp = _round_up(q_len), _round_up(kv_len)
    heads_major = lambda t, n: jnp.pad(  # noqa: E731
        t.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, n - t.shape[1]), (0, 0))
    )
    qt, kt, vt = heads_major(q, qp), heads_major(k, kp), heads_major(v, kp)
    q_seg = kv_seg = None
    if key_mask is not None or kp != kv_len:
        keys = jnp.ones((b, kv_len), jnp.int32) if key_mask is None else key_mask > 0
        kv_seg = jnp.pad(jnp.broadcast_to(keys, (b, kv_len)).astype(jnp.int32),
                         ((0, 0), (0, kp - kv_len)))  # fmt: skip
        q_seg = jnp.ones((b, qp), jnp.int32)
    if bias is not None:
        bias = bias.astype(jnp.float32)
        bias = jnp.broadcast_to(bias, (*bias.shape[:-2], q_len, kv_len))
        if bias.ndim < 4:
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, (bias.shape[0], h, q_len, kv_len))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, qp - q_len), (0, kp - kv_len)))
    kernel = functools.partial(_tpu_kernel, causal=causal, scale=scale)
    if interpret:
        kernel = _interpreted(kernel)
    specs = _mesh_specs(b, h)
    if specs is not None:
        mesh, bs, hs = specs
        bias_spec = None if bias is None else P(bs if bias.shape[0] == b else None, hs)
        seg_spec = None if q_seg is None else P(bs)
        kernel = jax.shard_map(
            kernel, mesh=mesh, check_vma=False,
            in_specs=(P(bs, hs), P(bs, hs), P(bs, hs), bias_spec, seg_spec, seg_spec),
            out_specs=P(bs, hs),
        )  # fmt: skip
    out = kernel(qt, kt, vt, bias, q_seg, kv_seg)
    return out[:, :, :q_len].transpose(0, 2, 1, 3)


def gpu_flash_attention(q, k, v, *, key_mask, causal, bias, scale):
    """cuDNN's fused attention on `[b, L, h, d]`. jax's bias is added after the scale, ours
    before it: passed as `bias * scale`."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention_kernel 'flash' on GPU (cuDNN) needs a bfloat16 or float16 model dtype, "
            f"got {q.dtype}; use 'auto' or 'einsum'"
        )
    mask = None if key_mask is None else (key_mask > 0)[:, None, None, :]
    if bias is not None:
        bias = (bias.astype(jnp.float32) * scale).astype(q.dtype)
    return jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), bias=bias, mask=mask, scale=scale,
        is_causal=causal, implementation="cudnn",
    )  # fmt: skip
