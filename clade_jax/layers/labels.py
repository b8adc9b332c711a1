"""Label-map helpers shared by the layers, the models and the data pipeline.

* `resize_nearest`: nearest resizing with PyTorch's legacy rule `src = floor(dst * in / out)`
  (what `F.interpolate(mode='nearest')` does and what the official checkpoints were trained with).
  `jax.image.resize(method='nearest')` uses half-pixel centres and picks different pixels.
* `instance_edges`: the official 4-neighbour edge map of an instance-id map.
* `icpe_offsets`: the CLADE-ICPE positional map (host-side NumPy; connected components).
* `check_labels`: host-side validation that names the source and the offending values.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from scipy import ndimage


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch's legacy nearest rule, `floor(dst * in / out)`.

    Computed in exact integer arithmetic. PyTorch evaluates `dst * (float)(in / out)` in float32;
    the two agree for every size pair used by the networks here (power-of-two ratios and the data
    pipeline's load/crop sizes).
    """
    dst = np.arange(out_size, dtype=np.int64)
    return np.minimum((dst * in_size) // out_size, in_size - 1)


def resize_nearest(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Nearest resize of the two spatial axes (1, 2) of `x` with PyTorch's floor rule.

    Args:
      x: (N, H, W) or (N, H, W, C) array of any dtype (label ids, edge maps, ICPE maps, features).
      size: output (height, width).

    Returns:
      (N, size[0], size[1]) or (N, size[0], size[1], C), same dtype as `x`.
    """
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    if out_h % h == 0 and out_w % w == 0:  # integer upsampling: the floor rule is a repeat
        return jnp.repeat(jnp.repeat(x, out_h // h, axis=1), out_w // w, axis=2)
    if h % out_h == 0 and w % out_w == 0:  # integer downsampling: the floor rule is a stride
        return x[:, :: h // out_h, :: w // out_w]
    x = jnp.take(x, jnp.asarray(nearest_indices(h, out_h)), axis=1)
    return jnp.take(x, jnp.asarray(nearest_indices(w, out_w)), axis=2)


def resize_nearest_np(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """NumPy twin of `resize_nearest` for host code; `x` is (H, W) or (H, W, C)."""
    rows = nearest_indices(x.shape[0], size[0])
    cols = nearest_indices(x.shape[1], size[1])
    return x[rows][:, cols]


def instance_edges(instance: jnp.ndarray) -> jnp.ndarray:
    """Instance boundary map as the official `get_edges`.

    A pixel is 1 where its instance id differs from its left, right, upper or lower neighbour
    (both pixels of every differing pair are marked).

    Args:
      instance: (N, H, W) integer instance ids.

    Returns:
      (N, H, W) float32 edge map in {0, 1}.
    """
    dh = instance[:, :, 1:] != instance[:, :, :-1]  # (N, H, W-1)
    dv = instance[:, 1:, :] != instance[:, :-1, :]  # (N, H-1, W)
    e = jnp.zeros(instance.shape, dtype=bool)
    e = e.at[:, :, 1:].set(e[:, :, 1:] | dh)
    e = e.at[:, :, :-1].set(e[:, :, :-1] | dh)
    e = e.at[:, 1:, :].set(e[:, 1:, :] | dv)
    e = e.at[:, :-1, :].set(e[:, :-1, :] | dv)
    return e.astype(jnp.float32)


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def icpe_offsets(label_map: np.ndarray, ignore: Sequence[int] = ()) -> np.ndarray:
    """CLADE-ICPE intra-class positional map of one label map (host-side NumPy).

    For every class present (except those in `ignore`) and every 8-connected component of that
    class, each pixel gets its offset from the component's centroid, `(row - cy, col - cx)`; each of
    the two offset channels is divided by `max |offset| + 1e-5` over the component, so values lie in
    (-1, 1). Pixels of ignored classes are 0. This is the 'norm' mode of the official
    `cal_dist_masks.py`, which skips raw class 0 (ADE20k's "unknown", our don't-care).

    Args:
      label_map: (H, W) integer class ids.
      ignore: class ids that get no offsets (pass the don't-care id).

    Returns:
      (H, W, 2) float32: channel 0 the vertical, channel 1 the horizontal offset.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"icpe_offsets expects an (H, W) label map, got shape {label_map.shape}")
    h, w = label_map.shape
    out = np.zeros((h, w, 2), dtype=np.float64)
    rows, cols = np.indices((h, w), dtype=np.float64)
    skip = set(int(i) for i in ignore)
    for cls in np.unique(label_map):
        if int(cls) in skip:
            continue
        components, count = ndimage.label(label_map == cls, structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        idx = np.arange(1, count + 1)
        cy = ndimage.mean(rows, components, idx)
        cx = ndimage.mean(cols, components, idx)
        mask = components > 0
        comp = components[mask] - 1
        dy = rows[mask] - cy[comp]
        dx = cols[mask] - cx[comp]
        max_dy = np.asarray(ndimage.maximum(np.abs(dy), comp + 1, idx))
        max_dx = np.asarray(ndimage.maximum(np.abs(dx), comp + 1, idx))
        out[mask, 0] = dy / (max_dy[comp] + 1e-5)
        out[mask, 1] = dx / (max_dx[comp] + 1e-5)
    return out.astype(np.float32)


def check_labels(labels: np.ndarray, num_classes: int, source: str = "labels") -> None:
    """Raise ValueError naming `source` and the values if any label is outside [0, num_classes).

    JAX clamps out-of-range gathers silently, so host code calls this before a label map reaches
    a model.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: label map must be integer, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = np.unique(labels[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if values.size > 10 else "")
        raise ValueError(
            f"{source}: {int(bad.sum())} pixels have label values outside [0, {num_classes}): "
            f"{shown}"
        )
