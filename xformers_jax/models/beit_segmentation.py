"""BEiT dense heads: the multi-scale FPN, UperNet (pyramid pooling) and FCN heads, the backbone.

`BeitForSemanticSegmentation` takes 4 layers' patch tokens as `[batch, h, w, hidden]` maps,
brings them to 4x, 2x, 1x and 1/2x the patch grid (transposed convs / max pool), decodes them
with UperNet and an auxiliary FCN head, and returns logits at the patch-grid x 4 resolution
(HF's `[batch, num_labels, 4h, 4w]`). Unlike transformers, which reshapes with the config's grid,
the actual input grid is used, so any resolution divisible by the patch size works
(`hf_compat=True` refuses other resolutions, as transformers does).

BatchNorm keeps running statistics in the `batch_stats` collection: `deterministic=True` (eval)
reads them; `deterministic=False` normalises with the batch's statistics and updates the running
ones when `batch_stats` is mutable (`apply(..., mutable=['batch_stats'])`), torch-style
(momentum 0.1, unbiased running variance). Compute here is NHWC; inputs and outputs are NCHW.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xformers_jax.layers.dense import param_init
from xformers_jax.layers.losses import cross_entropy_with_ignore
from xformers_jax.models import outputs
from xformers_jax.models.beit import BeitModel, Encoder, resize_2d


class BatchNorm(nn.Module):
    """torch `BatchNorm2d` over the last axis of `[batch, h, w, channels]` (float32 statistics)."""

    epsilon: float = 1e-5
    momentum: float = 0.1  # torch's convention: running = (1 - m) running + m batch
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", param_init(nn.initializers.ones, ("conv_out",)), (c,),
                           self.param_dtype)  # fmt: skip
        bias = self.param("bias", param_init(nn.initializers.zeros, ("conv_out",)), (c,),
                          self.param_dtype)  # fmt: skip
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if self.deterministic:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean = jnp.mean(x32, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * n / max(n - 1, 1)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
        return y.astype(self.dtype)


def _batch_norm(cfg, eps, deterministic, name):
    dtype, pdtype = cfg.dtype, cfg.param_dtype
    return BatchNorm(eps, deterministic=deterministic, dtype=dtype, param_dtype=pdtype, name=name)


def _conv(features, kernel, padding, use_bias, cfg, name):
    dtype, pdtype = cfg.dtype, cfg.param_dtype
    return nn.Conv(
        features, (kernel, kernel), padding=((padding, padding), (padding, padding)),
        use_bias=use_bias, dtype=dtype, param_dtype=pdtype,
        kernel_init=param_init(nn.initializers.normal(cfg.initializer_range),
                               (None, None, "conv_in", "conv_out")),
        bias_init=param_init(nn.initializers.zeros, ("conv_out",)), name=name,
    )  # fmt: skip


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU (mmseg's ConvModule). NHWC in and out."""

    config: Any
    features: int
    kernel: int = 1
    padding: int = 0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        x = _conv(self.features, self.kernel, self.padding, False, self.config, "conv")(x)
        x = _batch_norm(self.config, 1e-5, self.deterministic, "bn")(x)
        return jax.nn.relu(x)


class ConvTranspose2x(nn.Module):
    """torch `ConvTranspose2d(kernel_size=2, stride=2)`: each pixel -> a 2x2 block. NHWC."""

    config: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = x.shape[-1]
        pdtype = cfg.param_dtype
        kernel = self.param(
            "kernel", param_init(nn.initializers.normal(cfg.initializer_range),
                                 (None, None, "conv_in", "conv_out")), (2, 2, d, d), pdtype,
        )  # fmt: skip
        bias = self.param("bias", param_init(nn.initializers.zeros, ("conv_out",)), (d,), pdtype)
        dtype = cfg.dtype
        y = jnp.einsum("bhwi,yxio->bhywxo", x.astype(dtype), jnp.asarray(kernel, dtype))
        b, h, _, w, _, o = y.shape
        return y.reshape(b, 2 * h, 2 * w, o) + jnp.asarray(bias, dtype)


class FPN(nn.Module):
    """4 same-size maps -> 4x, 2x, 1x, 1/2x (HF's fpn1..fpn4). NHWC lists in and out."""

    config: Any
    bn_eps: float = 1e-5
    deterministic: bool = True

    @nn.compact
    def __call__(self, features):
        cfg = self.config
        x = ConvTranspose2x(cfg, name="fpn1_0")(features[0])
        x = _batch_norm(cfg, self.bn_eps, self.deterministic, "fpn1_1")(x)
        x = ConvTranspose2x(cfg, name="fpn1_3")(jax.nn.gelu(x, approximate=False))
        y = ConvTranspose2x(cfg, name="fpn2_0")(features[1])
        z = nn.max_pool(features[3], (2, 2), strides=(2, 2), padding="VALID")
        return [x, y, features[2], z]


class UperHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest map, a top-down FPN, fused 3x3 conv, classifier.

    4 NHWC maps (finest first) -> `[batch, h0, w0, num_labels]` at the finest map's size.
    """

    config: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, features):
        cfg = self.config
        ch = cfg.hidden_size
        cm = lambda name, k=1, p=0: ConvModule(cfg, ch, k, p, self.deterministic, name=name)  # noqa: E731
        top = features[-1]
        size = top.shape[1:3]
        psp = [top]
        for j, scale in enumerate(cfg.pool_scales):
            pooled = resize_2d(top, (scale, scale), "adaptive_avg")
            psp.append(resize_2d(cm(f"psp_modules_{j}")(pooled), size, "bilinear"))
        laterals = [cm(f"lateral_convs_{i}")(f) for i, f in enumerate(features[:-1])]
        laterals.append(cm("bottleneck", 3, 1)(jnp.concatenate(psp, axis=-1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_2d(
                laterals[i], laterals[i - 1].shape[1:3], "bilinear"
            )
        outs = [cm(f"fpn_convs_{i}", 3, 1)(laterals[i]) for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [resize_2d(o, outs[0].shape[1:3], "bilinear") for o in outs[1:]]
        x = cm("fpn_bottleneck", 3, 1)(jnp.concatenate(outs, axis=-1))
        return _conv(cfg.num_labels, 1, 0, True, cfg, "classifier")(x)


class FCNHead(nn.Module):
    """The auxiliary FCN head on feature map `in_index`: convs (+ concat), classifier. NHWC."""

    config: Any
    in_index: int = 2
    deterministic: bool = True

    @nn.compact
    def __call__(self, features):
        cfg = self.config
        x = h = features[self.in_index]
        for j in range(cfg.auxiliary_num_convs):
            h = ConvModule(cfg, cfg.auxiliary_channels, 3, 1, self.deterministic,
                           name=f"convs_{j}")(h)  # fmt: skip
        if cfg.auxiliary_concat_input:
            h = ConvModule(cfg, cfg.auxiliary_channels, 3, 1, self.deterministic,
                           name="conv_cat")(jnp.concatenate([x, h], axis=-1))  # fmt: skip
        return _conv(cfg.num_labels, 1, 0, True, cfg, "classifier")(h)


def _to_map(h, grid):
    """`[batch, 1 + n, hidden]` tokens -> `[batch, gh, gw, hidden]` patch map (CLS dropped)."""
    return h[:, 1:].reshape(h.shape[0], grid[0], grid[1], h.shape[-1])


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


def segmentation_loss(logits, aux_logits, labels, config) -> jax.Array:
    """HF's loss: bilinear upsampling to the label size, CE ignoring `semantic_loss_ignore_index`,
    plus `auxiliary_loss_weight` times the auxiliary head's. Logits NHWC, labels `[b, H, W]`."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    size = labels.shape[-2:]
    ignore = config.semantic_loss_ignore_index
    up = resize_2d(logits.astype(jnp.float32), size, "bilinear")
    loss = cross_entropy_with_ignore(up, labels, ignore)
    if aux_logits is not None:
        aux = resize_2d(aux_logits.astype(jnp.float32), size, "bilinear")
        loss = loss + config.auxiliary_loss_weight * cross_entropy_with_ignore(aux, labels, ignore)
    return loss


class BeitForSemanticSegmentation(nn.Module):
    """BEiT + FPN + UperNet (+ FCN auxiliary head) (HF `BeitForSemanticSegmentation`).

    `pixel_values` `[batch, channels, H, W]` -> `SemanticSegmenterOutput` with `logits`
    `[batch, num_labels, 4H/p, 4W/p]`; `labels` `[batch, H', W']` gives HF's loss.
    """

    config: Any

    @nn.compact
    def __call__(
        self,
        pixel_values,
        head_mask=None,
        labels=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        deterministic: bool = True,
    ) -> outputs.SemanticSegmenterOutput:
        cfg = self.config
        if len(cfg.out_indices) != 4:
            raise ValueError(f"segmentation needs 4 out_indices, got {cfg.out_indices}")
        grid = (pixel_values.shape[2] // cfg.patch_size, pixel_values.shape[3] // cfg.patch_size)
        if cfg.hf_compat and grid != cfg.window_size:
            raise ValueError(
                f"hf_compat: transformers' segmentation only works at image_size {cfg.image_size}"
            )
        out = BeitModel(cfg, add_pooling_layer=False, name="beit")(
            pixel_values, None, head_mask, output_attentions, True, interpolate_pos_encoding,
            deterministic,
        )  # fmt: skip
        # HF's selection: hidden_states[idx] for idx + 1 in out_indices, in layer order.
        feats = [
            _to_map(h, grid) for i, h in enumerate(out.hidden_states) if i + 1 in cfg.out_indices
        ]
        feats = FPN(cfg, 1e-5, deterministic, name="fpn")(feats)
        logits = UperHead(cfg, deterministic, name="decode_head")(feats)
        aux = None
        if cfg.use_auxiliary_head:
            aux = FCNHead(cfg, 2, deterministic, name="auxiliary_head")(feats)
        loss = None
        if labels is not None:
            if cfg.num_labels == 1:
                raise ValueError("The number of labels should be greater than one")
            loss = segmentation_loss(logits, aux, labels, cfg)
        return outputs.SemanticSegmenterOutput(
            loss=loss,
            logits=_nchw(logits),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions,
        )


class BeitBackbone(nn.Module):
    """Feature maps of the `out_features` stages (HF `BeitBackbone`).

    Stages are `stem` (the embeddings) and `stage1..L`; maps are `[batch, hidden, h, w]` when
    `reshape_hidden_states` (else `[batch, 1 + n, hidden]`), through the FPN when `add_fpn`.
    """

    config: Any

    @nn.compact
    def __call__(
        self,
        pixel_values,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        deterministic: bool = True,
    ) -> outputs.BackboneOutput:
        cfg = self.config
        _, hidden, attn, grid = Encoder(cfg, name="encoder")(
            pixel_values, None, None, output_attentions, True, deterministic
        )
        maps = []
        for stage, h in zip(cfg.stage_names, hidden):
            if stage in cfg.out_features:
                maps.append(_to_map(h, grid) if cfg.reshape_hidden_states else h)
        if cfg.add_fpn:
            if len(maps) != 4 or not cfg.reshape_hidden_states:
                raise ValueError("add_fpn needs 4 out_features and reshape_hidden_states")
            maps = FPN(cfg, cfg.batch_norm_eps, deterministic, name="fpn")(maps)
        if cfg.reshape_hidden_states:
            maps = [_nchw(m) for m in maps]
        return outputs.BackboneOutput(
            feature_maps=tuple(maps),
            hidden_states=hidden if output_hidden_states else None,
            attentions=attn,
        )
