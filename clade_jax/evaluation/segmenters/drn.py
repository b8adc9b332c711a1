"""DRN-D-105 for Cityscapes (fyu/drn `segment.DRNSeg('drn_d_105', 19)`).

Network (`DRNSeg`, names `base.<i>.*`, `seg.*`, `up.weight`):
* base = the DRN's layer0..layer8 (`nn.Sequential(*children()[:-2])`, so the state-dict index
  is the position among the layers that exist):
  layer0 7x7 conv (stride 1, pad 3) BN ReLU; layer1 / layer2 `_make_conv_layers` (3x3 conv-BN-ReLU,
  layer2 with stride 2 on its first conv; names `<i>.<3j>` conv, `<i>.<3j+1>` BN);
  layer3 / layer4 bottleneck stages with stride 2 (stride on the 3x3); layer5 dilation 2,
  layer6 dilation 4 (stride 1, 3x3 padding = dilation; `new_level=False`); layer7 3x3 conv layers
  dilation 2, layer8 dilation 1. layers[5..7] == 0 drops that layer (as the official `None`).
  A projection shortcut where the stride or the channel count changes.
* seg = 1x1 conv with bias -> classes logits at 1/8;
  up = ConvTranspose2d(classes, classes, 16, stride 8, padding 4, groups=classes, no bias) whose
  weight is the fixed bilinear kernel of `fill_up_weights` (stored in the file as `up.weight`
  and counted by `parameters()`, so it is an `nnx.Param` here); output = 8 x the 1/8 map;
  log_softmax over classes.

Architecture arguments: `layers` (default (1, 1, 3, 4, 23, 3, 1, 1)), `channels` (default
(16, 32, 64, 128, 256, 512, 512, 512)), `classes` (default 19).

Test-time protocol (segment.py test() / test_ms() / resize_4d_tensor, data_transforms.py):
* x = uint8 / 255, (x - mean) / std with the Cityscapes info.json mean / std.
* single scale (`test()`): log_probs = model(x)[0] at 8 * ceil(ceil(ceil(H/2)/2)/2) etc. The
  official single-scale path does NOT resize, so for sizes not divisible by 8 its map is larger
  than the label; like the fixtures (and like `test_ms()` does for every scale) we resize it to
  the label size with `resize_4d_tensor` (PIL BILINEAR on float32 maps, antialiased when
  shrinking; reproduced on the device by `resize.pil_resize_float`). Sizes divisible by 8 (the
  papers' 256 x 512 and 512 x 1024) need no resize: then this is exactly `test()`.
* multi scale (`test_ms()`): inputs [x] + [PIL BICUBIC resize of the uint8 image to
  (int(W * s), int(H * s)) for s in (0.5, 0.75, 1.25, 1.5, 1.75)] (on the host, with PIL), each
  normalised; each log_probs map resized to the label size (skipped when it already has it);
  scores = their sum, in that order; pred = argmax.
  Deviation: the official code resizes every map to the IMAGE size; we resize to `label_size`,
  which is the same whenever labels and images have the same size (every official use).
Labels: Cityscapes labelIds -> 19 trainIds (prepare_data.py id2label); see `labels.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.evaluation.segmenters.resnet import (
    HIGHEST,
    Conv2d,
    ConvBN,
    Entry,
    layer_entries,
    make_layer,
    run_layer,
)

# datasets/cityscapes/info.json (full precision, as the fixtures' meta/json records them)
CITYSCAPES_MEAN = np.array([0.29010095242892997, 0.32808144844279574, 0.28696394422942517])
CITYSCAPES_STD = np.array([0.1829540508368939, 0.18656561047509476, 0.18447508988480435])
MS_SCALES = (0.5, 0.75, 1.25, 1.5, 1.75)
DEFAULT_CONFIG = dict(
    layers=(1, 1, 3, 4, 23, 3, 1, 1), channels=(16, 32, 64, 128, 256, 512, 512, 512), classes=19
)
UP_KERNEL, UP_STRIDE, UP_PADDING = 16, 8, 4
# (stride, dilation) of the bottleneck layers 3..6
_STRIDE_DILATION = ((2, 1), (2, 1), (1, 2), (1, 4))


def bilinear_up_kernel(size: int = UP_KERNEL) -> np.ndarray:
    """`segment.fill_up_weights`: the (size, size) bilinear kernel of the fixed upsampler."""
    f = math.ceil(size / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    r = 1 - np.abs(np.arange(size) / f - c)
    return np.outer(r, r).astype(np.float32)


class ConvLayers(nnx.Module):
    """`DRN._make_conv_layers`: `convs` x (3x3 conv-BN-ReLU), stride on the first."""

    def __init__(self, in_ch: int, out_ch: int, convs: int, stride: int, dilation: int, rngs):
        self.convs = nnx.List(
            [
                ConvBN(
                    in_ch if j == 0 else out_ch,
                    out_ch,
                    3,
                    stride=stride if j == 0 else 1,
                    padding=dilation,
                    dilation=dilation,
                    rngs=rngs,
                )
                for j in range(convs)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = conv(x)
        return x

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        for j, conv in enumerate(self.convs):
            yield from conv.conv.torch_entries(f"{prefix}{3 * j}.")
            yield from conv.bn.torch_entries(f"{prefix}{3 * j + 1}.")


class DRNSeg(nnx.Module):
    """fyu/drn `DRNSeg` with a D-type DRN of Bottleneck blocks; returns (log_probs, seg logits)."""

    def __init__(
        self,
        layers: Sequence[int] = DEFAULT_CONFIG["layers"],
        channels: Sequence[int] = DEFAULT_CONFIG["channels"],
        classes: int = DEFAULT_CONFIG["classes"],
        *,
        rngs: nnx.Rngs,
    ):
        layers, channels = [int(v) for v in layers], [int(v) for v in channels]
        if len(layers) != 8 or len(channels) != 8:
            raise ValueError(
                f"drn_d_105 layers and channels need 8 entries, got {layers} and {channels}"
            )
        if min(layers[:5]) < 1:
            raise ValueError(f"drn_d_105 layers[0..4] must be >= 1, got {layers}")
        self.num_classes = int(classes)
        base = [ConvBN(3, channels[0], 7, padding=3, rngs=rngs)]
        base.append(ConvLayers(channels[0], channels[0], layers[0], 1, 1, rngs))
        base.append(ConvLayers(channels[0], channels[1], layers[1], 2, 1, rngs))
        in_ch = channels[1]
        for i, (stride, dilation) in zip((2, 3, 4, 5), _STRIDE_DILATION, strict=True):
            if layers[i] == 0:
                continue
            base.append(
                make_layer(
                    in_ch, channels[i], layers[i], stride=stride, dilation=dilation, rngs=rngs
                )
            )
            in_ch = channels[i] * 4
        for i, dilation in ((6, 2), (7, 1)):
            if layers[i] == 0:
                continue
            base.append(ConvLayers(in_ch, channels[i], layers[i], 1, dilation, rngs))
            in_ch = channels[i]
        self.base = nnx.List(base)
        self.seg = Conv2d(channels[-1], self.num_classes, 1, bias=True, rngs=rngs)
        kernel = np.broadcast_to(bilinear_up_kernel()[:, :, None, None], (16, 16, 1, classes))
        self.up = nnx.Param(jnp.asarray(kernel))  # (kh, kw, 1, classes), torch (C, 1, kh, kw)

    def upsample(self, x: jax.Array) -> jax.Array:
        """ConvTranspose2d(k 16, stride 8, pad 4, groups C): a conv of the 8x-dilated input with
        the flipped kernel and padding k - 1 - p."""
        pad = UP_KERNEL - 1 - UP_PADDING
        return jax.lax.conv_general_dilated(
            x,
            self.up[::-1, ::-1],
            window_strides=(1, 1),
            padding=((pad, pad), (pad, pad)),
            lhs_dilation=(UP_STRIDE, UP_STRIDE),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.num_classes,
            precision=HIGHEST,
        )

    def __call__(self, x: jax.Array, taps: dict | None = None) -> tuple[jax.Array, jax.Array]:
        """(N, H, W, 3) normalised -> (log_probs (N, 8*ceil(H/8), ..., C), logits at 1/8)."""
        taps = {} if taps is None else taps
        for i, layer in enumerate(self.base):
            x = run_layer(layer, x) if isinstance(layer, nnx.List) else layer(x)
            taps[f"base.{i}"] = x
        logits = self.seg(x)
        taps["seg"] = logits
        y = self.upsample(logits)
        taps["up"] = y
        return jax.nn.log_softmax(y, axis=-1), logits

    def torch_entries(self, prefix: str = "") -> Iterator[Entry]:
        for i, layer in enumerate(self.base):
            if isinstance(layer, nnx.List):
                yield from layer_entries(layer, f"{prefix}base.{i}.")
            elif isinstance(layer, ConvLayers):
                yield from layer.torch_entries(f"{prefix}base.{i}.")
            else:
                yield from layer.torch_entries(f"{prefix}base.{i}.")
        yield from self.seg.torch_entries(prefix + "seg.")
        c = self.num_classes
        yield Entry(prefix + "up.weight", self.up, (c, 1, UP_KERNEL, UP_KERNEL), _up_to_ours)


def _up_to_ours(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (C, 1, kh, kw) -> (kh, kw, 1, C)


def normalize(images_u8: jax.Array) -> jax.Array:
    """uint8 RGB (N, H, W, 3) -> float32 (x / 255 - mean) / std (data_transforms.py)."""
    x = images_u8.astype(jnp.float32) / jnp.float32(255.0)
    return (x - CITYSCAPES_MEAN.astype(np.float32)) / CITYSCAPES_STD.astype(np.float32)
