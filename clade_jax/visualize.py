"""Pictures for people: colourized label maps and image grids (TensorBoard, samples, evaluation).

* `generic_palette(n)`: n well-separated colours for any data set.
* `colorize(labels, num_classes)`: (..., H, W) int -> (..., H, W, 3) uint8; the synthetic scenes
  (`num_classes == clade_jax.data.synthetic.NUM_CLASSES`) use their own `PALETTE`.
* `image_grid(labels, fake, real, num_classes)`: rows of [label | synthesized | real].
"""

from __future__ import annotations

import numpy as np

from clade_jax.data.synthetic import NUM_CLASSES, PALETTE
from clade_jax.inference import to_uint8
from clade_jax.layers.labels import check_labels


def generic_palette(num_classes: int) -> np.ndarray:
    """A fixed palette of `num_classes` well-separated colours, (num_classes, 3) uint8.

    Uses the bit-interleaving scheme of the PASCAL VOC colour map: class 0 is black and the bits of
    the class id are spread over the high bits of R, G and B, so neighbouring ids get very
    different colours. Works for any number of classes.
    """
    ids = np.arange(num_classes, dtype=np.int64)
    out = np.zeros((num_classes, 3), np.int64)
    c = ids.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            out[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return out.astype(np.uint8)


def colorize(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Colour a label map for image grids: (..., H, W) int -> (..., H, W, 3) uint8.

    Args:
      labels: integer label map(s), values in [0, num_classes).
      num_classes: `NUM_CLASSES` (the default) uses the synthetic scenes' `PALETTE`; any other
        value uses `generic_palette(num_classes)`.

    Returns:
      uint8 RGB array. Raises ValueError naming the values if a label is out of range.
    """
    labels = np.asarray(labels)
    check_labels(labels, num_classes, source="colorize")
    palette = PALETTE if num_classes == NUM_CLASSES else generic_palette(num_classes)
    return palette[labels]


def image_grid(labels: np.ndarray, fake: np.ndarray, real: np.ndarray, num_classes: int):
    """Rows of [colourised label | synthesized | real] as one uint8 (H*rows, 3W, 3) image.

    Args:
      labels: (N, H, W) int class ids.
      fake, real: (N, H, W, 3) float in [-1, 1] (or uint8); synthesized images are quantized as
        saved ones (truncated, `to_uint8`), real ones back to the uint8 they were read from.
      num_classes: for `colorize`.
    """
    rows = [
        np.concatenate([colorize(lab, num_classes), to_uint8(f), to_uint8(r, "nearest")], axis=1)
        for lab, f, r in zip(labels, fake, real, strict=True)
    ]
    return np.concatenate(rows, axis=0)
