"""Shared building blocks of the three segmenters: convs, eval-mode BatchNorm, ResNet bottlenecks.

All three published networks are ResNet variants in PyTorch; this module holds the parts they
share, NHWC inside, float32, every convolution at `Precision.HIGHEST` (parity with PyTorch's
float32 CPU convolutions; the fixtures' tolerance is 1e-4 relative through 100+ layers).

Every module here knows its PyTorch name: `torch_entries(prefix)` yields one `Entry` per
state-dict name the official module would have (`<prefix>weight`, `<prefix>running_mean`, ...),
pointing at our variable and saying how to convert it (conv kernels `(out, in, kh, kw)` ->
`(kh, kw, in, out)`). Entries without a variable are buffers the official modules store but
their eval forward never reads (`num_batches_tracked`, and mit-semseg's SynchronizedBatchNorm
`_tmp_running_mean`, `_tmp_running_var`, `_running_iter`): accepted when present and shape-checked,
not required, not stored. `convert.py` turns the entries into the loader and its error report.

Blocks:
* `Conv2d`: PyTorch `nn.Conv2d` (symmetric zero padding, dilation, groups, optional bias).
* `BatchNorm`: `nn.BatchNorm2d` in eval mode, `(x - mean) / sqrt(var + eps) * weight + bias`.
* `ConvBN`: conv + BN (+ ReLU) with the child names of the official container
  (`0`/`1` for an `nn.Sequential`, `conv`/`bn` for DeepLab's `_ConvBnReLU`).
* `Bottleneck`: the ResNet bottleneck in the two naming/stride conventions used here:
  `style="torchvision"` (conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/.1, stride on the 3x3;
  mit-semseg and DRN) and `style="deeplab"` (reduce/conv3x3/increase/shortcut with .conv/.bn,
  stride on the 1x1 reduce; kazuto1011/deeplab-pytorch).
* `max_pool`: `nn.MaxPool2d` with -inf padding and PyTorch's `ceil_mode` rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST
BN_EPS = 1e-5


@dataclasses.dataclass
class Entry:
    """One official state-dict name: our variable (None: an unused buffer) and its conversion."""

    name: str
    variable: nnx.Variable | None
    torch_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray] | None = None


def _conv_to_ours(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _shape(v: nnx.Variable) -> tuple[int, ...]:
    return tuple(int(s) for s in v.get_value().shape)


class Conv2d(nnx.Module):
    """`nn.Conv2d` on NHWC input; kernel (kh, kw, in / groups, out), He-normal init (fan_in)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        rngs: nnx.Rngs,
    ):
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"channels {in_ch}->{out_ch} not divisible by groups {groups}")
        k = kernel_size
        fan_in = in_ch // groups * k * k
        init = jax.random.normal(rngs.params(), (k, k, in_ch // groups, out_ch), jnp.float32)
        self.kernel = nnx.Param(init * math.sqrt(2.0 / fan_in))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32)) if bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
            precision=HIGHEST,
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        kh, kw, cin, cout = _shape(self.kernel)
        yield Entry(prefix + "weight", self.kernel, (cout, cin, kh, kw), _conv_to_ours)
        if self.bias is not None:
            yield Entry(prefix + "bias", self.bias, (cout,), _same)


class BatchNorm(nnx.Module):
    """`nn.BatchNorm2d` in eval mode (running statistics), eps 1e-5.

    `sync_buffers=True` for mit-semseg's SynchronizedBatchNorm2d, whose state dict also holds
    `_tmp_running_mean`, `_tmp_running_var` (C,) and `_running_iter` (1,) (unused in eval).
    """

    def __init__(self, channels: int, *, eps: float = BN_EPS, sync_buffers: bool = False):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
        self.eps = eps
        self.sync_buffers = sync_buffers

    def __call__(self, x: jax.Array) -> jax.Array:
        # torch's CPU eval kernel: alpha = w / sqrt(var + eps); y = x * alpha + (b - mean * alpha)
        alpha = self.scale[...] / jnp.sqrt(self.var[...] + self.eps)
        beta = self.bias[...] - self.mean[...] * alpha
        return x * alpha + beta

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        (c,) = _shape(self.scale)
        yield Entry(prefix + "weight", self.scale, (c,), _same)
        yield Entry(prefix + "bias", self.bias, (c,), _same)
        yield Entry(prefix + "running_mean", self.mean, (c,), _same)
        yield Entry(prefix + "running_var", self.var, (c,), _same)
        yield Entry(prefix + "num_batches_tracked", None, ())
        if self.sync_buffers:
            yield Entry(prefix + "_tmp_running_mean", None, (c,))
            yield Entry(prefix + "_tmp_running_var", None, (c,))
            yield Entry(prefix + "_running_iter", None, (1,))


class ConvBN(nnx.Module):
    """Conv (no bias) + BatchNorm (+ ReLU); `names` are the official child names.

    Args:
      in_ch, out_ch, kernel_size, rngs, **conv: the `Conv2d` (`stride`, `padding`, `dilation`).
      relu: end with a ReLU.
      names: the official child names of the conv and the BN.
      sync_buffers: see `BatchNorm`.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        relu: bool = True,
        names: tuple[str, str] = ("0", "1"),
        sync_buffers: bool = False,
        rngs: nnx.Rngs,
        **conv: int,
    ):
        if unknown := set(conv) - {"stride", "padding", "dilation"}:
            raise TypeError(f"ConvBN: unexpected arguments {sorted(unknown)}")
        self.conv = Conv2d(in_ch, out_ch, kernel_size, rngs=rngs, **conv)
        self.bn = BatchNorm(out_ch, sync_buffers=sync_buffers)
        self.relu = relu
        self.names = names

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.bn(self.conv(x))
        return jax.nn.relu(y) if self.relu else y

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        yield from self.conv.torch_entries(f"{prefix}{self.names[0]}.")
        yield from self.bn.torch_entries(f"{prefix}{self.names[1]}.")


class Bottleneck(nnx.Module):
    """ResNet bottleneck (expansion 4): 1x1 -> 3x3 (stride, dilation) -> 1x1, + shortcut, ReLU.

    Args:
      in_ch: input channels.
      planes: the bottleneck width (output channels are `4 * planes`).
      stride: spatial stride, on the 3x3 (`style="torchvision"`) or the 1x1 reduce ("deeplab").
      dilation: of the 3x3 (padding = dilation).
      downsample: use a 1x1 conv + BN shortcut (else identity).
      style: "torchvision" (mit-semseg, DRN names) or "deeplab" (kazuto1011 names).
      sync_buffers: mit-semseg's SynchronizedBatchNorm buffers in the state dict.
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: bool = False,
        style: str = "torchvision",
        sync_buffers: bool = False,
        rngs: nnx.Rngs,
    ):
        if style not in ("torchvision", "deeplab"):
            raise ValueError(f"unknown bottleneck style {style!r}")
        out_ch = planes * self.expansion
        s1, s3 = (1, stride) if style == "torchvision" else (stride, 1)
        kw = dict(sync_buffers=sync_buffers, rngs=rngs)
        self.reduce = ConvBN(in_ch, planes, 1, stride=s1, **kw)
        self.conv3x3 = ConvBN(
            planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, **kw
        )
        self.increase = ConvBN(planes, out_ch, 1, relu=False, **kw)
        self.shortcut = (
            ConvBN(in_ch, out_ch, 1, stride=stride, relu=False, **kw) if downsample else None
        )
        self.style = style

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.increase(self.conv3x3(self.reduce(x)))
        return jax.nn.relu(h + (self.shortcut(x) if self.shortcut is not None else x))

    def torch_entries(self, prefix: str) -> Iterator[Entry]:
        if self.style == "deeplab":
            parts = [("reduce.conv.", "reduce.bn.", self.reduce)]
            parts += [("conv3x3.conv.", "conv3x3.bn.", self.conv3x3)]
            parts += [("increase.conv.", "increase.bn.", self.increase)]
            if self.shortcut is not None:
                parts += [("shortcut.conv.", "shortcut.bn.", self.shortcut)]
        else:
            parts = [("conv1.", "bn1.", self.reduce), ("conv2.", "bn2.", self.conv3x3)]
            parts += [("conv3.", "bn3.", self.increase)]
            if self.shortcut is not None:
                parts += [("downsample.0.", "downsample.1.", self.shortcut)]
        for conv_name, bn_name, block in parts:
            yield from block.conv.torch_entries(prefix + conv_name)
            yield from block.bn.torch_entries(prefix + bn_name)


def make_layer(
    in_ch: int,
    planes: int,
    blocks: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    style: str = "torchvision",
    sync_buffers: bool = False,
    rngs: nnx.Rngs,
) -> nnx.List:
    """`ResNet._make_layer`: `blocks` bottlenecks; the first carries stride and a projection
    shortcut when stride != 1 or the channel count changes (DeepLab: always in the first block).
    """
    if blocks < 1:
        raise ValueError(f"a ResNet stage needs >= 1 block, got {blocks}")
    out_ch = planes * Bottleneck.expansion
    first_down = style == "deeplab" or stride != 1 or in_ch != out_ch
    layers = []
    for i in range(blocks):
        layers.append(
            Bottleneck(
                in_ch if i == 0 else out_ch,
                planes,
                stride=stride if i == 0 else 1,
                dilation=dilation,
                downsample=first_down if i == 0 else False,
                style=style,
                sync_buffers=sync_buffers,
                rngs=rngs,
            )
        )
    return nnx.List(layers)


def run_layer(layer: nnx.List, x: jax.Array) -> jax.Array:
    for block in layer:
        x = block(x)
    return x


def layer_entries(layer: nnx.List, prefix: str, naming: str = "index") -> Iterator[Entry]:
    """Entries of a stage: children `<prefix>0.` ... ("index") or `<prefix>block1.` ("block")."""
    for i, block in enumerate(layer):
        child = f"{i}" if naming == "index" else f"block{i + 1}"
        yield from block.torch_entries(f"{prefix}{child}.")


def max_pool(
    x: jax.Array, kernel: int, stride: int, padding: int, *, ceil_mode: bool = False
) -> jax.Array:
    """`nn.MaxPool2d(kernel, stride, padding, ceil_mode)` on NHWC `x` (padding is -inf)."""

    def out_and_pads(size: int) -> tuple[int, tuple[int, int]]:
        span = size + 2 * padding - kernel
        if ceil_mode:
            out = -(-span // stride) + 1
            if (out - 1) * stride >= size + padding:  # the last window must start inside
                out -= 1
        else:
            out = span // stride + 1
        right = (out - 1) * stride + kernel - size - padding
        return out, (padding, max(right, 0))

    _, h, w, _ = x.shape
    (oh, ph), (ow, pw) = out_and_pads(h), out_and_pads(w)
    y = jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), ph, pw, (0, 0)),
    )
    return y[:, :oh, :ow, :]
