"""Per-example transforms of the input pipeline, each a small function testable on its own.

The chain for one training example (a dict from a source):

    geometry = train_geometry(rng, (H, W), options)   # resize size, crop box, flip: the randomness
    example = apply_geometry(example, geometry)        # image bicubic, label/instance nearest
    example = add_icpe(example, options.dontcare)      # CLADE-ICPE map of the FINAL label map

and after batching, `to_model_inputs` turns the uint8 images into float32 in [-1, 1] (kept uint8
until then so that worker processes ship 4x fewer bytes).

Augmentations are those of the official loaders (SPADE `data/base_dataset.py`):
* 'resize_and_crop': resize to load_size x load_size, random crop crop_size x crop_size
  (ADE20k / COCO-Stuff: 286 -> 256);
* 'fixed': resize to crop_size x round(crop_size / aspect_ratio) (Cityscapes 512x256), no crop;
* horizontal flip with probability 1/2 when `flip` is on.
Images are resized with PIL bicubic. Label and instance maps are resized nearest; with
`label_resize='pil'` (default) exactly as the official loaders do (PIL NEAREST: pixel-centre rule
`src = floor((dst + 0.5) * in / out)`, aligned with the bicubic image); with 'floor' by PyTorch's
legacy rule `src = floor(dst * in / out)` (`labels.resize_nearest_np`, what F.interpolate does
inside the networks). Evaluation uses load_size = crop_size, no random crop and no flip.

The ICPE map is computed after crop and flip from the final label map; the official code
precomputes it on the raw label map and then flips it vertically while the image flips
horizontally.

Randomness: `TrainTransform` draws each example's geometry from
`np.random.default_rng((seed, 1, position))`, where `position` is the example's place in the
(shuffled, repeated) stream. It depends on nothing else, so a resumed run, a different worker count
or a different number of processes all produce the same examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from clade_jax.layers.labels import icpe_offsets, resize_nearest_np

PREPROCESS_MODES = ("resize_and_crop", "fixed")
LABEL_RESIZE_METHODS = ("pil", "floor")
_AUGMENT_STREAM = 1  # separates the augmentation random stream from other uses of the seed


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The augmentation settings of `config.data` (see `from_config`)."""

    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    aspect_ratio: float = 1.0
    flip: bool = True
    icpe: bool = False
    dontcare: int = -1
    label_resize: str = "pil"

    def __post_init__(self):
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}"
            )
        if self.label_resize not in LABEL_RESIZE_METHODS:
            raise ValueError(
                f"label_resize must be one of {LABEL_RESIZE_METHODS}, got {self.label_resize!r}"
            )
        if self.crop_size <= 0 or self.load_size <= 0:
            raise ValueError(
                f"sizes must be positive: load {self.load_size}, crop {self.crop_size}"
            )
        if self.preprocess == "resize_and_crop" and self.load_size < self.crop_size:
            raise ValueError(
                "resize_and_crop needs load_size >= crop_size, got "
                f"{self.load_size} < {self.crop_size}"
            )

    @classmethod
    def from_config(cls, data_cfg: Any) -> AugmentOptions:
        """Reads preprocess, load_size, crop_size, aspect_ratio, flip, icpe, dontcare_label and the
        optional label_resize (default 'pil')."""
        get = (
            (lambda k, d=None: data_cfg.get(k, d))
            if isinstance(data_cfg, dict)
            else (lambda k, d=None: getattr(data_cfg, k, d))
        )
        return cls(
            preprocess=get("preprocess"),
            load_size=int(get("load_size")),
            crop_size=int(get("crop_size")),
            aspect_ratio=float(get("aspect_ratio", 1.0)),
            flip=bool(get("flip", True)),
            icpe=bool(get("icpe", False)),
            dontcare=int(get("dontcare_label", -1)),
            label_resize=get("label_resize", "pil"),
        )

    def output_size(self) -> tuple[int, int]:
        """(height, width) of every example after the transform."""
        if self.preprocess == "fixed":
            return round(self.crop_size / self.aspect_ratio), self.crop_size
        return self.crop_size, self.crop_size


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What happens to one example: resize to `resize` (h, w), then crop `crop` (top, left, h, w)
    if not None, then flip horizontally if `flip`."""

    resize: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    flip: bool


def train_geometry(
    rng: np.random.Generator, size: tuple[int, int], opts: AugmentOptions
) -> Geometry:
    """Draws the random geometry of one training example, as the official `get_params`.

    Args:
      rng: the example's random generator.
      size: (height, width) of the example as loaded.
      opts: augmentation settings.

    Returns:
      The example's `Geometry`.
    """
    del size  # both official modes resize to a fixed size first
    if opts.preprocess == "fixed":
        resize, crop = opts.output_size(), None
    else:  # resize_and_crop
        resize = (opts.load_size, opts.load_size)
        c = opts.crop_size
        top = int(rng.integers(0, max(0, resize[0] - c) + 1))
        left = int(rng.integers(0, max(0, resize[1] - c) + 1))
        crop = (top, left, c, c)
    flip = bool(rng.random() > 0.5) if opts.flip else False
    return Geometry(resize=resize, crop=crop, flip=flip)


def eval_geometry(size: tuple[int, int], opts: AugmentOptions) -> Geometry:
    """The deterministic test-time geometry: load_size = crop_size, no random crop, no flip."""
    del size  # every mode resizes to the output size at test time
    return Geometry(resize=opts.output_size(), crop=None, flip=False)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8 with PIL bicubic (the official resize)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def pil_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PIL's NEAREST resize, bit-exact.

    PIL samples pixel centres, `src = floor((dst + 0.5) * in / out)`, accumulating the position
    in float64 (`x += in / out`); the cumulative sum reproduces its rounding at exact boundaries.
    """
    scale = in_size / out_size
    steps = np.full(out_size, scale, np.float64)
    steps[0] = scale * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), in_size - 1)


def resize_ids(x: np.ndarray, size: tuple[int, int], method: str = "pil") -> np.ndarray:
    """Nearest resize of an (H, W) or (H, W, C) id map; method 'pil' (official) or 'floor'."""
    if x.shape[:2] == tuple(size):
        return x
    if method == "floor":
        return resize_nearest_np(x, tuple(size))
    rows = pil_nearest_indices(x.shape[0], size[0])
    cols = pil_nearest_indices(x.shape[1], size[1])
    return x[rows][:, cols]


def crop(x: np.ndarray, box: tuple[int, int, int, int], name: str = "example") -> np.ndarray:
    """x[top:top+h, left:left+w]; raises if the box leaves the array (PIL would pad with black)."""
    top, left, h, w = box
    if top < 0 or left < 0 or top + h > x.shape[0] or left + w > x.shape[1]:
        raise ValueError(
            f"{name}: crop {h}x{w} at ({top}, {left}) leaves the {x.shape[0]}x{x.shape[1]} "
            "resized map; use a larger load_size"
        )
    return x[top : top + h, left : left + w]


def hflip(x: np.ndarray) -> np.ndarray:
    """Mirror the width axis (axis 1) of an (H, W, ...) array."""
    return np.ascontiguousarray(x[:, ::-1])


def apply_geometry(example: dict, geometry: Geometry, label_resize: str = "pil") -> dict:
    """Resize, crop and flip `image`, `label` and `instance` together.

    Args:
      example: dict with `image` (H, W, 3) uint8, `label` (H, W) int32, optional `instance`.
      geometry: what to do.
      label_resize: 'pil' or 'floor' (see `resize_ids`).

    Returns:
      A new dict with the transformed arrays (other keys copied).
    """
    out = dict(example)
    name = str(example.get("name", "example"))
    for key in ("image", "label", "instance"):
        if key not in example:
            continue
        x = example[key]
        if key == "image":
            x = resize_image(x, geometry.resize)
        else:
            x = resize_ids(x, geometry.resize, label_resize)
        if geometry.crop is not None:
            x = crop(x, geometry.crop, name)
        if geometry.flip:
            x = hflip(x)
        out[key] = np.ascontiguousarray(x)
    return out


def add_icpe(example: dict, dontcare: int = -1) -> dict:
    """Adds `icpe` (H, W, 2) float32, the CLADE-ICPE map of the example's (final) label map."""
    ignore = (dontcare,) if dontcare >= 0 else ()
    return {**example, "icpe": icpe_offsets(example["label"], ignore=ignore)}


def to_model_inputs(batch: dict) -> dict:
    """Batched uint8 `image` -> float32 in [-1, 1] (x / 127.5 - 1); other arrays copied.

    The copy turns grain's shared-memory arrays (from worker processes) into ordinary arrays, so
    the shared memory is released as soon as grain moves on rather than when the batch dies.
    """
    out = {k: np.array(v) for k, v in batch.items() if k != "image"}
    image = batch["image"].astype(np.float32)
    image *= np.float32(1 / 127.5)  # in place: ~20x faster than `x / 127.5 - 1` with temporaries
    image -= np.float32(1.0)
    out["image"] = image
    return out


class TrainTransform:
    """grain `map_with_index` transform: (position, example) -> augmented example.

    Args:
      opts: augmentation settings.
      seed: the pipeline seed; the example's randomness is `(seed, 1, position)`.
      keep_names: keep the `name` string (tests, debugging); otherwise it is dropped so that
        batches hold only arrays a device can take.
    """

    def __init__(self, opts: AugmentOptions, seed: int, keep_names: bool = False):
        self.opts, self.seed, self.keep_names = opts, int(seed), keep_names

    def __call__(self, position: int, example: dict) -> dict:
        rng = np.random.default_rng((self.seed, _AUGMENT_STREAM, int(position)))
        geometry = train_geometry(rng, example["label"].shape, self.opts)
        out = apply_geometry(example, geometry, self.opts.label_resize)
        if self.opts.icpe:
            out = add_icpe(out, self.opts.dontcare)
        if not self.keep_names:
            out.pop("name", None)
        return out


class EvalTransform:
    """Deterministic test-time transform: example -> resized example (+ `icpe`)."""

    def __init__(self, opts: AugmentOptions):
        self.opts = opts

    def __call__(self, example: dict) -> dict:
        geometry = eval_geometry(example["label"].shape, self.opts)
        out = apply_geometry(example, geometry, self.opts.label_resize)
        if self.opts.icpe:
            out = add_icpe(out, self.opts.dontcare)
        return out
