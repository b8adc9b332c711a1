"""Data sources: each data set read in the layout its users download, as grain random-access
sources.

A source has `__len__` and `__getitem__(i)` returning a dict of NumPy arrays:
`image` (H, W, 3) uint8, `label` (H, W) int32 in [0, num_classes) after the data set's remapping,
optionally `instance` (H, W) int32, and `name` (str) for error messages and saved outputs.

Layouts (`root` is the folder as downloaded; splits 'train' / 'validation'):

* ade20k, ade20k_outdoor: `images/{training,validation}/*.jpg`,
  `annotations/{training,validation}/*.png`; no instance maps.
* coco_stuff: `{train,val}_img/*.jpg`, `{train,val}_label/*.png`, `{train,val}_inst/*.png`.
* cityscapes: `leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`,
  `gtFine/{train,val}/<city>/*_gtFine_labelIds.png` and `*_gtFine_instanceIds.png` (16-bit).
* custom: `<root>/<label_dir>/*.png`, `<root>/<image_dir>/*`, optional `<root>/<instance_dir>/*.png`
  with matching file stems (and `val_*_dir` for the validation split).

COCO-Stuff training also reads `train_{img,label,inst}_portrait/` when present and
`include_portraits` is on (as the official loader does).

Label remapping (facts from the official SPADE loaders):
* label 255 in a label PNG becomes `label_255_to` (official: `label_nc`, i.e. COCO-Stuff's
  don't-care 182); with `label_255_to = -1` it is left alone and is then reported as out of range.
* ADE20k: 0 ("unknown") becomes the don't-care class 150 and every other value k becomes k - 1.
  (The official loader maps 255 -> 150 first and then subtracts 1, so a 255 would end as 149; ADE20k
  annotations contain no 255, and here `label_255_to` gives the final value directly.)

Validation: pairing of label, image and instance files, their existence and the example counts are
checked when a source is built, i.e. before training starts. Unreadable files, size mismatches and
label values outside [0, num_classes) are reported when an example is loaded. Every error is a
`DataError` naming the file(s) and the offending values.

`source='tfds'` reads the same files from the array_record data written once by
`clade_jax.data.prepare` (see `tfds_builder.py`); the bytes stored there are the original files and
are decoded by the same functions, so both paths give identical examples.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from clade_jax.layers.labels import check_labels

FOLDER_DATASETS = ("ade20k", "ade20k_outdoor", "coco_stuff", "cityscapes", "custom")
DATASETS = (*FOLDER_DATASETS, "synthetic")
SPLITS = ("train", "validation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")
DATASETS_WITH_INSTANCES = ("coco_stuff", "cityscapes", "custom")


class DataError(ValueError):
    """A problem with the input data; the message names the file(s) and the offending values."""


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
    """The files of one example; `name` is unique within a split."""

    name: str
    image: str
    label: str
    instance: str | None = None


# ---------------------------------------------------------------------------------------------
# Layouts: finding and pairing files.


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """Where a data set's files are, read from `config.data` (see `from_config`).

    Attributes:
      dataset: one of `FOLDER_DATASETS`.
      root: the data set folder as downloaded.
      use_instance: whether instance maps are needed (and so must exist for every label).
      label_dir, image_dir, instance_dir: custom layout, training split, relative to root.
      val_label_dir, val_image_dir, val_instance_dir: custom layout, validation split.
      include_portraits: COCO-Stuff training also reads the `*_portrait` folders when present.
    """

    dataset: str
    root: str
    use_instance: bool = False
    label_dir: str = ""
    image_dir: str = ""
    instance_dir: str = ""
    val_label_dir: str = ""
    val_image_dir: str = ""
    val_instance_dir: str = ""
    include_portraits: bool = True

    @classmethod
    def from_config(cls, data_cfg: Any) -> FolderLayout:
        """Builds the layout from `config.data` (optional fields default to the values above)."""
        get = _getter(data_cfg)
        return cls(
            dataset=get("dataset"),
            root=os.path.expanduser(get("root")),
            use_instance=bool(get("use_instance", False)),
            label_dir=get("label_dir", ""),
            image_dir=get("image_dir", ""),
            instance_dir=get("instance_dir", ""),
            val_label_dir=get("val_label_dir", ""),
            val_image_dir=get("val_image_dir", ""),
            val_instance_dir=get("val_instance_dir", ""),
            include_portraits=bool(get("include_portraits", True)),
        )


def list_examples(layout: FolderLayout, split: str) -> list[ExampleFiles]:
    """Finds and pairs the files of one split; raises DataError on any pairing problem.

    Args:
      layout: which data set and where.
      split: 'train' or 'validation'.

    Returns:
      The examples in natural order of their names (the official loaders' order).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if layout.dataset not in FOLDER_DATASETS:
        raise ValueError(
            f"no folder layout for dataset {layout.dataset!r}; one of {FOLDER_DATASETS}"
        )
    if layout.use_instance and layout.dataset not in DATASETS_WITH_INSTANCES:
        raise DataError(
            f"{layout.dataset} has no instance maps; set data.use_instance = False "
            "(the official ADE20k loaders use none)"
        )
    if not os.path.isdir(layout.root):
        raise DataError(f"{layout.dataset}: data root {layout.root!r} is not a directory")
    lister = {
        "ade20k": _list_ade20k,
        "ade20k_outdoor": _list_ade20k,
        "coco_stuff": _list_coco_stuff,
        "cityscapes": _list_cityscapes,
        "custom": _list_custom,
    }[layout.dataset]
    examples = lister(layout, split)
    if not examples:
        raise DataError(f"{layout.dataset}: found no {split} examples under {layout.root}")
    return examples


def _list_ade20k(layout: FolderLayout, split: str) -> list[ExampleFiles]:
    folder = {"train": "training", "validation": "validation"}[split]
    images = _scan(os.path.join(layout.root, "images", folder), (".jpg", ".jpeg"))
    labels = _scan(os.path.join(layout.root, "annotations", folder), (".png",))
    return _pair(layout.dataset, labels=labels, images=images)


def _list_coco_stuff(layout: FolderLayout, split: str) -> list[ExampleFiles]:
    phase = {"train": "train", "validation": "val"}[split]
    suffixes = [""]
    if split == "train" and layout.include_portraits:
        if os.path.isdir(os.path.join(layout.root, f"{phase}_label_portrait")):
            suffixes.append("_portrait")
    examples = []
    for suffix in suffixes:
        labels = _scan(os.path.join(layout.root, f"{phase}_label{suffix}"), (".png",))
        images = _scan(os.path.join(layout.root, f"{phase}_img{suffix}"), IMAGE_EXTENSIONS)
        instances = None
        if layout.use_instance:
            instances = _scan(os.path.join(layout.root, f"{phase}_inst{suffix}"), (".png",))
        pairs = _pair(layout.dataset, labels=labels, images=images, instances=instances)
        if suffix:  # portrait stems may repeat those of the main folders
            pairs = [dataclasses.replace(p, name=f"portrait/{p.name}") for p in pairs]
        examples += pairs
    return sorted(examples, key=lambda e: _natural_key(e.name))


def _list_cityscapes(layout: FolderLayout, split: str) -> list[ExampleFiles]:
    phase = {"train": "train", "validation": "val"}[split]

    def key(suffix: str) -> Callable[[str], str | None]:
        # <city>_<sequence>_<frame><suffix>: pair files by the first three components.
        def fn(filename: str) -> str | None:
            if not filename.endswith(suffix):
                return None
            return "_".join(filename.split("_")[:3])

        return fn

    gt_dir = os.path.join(layout.root, "gtFine", phase)
    labels = _scan(gt_dir, None, key=key("_gtFine_labelIds.png"), recursive=True)
    images = _scan(
        os.path.join(layout.root, "leftImg8bit", phase),
        None,
        key=key("_leftImg8bit.png"),
        recursive=True,
    )
    instances = None
    if layout.use_instance:
        instances = _scan(gt_dir, None, key=key("_gtFine_instanceIds.png"), recursive=True)
    return _pair(layout.dataset, labels=labels, images=images, instances=instances)


def _list_custom(layout: FolderLayout, split: str) -> list[ExampleFiles]:
    if split == "train":
        dirs = (layout.label_dir, layout.image_dir, layout.instance_dir)
    else:
        dirs = (layout.val_label_dir, layout.val_image_dir, layout.val_instance_dir)
    label_dir, image_dir, instance_dir = dirs
    prefix = "" if split == "train" else "val_"
    if not label_dir or not image_dir:
        raise DataError(
            f"custom dataset: set data.{prefix}label_dir and data.{prefix}image_dir "
            f"(folders relative to data.root) to read the {split} split"
        )
    labels = _scan(os.path.join(layout.root, label_dir), LABEL_EXTENSIONS)
    images = _scan(os.path.join(layout.root, image_dir), IMAGE_EXTENSIONS)
    instances = None
    if layout.use_instance:
        if not instance_dir:
            raise DataError(f"custom dataset: data.use_instance needs data.{prefix}instance_dir")
        instances = _scan(os.path.join(layout.root, instance_dir), LABEL_EXTENSIONS)
    return _pair(layout.dataset, labels=labels, images=images, instances=instances)


def _scan(
    folder: str,
    extensions: Sequence[str] | None,
    *,
    key: Callable[[str], str | None] | None = None,
    recursive: bool = False,
) -> tuple[str, dict[str, str]]:
    """Returns (folder, {key: path}) for the matching files; keys default to file stems."""
    if not os.path.isdir(folder):
        raise DataError(f"expected folder {folder} does not exist")
    if key is None:

        def key(filename: str) -> str | None:
            stem, ext = os.path.splitext(filename)
            return stem if ext.lower() in extensions else None

    found: dict[str, str] = {}
    walker = (
        os.walk(folder, followlinks=True) if recursive else [(folder, None, os.listdir(folder))]
    )
    for dirpath, _, filenames in walker:
        for filename in filenames:
            k = key(filename)
            if k is None or filename.startswith("."):
                continue
            path = os.path.join(dirpath, filename)
            if k in found:
                raise DataError(f"two files for example {k!r}: {found[k]} and {path}")
            found[k] = path
    return folder, found


def _pair(
    dataset: str,
    *,
    labels: tuple[str, dict[str, str]],
    images: tuple[str, dict[str, str]],
    instances: tuple[str, dict[str, str]] | None = None,
) -> list[ExampleFiles]:
    """Pairs files by key; every label needs an image (and instance map), every image a label."""
    groups = {"label": labels, "image": images}
    if instances is not None:
        groups["instance"] = instances
    keys = set().union(*(g[1] for g in groups.values()))
    problems = []
    for role, (folder, found) in groups.items():
        missing = sorted(keys - found.keys(), key=_natural_key)
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            owners = [r for r in groups if r != role]
            problems.append(
                f"{len(missing)} {'/'.join(owners)} file(s) have no {role} file in {folder}: "
                f"{shown}"
            )
    if problems:
        raise DataError(f"{dataset}: missing partner files: " + "; ".join(problems))
    out = []
    for k in sorted(keys, key=_natural_key):
        inst = instances[1][k] if instances is not None else None
        out.append(ExampleFiles(name=k, image=images[1][k], label=labels[1][k], instance=inst))
    return out


def _natural_key(text: str) -> list:
    """Sort key ordering 'a2' before 'a10' (the official loaders sort naturally)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# Decoding and label encoding (shared by the folder and the TFDS paths).


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
    get = _getter(data_cfg)
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


# ---------------------------------------------------------------------------------------------
# Sources.


class FolderSource:
    """grain random-access source reading a data set's files directly.

    Args:
      examples: the paired files (from `list_examples`).
      encoding: the label remapping.
      use_instance: whether to load the instance maps (every example must have one).
    """

    def __init__(
        self, examples: Sequence[ExampleFiles], encoding: LabelEncoding, use_instance: bool
    ):
        if use_instance and any(e.instance is None for e in examples):
            raise DataError("use_instance is set but some examples have no instance map")
        self.examples = list(examples)
        self.encoding = encoding
        self.use_instance = use_instance

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = self.examples[index]
        return decode_example(
            e.image,
            e.label,
            e.instance if self.use_instance else None,
            name=e.name,
            encoding=self.encoding,
        )

    def __repr__(self) -> str:
        return f"FolderSource(n={len(self)}, instance={self.use_instance})"


class TfdsSource:
    """grain random-access source over the array_record data written by `clade_jax.data.prepare`.

    The stored features are the original encoded files; they are decoded here by the same code as
    in `FolderSource`, so both sources give identical examples.

    Args:
      data_dir: the `--data_dir` given to `prepare`.
      dataset: the data set (TFDS config) name.
      split: 'train' or 'validation'.
      encoding: the label remapping.
      use_instance: whether to load instance maps (the prepared data must hold them).
      max_examples: 0 for all, else read only the first `max_examples`.
    """

    def __init__(
        self,
        data_dir: str,
        dataset: str,
        split: str,
        encoding: LabelEncoding,
        use_instance: bool,
        max_examples: int = 0,
    ):
        # Imported here: reading folders must not need TFDS.
        from clade_jax.data import tfds_builder

        self.data_dir, self.dataset, self.split = data_dir, dataset, split
        self.encoding, self.use_instance = encoding, use_instance
        self._source = tfds_builder.open_data_source(data_dir, dataset, split)
        features = self._source.dataset_info.features
        if use_instance and "instance" not in features:
            raise DataError(
                f"prepared {dataset} data in {data_dir} has no instance maps; prepare it again "
                "with --use_instance, or set data.use_instance = False"
            )
        n = len(self._source)
        self._len = min(n, max_examples) if max_examples > 0 else n
        if self._len == 0:
            raise DataError(f"prepared {dataset} data in {data_dir} has no {split} examples")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} outside [0, {self._len})")
        record = self._source[int(index)]
        name = record["name"].decode() if isinstance(record["name"], bytes) else str(record["name"])
        where = f"{name} (tfds {self.dataset}/{self.split} record {index}"
        return decode_example(
            record["image"],
            record["label"],
            record["instance"] if self.use_instance else None,
            name=name,
            encoding=self.encoding,
            names=(f"{where}, image)", f"{where}, label)", f"{where}, instance)"),
        )

    def __repr__(self) -> str:
        return (
            f"TfdsSource({self.dataset}/{self.split}, n={len(self)}, instance={self.use_instance})"
        )


def make_source(data_cfg: Any, split: str):
    """The random-access source of one split, as chosen by `config.data`.

    Args:
      data_cfg: `config.data` (reads dataset, root, source, tfds_data_dir, num_classes,
        dontcare_label, label_255_to, use_instance, max_examples, the synthetic_* fields and the
        custom layout fields).
      split: 'train' or 'validation'.

    Returns:
      An object with `__len__` and `__getitem__` returning example dicts.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    get = _getter(data_cfg)
    dataset = get("dataset")
    use_instance = bool(get("use_instance", False))
    max_examples = int(get("max_examples", 0))
    if dataset == "synthetic":
        from clade_jax.data import synthetic

        if int(get("num_classes")) != synthetic.NUM_CLASSES:
            raise ValueError(
                f"synthetic scenes have {synthetic.NUM_CLASSES} classes (don't-care "
                f"{synthetic.DONTCARE}); config.data.num_classes is {get('num_classes')}"
            )
        size = (
            int(get("synthetic_size")) if split == "train" else int(get("synthetic_val_size", 64))
        )
        if max_examples > 0:
            size = min(size, max_examples)
        width = int(get("synthetic_resolution"))
        height = round(width / float(get("aspect_ratio", 1.0)))
        return synthetic.SyntheticSource(
            size, height, width, split=split, use_instance=use_instance, seed=0
        )
    if dataset not in FOLDER_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; one of {DATASETS}")
    encoding = label_encoding(data_cfg)
    kind = get("source", "folder")
    if kind == "folder":
        examples = list_examples(FolderLayout.from_config(data_cfg), split)
        if max_examples > 0:
            examples = examples[:max_examples]
        return FolderSource(examples, encoding, use_instance)
    if kind == "tfds":
        return TfdsSource(
            get("tfds_data_dir"), dataset, split, encoding, use_instance, max_examples
        )
    raise ValueError(f"data.source must be 'folder' or 'tfds', got {kind!r}")


def _getter(cfg: Any) -> Callable[..., Any]:
    """`get(name, default)` over a ConfigDict, dict or object; a missing required field raises."""
    missing = object()

    def get(name: str, default: Any = missing) -> Any:
        if isinstance(cfg, dict):
            value = cfg.get(name, missing)
        else:
            value = getattr(cfg, name, missing)
        if value is missing:
            if default is missing:
                raise KeyError(f"config.data.{name} is required")
            return default
        return value

    return get
