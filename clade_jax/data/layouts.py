"""Data-set layouts: where each data set's files are and how they pair into examples.

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

Pairing of label, image and instance files, their existence and the example counts are checked
when `list_examples` runs, i.e. before training starts; every problem is a `DataError` naming
the file(s). Examples come in natural order of their names (`natural_key`: 'a2' before 'a10',
case-insensitive), the official loaders' order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

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
        get = config_getter(data_cfg)
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
    return sorted(examples, key=lambda e: natural_key(e.name))


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
        missing = sorted(keys - found.keys(), key=natural_key)
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
    for k in sorted(keys, key=natural_key):
        inst = instances[1][k] if instances is not None else None
        out.append(ExampleFiles(name=k, image=images[1][k], label=labels[1][k], instance=inst))
    return out


def natural_key(text: str) -> list:
    """Sort key: 'a2' before 'a10', case-insensitive (the official loaders sort naturally)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def config_getter(cfg: Any) -> Callable[..., Any]:
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
