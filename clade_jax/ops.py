"""Small image operations with PyTorch's exact conventions, shared by the models and evaluation.

* `resize_bilinear`: `F.interpolate(mode='bilinear', align_corners=False)` without antialiasing
  (the official encoder's resize to 256x256 and pytorch-fid's resize to 299x299). Implemented as
  two small interpolation matrices, so it is exact for up- and downsampling alike.
* `avg_pool_3x3_s2`: `F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)` (the
  multiscale discriminator's downsampling), by Flax's `nnx.avg_pool`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float32 matrix of PyTorch's bilinear rule with align_corners=False."""
    # PyTorch's CPU kernel computes the source coordinate in float32: scale = float(in / out),
    # src = scale * (dst + 0.5) - 0.5, each step rounded to float32.
    scale = np.float32(in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    src = src.astype(np.float64)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m.astype(np.float32)


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """x (N, H, W, C) float -> (N, size[0], size[1], C), PyTorch bilinear, align_corners=False."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(bilinear_matrix(h, size[0]))
    mw = jnp.asarray(bilinear_matrix(w, size[1]))
    hp = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,nhwc->nowc", mh, x.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,nowc->nopc", mw, y, precision=hp).astype(x.dtype)


def avg_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    """3x3 average pool, stride 2, padding 1, padded cells excluded from the count. NHWC.

    Flax's pool (window sum / window count, as PyTorch); the count is float32, so the result is
    cast back to the input's dtype (bfloat16 compute stays bfloat16).
    """
    y = nnx.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=False)
    return y.astype(x.dtype)
