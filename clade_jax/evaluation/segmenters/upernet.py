"""UperNet101 for ADE20K (CSAILVision semantic-segmentation-pytorch / PyPI mit-semseg 1.0.0).

Network (`UperNet101`): mit-semseg's `Resnet` wrapper around a deep-stem ResNet (three 3x3
conv-BN-ReLU, the first with stride 2, then a 3/2/1 max pool; bottleneck stride on the 3x3;
stages at stride 4/8/16/32) and the `UPerNet` head:

* PPM on the stride-32 features C5: for each pool scale s in (1, 2, 3, 6):
  AdaptiveAvgPool(s) -> bilinear upsample (align_corners=False) to C5's size -> 1x1 conv (512,
  hard-coded in the official code) -> BN -> ReLU. The conv comes AFTER the upsampling.
  concat [C5, 4 branches] -> 3x3 conv-BN-ReLU -> f (`ppm_last_conv`).
* FPN: for i = 2, 1, 0: f = fpn_in[i](C_i) (1x1 conv-BN-ReLU) + upsample(f); P_i = fpn_out[i](f)
  (3x3 conv-BN-ReLU). fuse = concat [P_0, up(P_1), up(P_2), up(PPM f)] at P_0's size ->
  `conv_last` = 3x3 conv-BN-ReLU, 1x1 conv with bias -> logits at 1/4 of the input.
* BatchNorm is mit's SynchronizedBatchNorm2d (eval: running statistics, eps 1e-5; its extra
  buffers are in the state dict and ignored).

Architecture arguments (`from_official("upernet101", state, **config)`): `layers` (blocks per
stage, default (3, 4, 23, 3) = ResNet-101), `width` (stem / first-stage width, default 64; the
official code hard-codes 64 and scales by 2 per stage), `fpn_dim` (default 512), `num_class`
(default 150). Derived: fc_dim = 32 * width, fpn_inplanes = (4, 8, 16, 32) * width.

Test-time protocol (mit-semseg dataset.py ValDataset, eval.py,
config/ade20k-resnet101-upernet.yaml):
  for each s in imgSizes (300, 375, 450, 525, 600) (single scale: (300,), the config's first
  entry; the official config has no single-scale setting):
    scale = min(s / min(H, W), 1000 / max(H, W)); th, tw = int(H * scale), int(W * scale),
    rounded up to multiples of 32; PIL BILINEAR resize of the uint8 RGB image to (tw, th) (on the
    host, with PIL); x = uint8 / 255, (x - ImageNet mean) / std;
    p_s = softmax(bilinear upsample (align_corners=False) of the logits to the label size)
  scores = sum over s in order of p_s / len(imgSizes); pred = argmax (first maximum).
Labels: ADE20K PNG value - 1 (0 -> -1, ignored); see `labels.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.evaluation.segmenters.resize import adaptive_avg_pool, interpolate_bilinear
from clade_jax.evaluation.segmenters.resnet import (
    BatchNorm,
    Conv2d,
    ConvBN,
    Entry,
    layer_entries,
    make_layer,
    max_pool,
    run_layer,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMG_SIZES = (300, 375, 450, 525, 600)
IMG_MAX_SIZE = 1000
PADDING_CONSTANT = 32
PPM_DIM = 512  # hard-coded in mit-semseg's UPerNet
POOL_SCALES = (1, 2, 3, 6)
DEFAULT_CONFIG = dict(layers=(3, 4, 23, 3), width=64, fpn_dim=512, num_class=150)


class DeepStemResNet(nnx.Module):
    """mit-semseg `Resnet(resnet101())` encoder; returns [C2, C3, C4, C5] (strides 4..32)."""

    def __init__(self, layers: Sequence[int], width: int, *, rngs: nnx.Rngs):
        if len(layers) != 4:
            raise ValueError(f"upernet101 layers must have 4 stages, got {list(layers)}")
        w = width
        sync = dict(sync_buffers=True)
        self.conv1 = Conv2d(3, w, 3, stride=2, padding=1, rngs=rngs)
        self.bn1 = BatchNorm(w, **sync)
        self.conv2 = Conv2d(w, w, 3, padding=1, rngs=rngs)
        self.bn2 = BatchNorm(w, **sync)
        self.conv3 = Conv2d(w, 2 * w, 3, padding=1, rngs=rngs)
        self.bn3 = BatchNorm(2 * w, **sync)
        stages, in_ch = [], 2 * w
        for i, blocks in enumerate(layers):
            planes = w * 2**i
            stages.append(
                make_layer(in_ch, planes, int(blocks), stride=1 if i == 0 else 2, rngs=rngs, **sync)
            )
            in_ch = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def __call__(self, x: jax.Array, taps: dict | None = None) -> list[jax.Array]:
        taps = {} if taps is None else taps
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        taps["encoder.relu1"] = x
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        taps["encoder.relu3"] = x
        x = max_pool(x, 3, 2, 1)
        taps["encoder.maxpool"] = x
        outs = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = run_layer(layer, x)
            taps[f"encoder.layer{i + 1}"] = x
            outs.append(x)
        return outs

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        for i in (1, 2, 3):
            yield from getattr(self, f"conv{i}").torch_entries(f"{prefix}conv{i}.")
            yield from getattr(self, f"bn{i}").torch_entries(f"{prefix}bn{i}.")
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            yield from layer_entries(layer, f"{prefix}layer{i + 1}.")


class UPerNetHead(nnx.Module):
    """mit-semseg `UPerNet` decoder (PPM + FPN); returns logits at C2's size (N, h, w, classes)."""

    def __init__(
        self,
        num_class: int,
        fc_dim: int,
        fpn_inplanes: Sequence[int],
        fpn_dim: int,
        pool_scales: Sequence[int] = POOL_SCALES,
        *,
        rngs: nnx.Rngs,
    ):
        kw = dict(sync_buffers=True, rngs=rngs)
        self.pool_scales = tuple(pool_scales)
        self.ppm_conv = nnx.List([ConvBN(fc_dim, PPM_DIM, 1, **kw) for _ in self.pool_scales])
        ppm_in = fc_dim + len(self.pool_scales) * PPM_DIM
        self.ppm_last_conv = ConvBN(ppm_in, fpn_dim, 3, padding=1, **kw)
        self.fpn_in = nnx.List([ConvBN(c, fpn_dim, 1, **kw) for c in fpn_inplanes[:-1]])
        self.fpn_out = nnx.List(
            [ConvBN(fpn_dim, fpn_dim, 3, padding=1, **kw) for _ in fpn_inplanes[:-1]]
        )
        self.conv_fusion = ConvBN(len(fpn_inplanes) * fpn_dim, fpn_dim, 3, padding=1, **kw)
        self.conv_logits = Conv2d(fpn_dim, num_class, 1, bias=True, rngs=rngs)

    def __call__(self, conv_out: list[jax.Array], taps: dict | None = None) -> jax.Array:
        taps = {} if taps is None else taps
        c5 = conv_out[-1]
        size = c5.shape[1:3]
        ppm = [c5]
        for i, (scale, conv) in enumerate(zip(self.pool_scales, self.ppm_conv, strict=True)):
            pooled = adaptive_avg_pool(c5, scale)
            taps[f"decoder.ppm_pooling.{i}"] = pooled
            y = conv(interpolate_bilinear(pooled, size))
            taps[f"decoder.ppm_conv.{i}"] = y
            ppm.append(y)
        f = self.ppm_last_conv(jnp.concatenate(ppm, axis=-1))
        taps["decoder.ppm_last_conv"] = f
        fpn = [f]
        for i in reversed(range(len(conv_out) - 1)):
            lateral = self.fpn_in[i](conv_out[i])
            taps[f"decoder.fpn_in.{i}"] = lateral
            f = lateral + interpolate_bilinear(f, lateral.shape[1:3])
            p = self.fpn_out[i](f)
            taps[f"decoder.fpn_out.{i}"] = p
            fpn.append(p)
        fpn.reverse()  # [P2, P3, P4, PPM f]
        out_size = fpn[0].shape[1:3]
        fused = jnp.concatenate([fpn[0]] + [interpolate_bilinear(p, out_size) for p in fpn[1:]], -1)
        x = self.conv_fusion(fused)
        taps["decoder.conv_last.0"] = x
        x = self.conv_logits(x)
        taps["decoder.conv_last"] = x
        return x

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        for i, conv in enumerate(self.ppm_conv):
            yield from conv.torch_entries(f"{prefix}ppm_conv.{i}.")
        yield from self.ppm_last_conv.torch_entries(f"{prefix}ppm_last_conv.")
        for i, conv in enumerate(self.fpn_in):
            yield from conv.torch_entries(f"{prefix}fpn_in.{i}.")
        for i, conv in enumerate(self.fpn_out):
            yield from conv.torch_entries(f"{prefix}fpn_out.{i}.0.")
        yield from self.conv_fusion.torch_entries(f"{prefix}conv_last.0.")
        yield from self.conv_logits.torch_entries(f"{prefix}conv_last.1.")


class UperNet101(nnx.Module):
    """Encoder + decoder as mit-semseg's `SegmentationModule` (names `encoder.*`, `decoder.*`)."""

    def __init__(
        self,
        layers: Sequence[int] = DEFAULT_CONFIG["layers"],
        width: int = DEFAULT_CONFIG["width"],
        fpn_dim: int = DEFAULT_CONFIG["fpn_dim"],
        num_class: int = DEFAULT_CONFIG["num_class"],
        *,
        rngs: nnx.Rngs,
    ):
        self.num_classes = int(num_class)
        self.encoder = DeepStemResNet(tuple(layers), int(width), rngs=rngs)
        fpn_inplanes = tuple(4 * width * 2**i for i in range(4))
        self.decoder = UPerNetHead(
            self.num_classes, fpn_inplanes[-1], fpn_inplanes, int(fpn_dim), rngs=rngs
        )

    def __call__(self, x: jax.Array, taps: dict | None = None) -> jax.Array:
        """(N, H, W, 3) normalised images -> logits (N, H/4, W/4, num_class)."""
        return self.decoder(self.encoder(x, taps), taps)

    def torch_entries(self, prefix: str = "") -> Iterator[Entry]:
        yield from self.encoder.torch_entries(prefix + "encoder.")
        yield from self.decoder.torch_entries(prefix + "decoder.")


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """mit-semseg's resized (h, w) for one imgSizes entry (round up to multiples of 32)."""
    scale = min(short_side / min(height, width), IMG_MAX_SIZE / max(height, width))
    th, tw = int(height * scale), int(width * scale)

    def up(v: int) -> int:
        return ((v - 1) // PADDING_CONSTANT + 1) * PADDING_CONSTANT

    return up(th), up(tw)


def normalize(images_u8: jax.Array) -> jax.Array:
    """uint8 RGB (N, H, W, 3) -> float32 (x / 255 - mean) / std, as mit's img_transform."""
    x = images_u8.astype(jnp.float32) / jnp.float32(255.0)
    return (x - IMAGENET_MEAN) / IMAGENET_STD
