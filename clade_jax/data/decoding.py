"""Decoding of one example's files (paths or bytes) and the data sets' label encodings.

The single code path of the folder and the TFDS sources (`decode_example`), and of the label PNGs
`clade_jax.synthesize` and the painting app read (`read_id_map`, `label_encoding`).

Label remapping (facts from the official SPADE loaders):
* label 255 in a label PNG becomes `label_255_to` (official: `label_nc`, i.e. COCO-Stuff's
  don't-care 182); with `label_255_to = -1` it is left alone and is then reported as out of range.
* ADE20k: 0 ("unknown") becomes the don't-care class 150 and every other value k becomes k - 1.
  (The official loader maps 255 -> 150 first and then subtracts 1, so a 255 would end as 149; ADE20k
  annotations contain no 255, and here `label_255_to` gives the final value directly.)

Unreadable files, size mismatches and label values outside [0, num_classes) raise a `DataError`
naming the file and the offending values.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from clade_jax.data.layouts import DataError, config_getter
from clade_jax.layers.labels import check_labels


def read_image(data: str | bytes, name: str) -> np.ndarray:
    """Decodes an image file (path or bytes) to (H, W, 3) uint8 RGB, like the official loader."""
    try:
        with Image.open(data if isinstance(data, str) else io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for missing/corrupt files
        raise DataError(f"cannot read image {name}: {e}") from e


def read_id_map(data: str | bytes, name: str) -> np.ndarray:
    """Decodes a single-channel label or instance PNG (path or bytes) to (H, W) int32.

    Palette ('P') images give their indices, 16-bit PNGs (Cityscapes instance ids) their values.
    """
    try:
        with Image.open(data if isinstance(data, str) else io.BytesIO(data)) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(
                    f"{name}: label/instance maps must be single-channel images of integer ids, "
                    f"got PIL mode {im.mode!r} (an RGB colour-coded map needs converting first)"
                )
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read label/instance map {name}: {e}") from e
    return arr.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class LabelEncoding:
    """Turns a raw label PNG into class ids in [0, num_classes), or raises naming the file.

    Attributes:
      num_classes: number of classes, counting the don't-care class.
      dontcare: the don't-care id, or -1.
      label_255_to: final value of raw label 255, or -1 to leave it (then it is out of range).
      ade20k_shift: raw 0 -> dontcare and k -> k - 1 (ADE20k's "unknown" is 0).
    """

    num_classes: int
    dontcare: int = -1
    label_255_to: int = -1
    ade20k_shift: bool = False

    def __post_init__(self):
        if self.num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        for field in ("dontcare", "label_255_to"):
            value = getattr(self, field)
            if not -1 <= value < self.num_classes:
                raise ValueError(f"{field} = {value} is outside [-1, {self.num_classes})")
        if self.ade20k_shift and self.dontcare != self.num_classes - 1:
            raise ValueError(
                "ADE20k maps its 'unknown' label 0 to the last class: set dontcare_label = "
                f"num_classes - 1 = {self.num_classes - 1}, got {self.dontcare}"
            )

    def __call__(self, raw: np.ndarray, name: str) -> np.ndarray:
        """raw (H, W) int -> (H, W) int32 class ids; DataError naming `name` on bad values."""
        is_255 = raw == 255 if self.label_255_to >= 0 else None
        checked = raw if is_255 is None else raw[~is_255]
        try:
            # Raw ids already span [0, num_classes) for every layout (ADE20k: 0..150 = 151 ids).
            check_labels(checked, self.num_classes, source=f"label map {name}")
        except ValueError as e:
            hint = ""
            if np.any(checked == 255):
                hint = " (label 255 stays 255 because data.label_255_to = -1)"
            raise DataError(f"{e}{hint}") from None
        label = raw.astype(np.int32)
        if self.ade20k_shift:
            label = label - 1
            label[raw == 0] = self.dontcare
        if is_255 is not None:
            label[is_255] = self.label_255_to
        return label


def label_encoding(data_cfg: Any) -> LabelEncoding:
    """The label remapping of `config.data` (dataset, num_classes, dontcare_label, label_255_to)."""
    get = config_getter(data_cfg)
    return LabelEncoding(
        num_classes=int(get("num_classes")),
        dontcare=int(get("dontcare_label", -1)),
        label_255_to=int(get("label_255_to", -1)),
        ade20k_shift=get("dataset") in ("ade20k", "ade20k_outdoor"),
    )


def decode_example(
    image: str | bytes,
    label: str | bytes,
    instance: str | bytes | None,
    *,
    name: str,
    encoding: LabelEncoding,
    names: tuple[str, str, str | None] | None = None,
) -> dict[str, Any]:
    """Decodes and validates one example; the single code path of the folder and TFDS sources.

    Args:
      image, label, instance: file paths or encoded bytes (instance None when not used).
      name: the example's name (returned as `name`).
      encoding: the data set's label remapping.
      names: how to call the three files in error messages (default: the paths, or `name`).

    Returns:
      dict with `image` (H, W, 3) uint8, `label` (H, W) int32, optional `instance` (H, W) int32
      and `name`.
    """
    if names is None:
        names = tuple(
            x if isinstance(x, str) else f"{name} ({role})"
            for x, role in ((image, "image"), (label, "label"), (instance, "instance"))
        )
    image_name, label_name, instance_name = names
    img = read_image(image, image_name)
    raw = read_id_map(label, label_name)
    if raw.shape != img.shape[:2]:
        raise DataError(
            f"size mismatch: label map {label_name} is {raw.shape[1]}x{raw.shape[0]} (WxH) but "
            f"image {image_name} is {img.shape[1]}x{img.shape[0]}"
        )
    out = {"image": img, "label": encoding(raw, label_name), "name": name}
    if instance is not None:
        inst = read_id_map(instance, instance_name)
        if inst.shape != raw.shape:
            raise DataError(
                f"size mismatch: instance map {instance_name} is {inst.shape[1]}x{inst.shape[0]} "
                f"(WxH) but label map {label_name} is {raw.shape[1]}x{raw.shape[0]}"
            )
        out["instance"] = inst
    return out
