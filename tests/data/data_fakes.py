"""Tiny copies of every data set layout, written with PIL into a temporary folder, and configs.

The real data sets cannot be downloaded here, so the tests generate a few 40x60 examples in the
exact on-disk structure each official loader expects: file names, folder names, extensions, bit
depths (8-bit label PNGs, 16-bit Cityscapes instance PNGs) and the special values (ADE20k's 0,
COCO-Stuff's 255).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

H, W = 40, 60


def data_config(**overrides) -> ConfigDict:
    """A complete `config.data` for tests (synthetic scenes at 32x32 unless overridden)."""
    cfg = dict(
        dataset="synthetic",
        root="",
        source="folder",
        tfds_data_dir="",
        num_classes=10,
        dontcare_label=9,
        label_255_to=-1,
        preprocess="resize_and_crop",
        load_size=36,
        crop_size=32,
        aspect_ratio=1.0,
        flip=True,
        use_instance=False,
        icpe=False,
        num_workers=0,
        prefetch_buffer=2,
        read_threads=2,
        synthetic_size=24,
        synthetic_val_size=10,
        synthetic_resolution=32,
        shuffle_seed=0,
        max_examples=0,
        label_resize="pil",
        label_dir="",
        image_dir="",
        instance_dir="",
        val_label_dir="",
        val_image_dir="",
        val_instance_dir="",
        include_portraits=True,
    )
    cfg.update(overrides)
    return ConfigDict(cfg)


@dataclass
class Written:
    """What a fake layout holds: per split, name -> arrays as they are on disk."""

    root: str
    examples: dict = field(default_factory=dict)  # split -> {name: {"image", "label", "instance"}}


def color_code(label: np.ndarray, num_classes: int) -> np.ndarray:
    """An image that is a colour coding of its label map (to check alignment after augmentation)."""
    rng = np.random.default_rng(1234)
    palette = rng.integers(0, 256, (max(num_classes, 256), 3)).astype(np.uint8)
    return palette[label]


def blocky_labels(
    rng: np.random.Generator, values: np.ndarray, h: int = H, w: int = W
) -> np.ndarray:
    """A label map of a few rectangles with values drawn from `values` (regions for ICPE, edges)."""
    label = np.full((h, w), rng.choice(values), np.int64)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        label[y0 : y0 + rng.integers(6, h // 2), x0 : x0 + rng.integers(6, w // 2)] = rng.choice(
            values
        )
    return label


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".jpg"):
        Image.fromarray(array).save(path, quality=95)
    else:
        Image.fromarray(array).save(path)


def _record(written: Written, split: str, name: str, image_path: str, label, instance=None):
    with Image.open(image_path) as im:  # what a decoder sees (JPEG is lossy)
        image = np.asarray(im.convert("RGB"))
    written.examples.setdefault(split, {})[name] = {
        "image": image,
        "label": np.asarray(label),
        "instance": None if instance is None else np.asarray(instance),
    }


def write_ade20k(root: str, n_train: int = 3, n_val: int = 2, seed: int = 0) -> Written:
    """ADEChallengeData2016: images/{training,validation}/ADE_*.jpg, annotations/.../*.png."""
    rng = np.random.default_rng(seed)
    out = Written(root)
    for split, folder, tag, n in (
        ("train", "training", "train", n_train),
        ("validation", "validation", "val", n_val),
    ):
        for i in range(1, n + 1):
            name = f"ADE_{tag}_{i:08d}"
            raw = blocky_labels(rng, np.array([0, 1, 3, 5, 27, 150])).astype(np.uint8)
            img_path = os.path.join(root, "images", folder, name + ".jpg")
            _save(img_path, color_code(raw, 151))
            _save(os.path.join(root, "annotations", folder, name + ".png"), raw)
            _record(out, split, name, img_path, raw)
    return out


def write_coco_stuff(
    root: str, n_train: int = 3, n_val: int = 2, seed: int = 0, portraits: int = 0
) -> Written:
    """SPADE's COCO-Stuff layout: {train,val}_{img,label,inst}/<id>.{jpg,png}; 255 = unlabeled."""
    rng = np.random.default_rng(seed)
    out = Written(root)
    plan = [("train", "train", "", n_train), ("validation", "val", "", n_val)]
    if portraits:
        plan.append(("train", "train", "_portrait", portraits))
    for split, phase, suffix, n in plan:
        for i in range(n):
            name = f"{i * 7919 + (100 if suffix else 0):012d}"
            raw = blocky_labels(rng, np.array([0, 5, 17, 181, 255])).astype(np.uint8)
            inst = (raw.astype(np.int64) * 3 % 256).astype(np.uint8)  # 'L' mode instance ids
            img_path = os.path.join(root, f"{phase}_img{suffix}", name + ".jpg")
            _save(img_path, color_code(raw, 256))
            _save(os.path.join(root, f"{phase}_label{suffix}", name + ".png"), raw)
            _save(os.path.join(root, f"{phase}_inst{suffix}", name + ".png"), inst)
            _record(out, split, ("portrait/" if suffix else "") + name, img_path, raw, inst)
    return out


def write_cityscapes(root: str, n_train: int = 3, n_val: int = 2, seed: int = 0) -> Written:
    """leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and gtFine/...
    *_gtFine_labelIds.png (8-bit) + *_gtFine_instanceIds.png (16-bit, id*1000+k for things)."""
    rng = np.random.default_rng(seed)
    out = Written(root)
    for split, phase, cities, n in (
        ("train", "train", ("aachen", "bochum"), n_train),
        ("validation", "val", ("frankfurt",), n_val),
    ):
        for i in range(n):
            city = cities[i % len(cities)]
            name = f"{city}_{i:06d}_{19 + i:06d}"
            raw = blocky_labels(rng, np.array([0, 7, 11, 24, 26, 33])).astype(np.uint8)
            inst = np.where(raw >= 24, raw.astype(np.int64) * 1000 + 1 + i, raw).astype(np.uint16)
            img_path = os.path.join(root, "leftImg8bit", phase, city, name + "_leftImg8bit.png")
            _save(img_path, color_code(raw, 35))
            gt = os.path.join(root, "gtFine", phase, city, name)
            _save(gt + "_gtFine_labelIds.png", raw)
            _save(gt + "_gtFine_instanceIds.png", inst)
            _save(gt + "_gtFine_color.png", color_code(raw, 35))  # present in the real download
            _record(out, split, name, img_path, raw, inst)
    return out


def write_custom(
    root: str,
    n_train: int = 4,
    n_val: int = 2,
    seed: int = 0,
    num_classes: int = 5,
    size: tuple[int, int] = (H, W),
) -> Written:
    """labels/, images/ (PNG, so the colour coding is exact) and instances/ with matching stems;
    val_labels/ etc. for the validation split. instance = label * 1000 + block id."""
    rng = np.random.default_rng(seed)
    out = Written(root)
    for split, prefix, n in (("train", "", n_train), ("validation", "val_", n_val)):
        for i in range(n):
            name = f"scene{i}"
            raw = blocky_labels(rng, np.arange(num_classes), *size).astype(np.uint8)
            inst = (raw.astype(np.int64) * 1000 + (np.arange(size[1]) // 20)[None, :]).astype(
                np.uint16
            )
            img_path = os.path.join(root, f"{prefix}images", name + ".png")
            _save(img_path, color_code(raw, num_classes))
            _save(os.path.join(root, f"{prefix}labels", name + ".png"), raw)
            _save(os.path.join(root, f"{prefix}instances", name + ".png"), inst)
            _record(out, split, name, img_path, raw, inst)
    return out


def custom_config(root: str, **overrides) -> ConfigDict:
    """`config.data` for `write_custom` (5 classes, no don't-care, PNG images)."""
    cfg = dict(
        dataset="custom",
        root=root,
        num_classes=5,
        dontcare_label=-1,
        label_dir="labels",
        image_dir="images",
        instance_dir="instances",
        val_label_dir="val_labels",
        val_image_dir="val_images",
        val_instance_dir="val_instances",
        use_instance=True,
    )
    cfg.update(overrides)
    return data_config(**cfg)


def ade20k_config(root: str, **overrides) -> ConfigDict:
    cfg = dict(dataset="ade20k", root=root, num_classes=151, dontcare_label=150, label_255_to=-1)
    cfg.update(overrides)
    return data_config(**cfg)


def coco_config(root: str, **overrides) -> ConfigDict:
    cfg = dict(
        dataset="coco_stuff",
        root=root,
        num_classes=183,
        dontcare_label=182,
        label_255_to=182,
        use_instance=True,
    )
    cfg.update(overrides)
    return data_config(**cfg)


def cityscapes_config(root: str, **overrides) -> ConfigDict:
    cfg = dict(
        dataset="cityscapes",
        root=root,
        num_classes=35,
        dontcare_label=-1,
        label_255_to=-1,
        use_instance=True,
        preprocess="fixed",
        load_size=64,
        crop_size=64,
        aspect_ratio=2.0,
    )
    cfg.update(overrides)
    return data_config(**cfg)
