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
from flax import nnx

from clade_jax.layers.conv import Conv2d
from clade_jax.layers.labels import instance_edges
from clade_jax.layers.normalization import ParamFreeNorm
from clade_jax.layers.spade import nan_where_invalid, semantic_input
from clade_jax.ops import avg_pool_3x3_s2


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
            seg = semantic_input(labels, self.num_classes, None, jnp.float32)
            seg = nan_where_invalid(seg, labels, self.num_classes)
            x = avg_pool_3x3_s2(jnp.concatenate([seg, rest], axis=-1))
            results += self.forward_input(x, first_scale=1)
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
