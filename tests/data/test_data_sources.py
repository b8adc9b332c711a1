"""Folder sources: every layout loads with the official remapping; each bad input gets its error."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_fakes import (
    ade20k_config,
    cityscapes_config,
    coco_config,
    custom_config,
    write_ade20k,
    write_cityscapes,
    write_coco_stuff,
    write_custom,
)
from PIL import Image

from clade_jax.data.decoding import LabelEncoding
from clade_jax.data.layouts import DataError
from clade_jax.data.sources import make_source


def _check_same(source, written, split, remap=lambda raw: raw, with_instance=False):
    expected = written.examples[split]
    assert len(source) == len(expected)
    seen = set()
    for i in range(len(source)):
        ex = source[i]
        want = expected[ex["name"]]
        seen.add(ex["name"])
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == want["image"].shape
        np.testing.assert_array_equal(ex["image"], want["image"])
        assert ex["label"].dtype == np.int32
        np.testing.assert_array_equal(ex["label"], remap(want["label"].astype(np.int32)))
        if with_instance:
            assert ex["instance"].dtype == np.int32
            np.testing.assert_array_equal(ex["instance"], want["instance"].astype(np.int32))
        else:
            assert "instance" not in ex
    assert seen == set(expected)


def _ade_remap(raw):
    out = raw - 1
    out[raw == 0] = 150
    return out


def test_ade20k_layout_loads_with_unknown_as_dontcare(tmp_path):
    written = write_ade20k(str(tmp_path))
    for split in ("train", "validation"):
        source = make_source(ade20k_config(str(tmp_path)), split)
        _check_same(source, written, split, remap=_ade_remap)
    ex = make_source(ade20k_config(str(tmp_path)), "train")[0]
    raw = written.examples["train"][ex["name"]]["label"]
    assert np.all(ex["label"][raw == 0] == 150) and np.all(ex["label"][raw == 3] == 2)  # sky


def test_ade20k_outdoor_reads_the_same_layout(tmp_path):
    written = write_ade20k(str(tmp_path))
    source = make_source(ade20k_config(str(tmp_path), dataset="ade20k_outdoor"), "validation")
    _check_same(source, written, "validation", remap=_ade_remap)


def test_coco_stuff_layout_loads_with_255_as_dontcare_and_instances(tmp_path):
    written = write_coco_stuff(str(tmp_path))
    for split in ("train", "validation"):
        source = make_source(coco_config(str(tmp_path)), split)
        _check_same(
            source, written, split, remap=lambda r: np.where(r == 255, 182, r), with_instance=True
        )


def test_coco_stuff_training_includes_portrait_folders(tmp_path):
    written = write_coco_stuff(str(tmp_path), portraits=2)
    source = make_source(coco_config(str(tmp_path)), "train")
    assert len(source) == 3 + 2
    _check_same(
        source, written, "train", remap=lambda r: np.where(r == 255, 182, r), with_instance=True
    )
    source = make_source(coco_config(str(tmp_path), include_portraits=False), "train")
    assert len(source) == 3


def test_cityscapes_layout_loads_16bit_instances_across_cities(tmp_path):
    written = write_cityscapes(str(tmp_path))
    for split in ("train", "validation"):
        source = make_source(cityscapes_config(str(tmp_path)), split)
        _check_same(source, written, split, with_instance=True)
    inst = make_source(cityscapes_config(str(tmp_path)), "train")[0]["instance"]
    assert inst.max() > 255  # the 16-bit ids survive


def test_custom_layout_loads_both_splits(tmp_path):
    written = write_custom(str(tmp_path))
    for split in ("train", "validation"):
        _check_same(
            make_source(custom_config(str(tmp_path)), split), written, split, with_instance=True
        )


def test_custom_without_validation_folders_says_which_fields(tmp_path):
    write_custom(str(tmp_path))
    cfg = custom_config(str(tmp_path), val_label_dir="", val_image_dir="")
    with pytest.raises(DataError, match="val_label_dir"):
        make_source(cfg, "validation")


def test_max_examples_truncates_in_natural_order(tmp_path):
    write_ade20k(str(tmp_path), n_train=12)
    source = make_source(ade20k_config(str(tmp_path), max_examples=10), "train")
    assert len(source) == 10
    assert [source.examples[i].name for i in (0, 9)] == ["ADE_train_00000001", "ADE_train_00000010"]


# --- errors: one test per case --------------------------------------------------------------


def test_missing_partner_image_is_named_at_construction(tmp_path):
    write_ade20k(str(tmp_path))
    os.remove(tmp_path / "images" / "training" / "ADE_train_00000002.jpg")
    with pytest.raises(DataError, match=r"no image file in .*images/training: ADE_train_00000002"):
        make_source(ade20k_config(str(tmp_path)), "train")


def test_missing_partner_label_is_named_at_construction(tmp_path):
    write_coco_stuff(str(tmp_path))
    os.remove(tmp_path / "val_label" / "000000007919.png")
    with pytest.raises(DataError, match=r"no label file in .*val_label: 000000007919"):
        make_source(coco_config(str(tmp_path)), "validation")


def test_missing_instance_map_is_named_at_construction(tmp_path):
    write_cityscapes(str(tmp_path))
    os.remove(
        tmp_path / "gtFine" / "train" / "bochum" / "bochum_000001_000020_gtFine_instanceIds.png"
    )
    with pytest.raises(DataError, match="no instance file .*bochum_000001_000020"):
        make_source(cityscapes_config(str(tmp_path)), "train")
    # Without instance maps the same folder is fine.
    assert len(make_source(cityscapes_config(str(tmp_path), use_instance=False), "train")) == 3


def test_missing_folder_is_named(tmp_path):
    write_ade20k(str(tmp_path))
    os.rename(tmp_path / "annotations", tmp_path / "labels")
    with pytest.raises(DataError, match="annotations/training does not exist"):
        make_source(ade20k_config(str(tmp_path)), "train")


def test_unreadable_image_is_named_when_loaded(tmp_path):
    write_ade20k(str(tmp_path))
    bad = tmp_path / "images" / "training" / "ADE_train_00000002.jpg"
    bad.write_bytes(b"not a jpeg at all")
    source = make_source(ade20k_config(str(tmp_path)), "train")  # pairing is fine
    source[0]
    with pytest.raises(DataError, match=r"cannot read image .*ADE_train_00000002\.jpg"):
        source[1]


def test_out_of_range_labels_are_named_with_values(tmp_path):
    write_ade20k(str(tmp_path))
    path = tmp_path / "annotations" / "training" / "ADE_train_00000001.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[:2, :3] = 151
    raw[5, 5] = 200
    Image.fromarray(raw).save(path)
    source = make_source(ade20k_config(str(tmp_path)), "train")
    with pytest.raises(
        DataError, match=r"ADE_train_00000001\.png: 7 pixels .*\[0, 151\): 151, 200"
    ):
        source[0]


def test_label_255_without_remap_is_out_of_range_with_a_hint(tmp_path):
    write_coco_stuff(str(tmp_path))
    source = make_source(coco_config(str(tmp_path), label_255_to=-1), "train")
    with pytest.raises(DataError, match=r"outside \[0, 183\): 255 .*label_255_to = -1"):
        for i in range(len(source)):
            source[i]


def test_size_mismatch_names_both_files(tmp_path):
    write_custom(str(tmp_path))
    path = tmp_path / "images" / "scene1.png"
    Image.open(path).resize((30, 20)).save(path)
    source = make_source(custom_config(str(tmp_path)), "train")
    with pytest.raises(
        DataError,
        match=r"size mismatch: label map .*labels/scene1\.png is 60x40 .*"
        r"images/scene1\.png is 30x20",
    ):
        source[1]


def test_rgb_label_map_is_rejected(tmp_path):
    write_custom(str(tmp_path))
    path = tmp_path / "labels" / "scene0.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DataError, match="scene0.png: label/instance maps must be single-channel"):
        make_source(custom_config(str(tmp_path)), "train")[0]


def test_instance_maps_for_ade20k_are_refused(tmp_path):
    write_ade20k(str(tmp_path))
    with pytest.raises(DataError, match="ade20k has no instance maps"):
        make_source(ade20k_config(str(tmp_path), use_instance=True), "train")


def test_label_encoding_checks_its_settings():
    with pytest.raises(ValueError, match="dontcare_label = num_classes - 1 = 150"):
        LabelEncoding(num_classes=151, dontcare=-1, ade20k_shift=True)
    with pytest.raises(ValueError, match="label_255_to = 183"):
        LabelEncoding(num_classes=183, label_255_to=183)
