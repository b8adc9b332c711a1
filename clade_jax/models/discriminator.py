"""The multiscale PatchGAN discriminator (the official `MultiscaleDiscriminator`), NHWC.

`num_D` `NLayerDiscriminator`s see the input at full resolution and after 1, 2, ...
`avg_pool(3, stride 2, pad 1, count_include_pad=False)` downsamplings. Each has `n_layers`
kernel-4 convolutions with padding 2 (`model0` stride 2, no norm; `model1..` spectral norm + no
bias + InstanceNorm, stride 2 except the last, which has stride 1; widths ndf, 2ndf, ... capped at
512) and a final kernel-4 stride-1 conv to one channel (the patch logits). Every intermediate
output is returned for the feature-matching loss.

The input is the one-hot label map (+ instance edges) concatenated with the image, as the official
`Pix2PixModel.discriminate` builds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.layers.conv import Conv2d
from clade_jax.layers.labels import instance_edges
from clade_jax.layers.normalization import ParamFreeNorm
from clade_jax.ops import avg_pool_3x3_s2


def _window_counts(n: int) -> np.ndarray:
    """Cells of each 3-wide, stride-2, pad-1 window inside a side of length n."""
    m = (n - 1) // 2 + 1
    return np.array([sum(0 <= j < n for j in (2 * i - 1, 2 * i, 2 * i + 1)) for i in range(m)])


def pooled_onehot(labels: jnp.ndarray, num_classes: int) -> jnp.ndarray:
    """`avg_pool_3x3_s2(nan_where_invalid(one_hot(labels)))` without the full-size one-hot.

    labels (N, H, W) int -> (N, ceil(H/2), ceil(W/2), num_classes) float32: the class counts of
    each 3x3 window (the sum of nine strided one-hot maps at the output size), divided by the
    window's cell count; NaN where a window holds an invalid label. The counts are small
    integers, so this equals the pooled one-hot bit for bit.
    """
    n, h, w = labels.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    bad = (labels < 0) | (labels >= num_classes)
    padded = jnp.pad(jnp.where(bad, -1, labels), ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    bad = jnp.pad(bad, ((0, 0), (1, 1), (1, 1)))
    total, any_bad = 0.0, False
    for i in range(3):
        for j in range(3):
            window = (slice(None), slice(i, i + 2 * ho - 1, 2), slice(j, j + 2 * wo - 1, 2))
            total = total + jax.nn.one_hot(padded[window], num_classes, dtype=jnp.float32)
            any_bad = any_bad | bad[window]
    counts = np.outer(_window_counts(h), _window_counts(w)).astype(np.float32)
    pooled = total / jnp.asarray(counts)[None, :, :, None]
    return jnp.where(any_bad[..., None], jnp.nan, pooled)


class DLayer(nnx.Module):
    """One stage of an NLayerDiscriminator: conv [+ SN, InstanceNorm] [+ leaky_relu(0.2)]."""

    def __init__(
        self,
        fin: int,
        fout: int,
        *,
        stride: int,
        normalized: bool,
        activation: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(
            fin,
            fout,
            4,
            stride=stride,
            padding=2,
            use_bias=not normalized,
            spectral_norm=normalized,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = ParamFreeNorm(fout, "instance") if normalized else None
        self.activation = activation

    def __call__(self, x, onehot: tuple | None = None):
        """x (N, H, W, C_in) -> (N, H', W', C_out); with `onehot=(labels, num_classes)` x holds
        only the channels after the one-hot ones (`Conv2d`'s `labels=`, NaN at invalid labels)."""
        if onehot is None:
            x = self.conv(x)
        else:
            x = self.conv(x, labels=onehot[0], num_classes=onehot[1], invalid="nan")
        if self.norm is not None:
            x = self.norm(x)
        return jax.nn.leaky_relu(x, 0.2) if self.activation else x


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: returns the list of every stage's output (last = (N, h, w, 1) logits)."""

    def __init__(self, input_nc: int, *, ndf: int = 64, n_layers: int = 4, dtype, rngs: nnx.Rngs):
        self.n_layers = n_layers
        nf = ndf
        self.model0 = DLayer(
            input_nc, nf, stride=2, normalized=False, activation=True, dtype=dtype, rngs=rngs
        )
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            setattr(
                self,
                f"model{n}",
                DLayer(
                    nf_prev,
                    nf,
                    stride=1 if n == n_layers - 1 else 2,
                    normalized=True,
                    activation=True,
                    dtype=dtype,
                    rngs=rngs,
                ),
            )
        setattr(
            self,
            f"model{n_layers}",
            DLayer(nf, 1, stride=1, normalized=False, activation=False, dtype=dtype, rngs=rngs),
        )

    def __call__(self, x: jnp.ndarray, onehot: tuple | None = None) -> list[jnp.ndarray]:
        """x (N, H, W, C_in), or with `onehot=(labels, num_classes)` the channels after the
        one-hot ones (see `DLayer`)."""
        outs = []
        for j in range(self.n_layers + 1):
            x = getattr(self, f"model{j}")(x, onehot) if j == 0 else getattr(self, f"model{j}")(x)
            outs.append(x.astype(jnp.float32))
        return outs


class MultiscaleDiscriminator(nnx.Module):
    """Args: num_classes (one-hot channels, counting don't-care), use_instance (edge channel),
    ndf, n_layers (n_layers_D), num_D, dtype.

    Call: `D(labels, image, instance=None)` -> list over scales of lists of feature maps (NHWC,
    float32). labels (N, H, W) int, image (N, H, W, 3) in [-1, 1], instance (N, H, W) int.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        use_instance: bool = False,
        ndf: int = 64,
        n_layers: int = 4,
        num_D: int = 2,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.use_instance = use_instance
        self.num_D = num_D
        self.dtype = dtype
        input_nc = num_classes + (1 if use_instance else 0) + 3
        for i in range(num_D):
            setattr(
                self,
                f"discriminator_{i}",
                NLayerDiscriminator(input_nc, ndf=ndf, n_layers=n_layers, dtype=dtype, rngs=rngs),
            )

    def __call__(
        self, labels: jnp.ndarray, image: jnp.ndarray, instance: jnp.ndarray | None = None
    ) -> list[list[jnp.ndarray]]:
        if self.use_instance and instance is None:
            raise ValueError("this discriminator was built with use_instance=True: pass instance=")
        edges = instance_edges(instance) if self.use_instance else None
        rest = image.astype(jnp.float32)  # the input channels after the one-hot ones
        if edges is not None:
            rest = jnp.concatenate([edges[..., None].astype(jnp.float32), rest], axis=-1)
        # Scale 0 takes the one-hot input through `Conv2d`'s `labels=` (no one-hot tensor, no
        # 151-channel convolution); the pooled input of the other scales is no longer one-hot.
        results = [self.discriminator_0(rest.astype(self.dtype), (labels, self.num_classes))]
        if self.num_D > 1:
            seg = pooled_onehot(labels, self.num_classes)  # avg_pool_3x3_s2 of the one-hot
            x = jnp.concatenate([seg, avg_pool_3x3_s2(rest)], axis=-1)
            results += self.forward_input(x.astype(self.dtype), first_scale=1)
        return results

    def forward_input(self, x: jnp.ndarray, first_scale: int = 0) -> list[list[jnp.ndarray]]:
        """The official forward on an already concatenated (N, H, W, C) input (one-hot labels,
        edges, image), from scale `first_scale` on (x at that scale's resolution)."""
        results = []
        for i in range(first_scale, self.num_D):
            results.append(getattr(self, f"discriminator_{i}")(x.astype(self.dtype)))
            if i + 1 < self.num_D:
                x = avg_pool_3x3_s2(x)
        return results
