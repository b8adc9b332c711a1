"""DeepLabV2 ResNet-101 MSC for COCO-Stuff 164k (kazuto1011/deeplab-pytorch).

Network (`DeepLabV2`, names `base.*` as inside the official `MSC` wrapper):
* layer1 = `_Stem`: 7x7/2 conv (pad 3) + BN + ReLU (`layer1.conv1.{conv,bn}`), then
  MaxPool2d(3, 2, 1, ceil_mode=True).
* layer2..5 = `_ResLayer`s of `_Bottleneck`s (1x1 reduce carrying the stride, 3x3 with
  padding = dilation, 1x1 increase, projection shortcut in every stage's first block), stride /
  dilation (1, 1), (2, 1), (1, 2), (1, 4): output stride 8. Channels ch = width * 2**p
  (the official code hard-codes width 64).
* ASPP: the SUM of four 3x3 convs with bias, padding = dilation = atrous_rates (6, 12, 18, 24).
* BatchNorm: nn.BatchNorm2d eval (eps 1e-5).

Architecture arguments: `n_blocks` (default (3, 4, 23, 3)), `width` (default 64), `n_classes`
(default 182), `atrous_rates` (default (6, 12, 18, 24)).

Test-time protocol (libs/datasets/cocostuff.py, libs/datasets/base.py with augment=False,
main.py test(), libs/models/msc.py, configs/cocostuff164k.yaml):
* x = BGR float32 image minus the BGR mean (104.008, 116.669, 122.675); numpy computes the
  float32 - float64 difference in float64 and stores float32: `preprocess` (host) does the
  same, `preprocess_device` looks the identical values up in a (256, 3) table. No resize, no std.
* single scale: logits = base(x).
* multi scale (the MSC model): l1 = base(x); lp = base(interpolate(x, scale_factor=p)) for
  p in (0.5, 0.75), with torch >= 1.6 scale_factor semantics (output floor(in * p), source
  coordinates from 1 / p; the repo era's torch <= 1.4 used the in/out size ratio: the two agree
  when in * p is an integer, e.g. 256 x 256 inputs); each lp bilinearly resized to l1's size;
  logits = elementwise max of the three (on logits, before softmax).
* logits -> bilinear resize (align_corners=False) to the label size -> softmax -> argmax.
Labels: COCO-Stuff class ids as stored (0..181), 255 = unlabeled (ignored); see `labels.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.evaluation.segmenters.resize import interpolate_bilinear
from clade_jax.evaluation.segmenters.resnet import (
    Conv2d,
    ConvBN,
    Entry,
    layer_entries,
    make_layer,
    max_pool,
    run_layer,
)

MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float64)
MSC_SCALES = (0.5, 0.75)
DEFAULT_CONFIG = dict(n_blocks=(3, 4, 23, 3), width=64, n_classes=182)
ATROUS_RATES = (6, 12, 18, 24)
# (stride, dilation) of layer2..layer5
_STAGES = ((1, 1), (2, 1), (1, 2), (1, 4))


class DeepLabV2(nnx.Module):
    """The official `DeepLabV2` (the `base` of `MSC`): (N, H, W, 3) -> logits at 1/8."""

    def __init__(
        self,
        n_blocks: Sequence[int] = DEFAULT_CONFIG["n_blocks"],
        width: int = DEFAULT_CONFIG["width"],
        n_classes: int = DEFAULT_CONFIG["n_classes"],
        atrous_rates: Sequence[int] = ATROUS_RATES,
        *,
        rngs: nnx.Rngs,
    ):
        if len(n_blocks) != 4:
            raise ValueError(f"deeplabv2 n_blocks must have 4 stages, got {list(n_blocks)}")
        self.num_classes = int(n_classes)
        ch = [int(width) * 2**p for p in range(6)]
        self.stem = ConvBN(3, ch[0], 7, stride=2, padding=3, names=("conv", "bn"), rngs=rngs)
        stages, in_ch = [], ch[0]
        for i, (blocks, (stride, dilation)) in enumerate(zip(n_blocks, _STAGES, strict=True)):
            out_ch = ch[i + 2]
            stages.append(
                make_layer(
                    in_ch,
                    out_ch // 4,
                    int(blocks),
                    stride=stride,
                    dilation=dilation,
                    style="deeplab",
                    rngs=rngs,
                )
            )
            in_ch = out_ch
        self.layer2, self.layer3, self.layer4, self.layer5 = stages
        self.rates = tuple(int(r) for r in atrous_rates)
        self.aspp = nnx.List(
            [
                Conv2d(ch[5], self.num_classes, 3, padding=r, dilation=r, bias=True, rngs=rngs)
                for r in self.rates
            ]
        )

    def __call__(self, x: jax.Array, taps: dict | None = None) -> jax.Array:
        taps = {} if taps is None else taps
        x = self.stem(x)
        taps["base.layer1.conv1"] = x
        x = max_pool(x, 3, 2, 1, ceil_mode=True)
        taps["base.layer1"] = x
        for i, layer in enumerate((self.layer2, self.layer3, self.layer4, self.layer5)):
            x = run_layer(layer, x)
            taps[f"base.layer{i + 2}"] = x
        out = None
        for i, conv in enumerate(self.aspp):
            y = conv(x)
            taps[f"base.aspp.c{i}"] = y
            out = y if out is None else out + y
        taps["base.aspp"] = out
        return out

    def torch_entries(self, prefix: str = "base.") -> Iterator[Entry]:
        yield from self.stem.torch_entries(prefix + "layer1.conv1.")
        for i, layer in enumerate((self.layer2, self.layer3, self.layer4, self.layer5)):
            yield from layer_entries(layer, f"{prefix}layer{i + 2}.", naming="block")
        for i, conv in enumerate(self.aspp):
            yield from conv.torch_entries(f"{prefix}aspp.c{i}.")


def msc_logits(
    base: DeepLabV2, x: jax.Array, scales: Sequence[float] = MSC_SCALES, taps: dict | None = None
) -> jax.Array:
    """The official `MSC` eval forward: max over [base(x), up(base(x * p)) for p in scales]."""
    taps = {} if taps is None else taps
    logits = base(x, taps)
    size = logits.shape[1:3]
    all_logits = [logits]
    for p in scales:
        sub: dict = {}
        xp = interpolate_bilinear(x, scale_factor=p)
        taps[f"input_scale{p}"] = xp
        lp = base(xp, sub)
        taps.update({f"scale{p}/{k}": v for k, v in sub.items()})
        all_logits.append(interpolate_bilinear(lp, size))
    return jnp.max(jnp.stack(all_logits), axis=0)


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 BGR minus mean (float64 arithmetic, as numpy there)."""
    bgr = np.asarray(images_u8)[..., ::-1].astype(np.float32)
    return (bgr - MEAN_BGR).astype(np.float32)


def preprocess_device(images_u8: jax.Array) -> jax.Array:
    """`preprocess` on the device, bit-identical: the float64 difference rounded to float32 takes
    only 256 values per channel, so it is a (256, 3) table lookup (no float64 on the device)."""
    table = jnp.asarray((np.arange(256, dtype=np.float64)[:, None] - MEAN_BGR).astype(np.float32))
    bgr = images_u8[..., ::-1].astype(jnp.int32)  # (N, H, W, 3) in B, G, R order
    return jnp.stack([table[bgr[..., c], c] for c in range(3)], axis=-1)
