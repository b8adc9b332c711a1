"""The VAE style encoder (the official `ConvEncoder`) and the reparameterization / KL terms.

Six (five below crop_size 256) 3x3 stride-2 convolutions, spectral-normalized, without bias, each
followed by a parameter-free InstanceNorm; leaky_relu(0.2) between layers and after the last; two
linear heads give mu and logvar, `latent_dim` wide (256 hard-coded in the official code, which
therefore only runs with z_dim = 256; the model builder passes z_dim).
Widths: 3 -> ndf -> 2ndf -> 4ndf -> 8ndf -> 8ndf [-> 8ndf]; ndf is the generator's ngf (the
official encoder ignores `--nef`). Inputs that are not 256x256 are first resized to 256x256
bilinearly (align_corners=False), as the official encoder does.

The official encoder only works at crop_size >= 256 (below that its flattened size does not match
its heads). Here `crop_size < 256` builds the five-layer variant with heads sized for the 8x8 map
it produces, which makes the VAE usable in tiny test configurations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax.layers.conv import Conv2d, Linear
from clade_jax.layers.normalization import ParamFreeNorm
from clade_jax.ops import resize_bilinear

ENCODER_LATENT = 256  # fc_mu / fc_var width, hard-coded in the official ConvEncoder


class EncoderLayer(nnx.Module):
    """Spectral-norm 3x3 stride-2 conv (no bias) + InstanceNorm (official `norm_E`)."""

    def __init__(self, fin: int, fout: int, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(
            fin,
            fout,
            3,
            stride=2,
            padding=1,
            use_bias=False,
            spectral_norm=True,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = ParamFreeNorm(fout, "instance")

    def __call__(self, x):
        return self.norm(self.conv(x))


class ConvEncoder(nnx.Module):
    """Image (N, H, W, 3) in [-1, 1] -> (mu, logvar), each (N, latent_dim) float32."""

    def __init__(
        self,
        ndf: int = 64,
        crop_size: int = 256,
        latent_dim: int = ENCODER_LATENT,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths = [3, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 8 * ndf]
        if crop_size >= 256:
            widths.append(8 * ndf)
        self.num_layers = len(widths) - 1
        for i in range(self.num_layers):
            setattr(
                self,
                f"layer{i + 1}",
                EncoderLayer(widths[i], widths[i + 1], dtype=dtype, rngs=rngs),
            )
        side = 256 // 2**self.num_layers  # 4 (six layers) or 8 (five layers)
        flat = 8 * ndf * side * side
        self.fc_mu = Linear(flat, latent_dim, dtype=dtype, rngs=rngs)
        self.fc_var = Linear(flat, latent_dim, dtype=dtype, rngs=rngs)

    def __call__(self, image: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        x = resize_bilinear(image.astype(jnp.float32), (256, 256))
        for i in range(self.num_layers):
            if i > 0:
                x = jax.nn.leaky_relu(x, 0.2)
            x = getattr(self, f"layer{i + 1}")(x)
        x = jax.nn.leaky_relu(x, 0.2).reshape(x.shape[0], -1)  # NHWC flatten
        return self.fc_mu(x).astype(jnp.float32), self.fc_var(x).astype(jnp.float32)


def reparameterize(mu: jnp.ndarray, logvar: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """z = eps * exp(0.5 * logvar) + mu with eps ~ N(0, 1) drawn from `key`."""
    eps = jax.random.normal(key, mu.shape, mu.dtype)
    return eps * jnp.exp(0.5 * logvar) + mu
