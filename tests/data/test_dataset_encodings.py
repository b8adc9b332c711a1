"""The shipped configs read each data set's documented label encoding, and `label_255_to` works
for every folder layout.

Documented encodings (the data sets' own READMEs and the official SPADE loaders):
* ADE20k (SceneParsing): 0 = "other objects" (unknown), 1..150 the classes. Model ids: 0 -> the
  don't-care class 150, k -> k - 1; 151 ids in all.
* COCO-Stuff (SPADE layout): 0..181 the thing + stuff classes, 255 = unlabeled. Model ids:
  255 -> don't-care 182; 183 ids in all.
* Cityscapes gtFine labelIds: 0..33 (34 = -1's license plate is not written to labelIds PNGs),
  no don't-care remapping; the official `label_nc` is 35.
* The synthetic scenes: `clade_jax.data.synthetic.NUM_CLASSES` ids with `DONTCARE` the last.

Each test reads fake files written in the data set's layout with the shipped config's own
`config.data` (only `root` changed), so a config whose `num_classes`, `dontcare_label` or
`label_255_to` disagreed with the encoding fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from data_fakes import (
    custom_config,
    write_ade20k,
    write_cityscapes,
    write_coco_stuff,
    write_custom,
)
from PIL import Image

from clade_jax.configs import ade20k, ade20k_outdoor, cityscapes, coco_stuff, custom, synthetic
from clade_jax.data import synthetic as synthetic_data
from clade_jax.data.layouts import DataError
from clade_jax.data.sources import make_source


def _shipped(module, root: str, **overrides):
    data = module.get_config().data
    data.root = root
    data.num_workers = 0
    for k, v in overrides.items():
        setattr(data, k, v)
    return data


def _labels(source) -> dict:
    return {source[i]["name"]: source[i]["label"] for i in range(len(source))}


def _write_raw(path, raw: np.ndarray) -> None:
    Image.fromarray(raw.astype(np.uint8)).save(path)


@pytest.mark.parametrize("module", [ade20k, ade20k_outdoor], ids=["ade20k", "ade20k_outdoor"])
def test_ade20k_configs_map_unknown_to_dontcare_and_shift_the_classes(module, tmp_path):
    written = write_ade20k(str(tmp_path))
    data = _shipped(module, str(tmp_path))
    assert (data.num_classes, data.dontcare_label) == (151, 150)
    seen = set()
    for split in ("train", "validation"):
        for name, label in _labels(make_source(data, split)).items():
            raw = written.examples[split][name]["label"].astype(np.int64)
            seen |= set(np.unique(raw).tolist())
            np.testing.assert_array_equal(label, np.where(raw == 0, 150, raw - 1))
    assert {0, 150} <= seen  # the special values were on disk


def test_ade20k_config_rejects_255_and_label_255_to_gives_its_final_value(tmp_path):
    write_ade20k(str(tmp_path))
    path = tmp_path / "annotations" / "training" / "ADE_train_00000001.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[:2, :2] = 255
    _write_raw(path, raw)
    # The shipped config: ADE20k annotations hold no 255, so one is an error naming the file.
    source = make_source(_shipped(ade20k, str(tmp_path)), "train")
    with pytest.raises(DataError, match=r"ADE_train_00000001\.png.*255.*label_255_to = -1"):
        source[0]
    # With label_255_to set, 255 becomes that id directly (not 254 after the shift).
    source = make_source(_shipped(ade20k, str(tmp_path), label_255_to=150), "train")
    label = source[0]["label"]
    np.testing.assert_array_equal(label[:2, :2], 150)
    rest = raw != 255
    np.testing.assert_array_equal(label[rest], np.where(raw[rest] == 0, 150, raw[rest] - 1))


def test_coco_stuff_config_maps_unlabeled_255_to_dontcare(tmp_path):
    written = write_coco_stuff(str(tmp_path))
    data = _shipped(coco_stuff, str(tmp_path))
    assert (data.num_classes, data.dontcare_label, data.label_255_to) == (183, 182, 182)
    for split in ("train", "validation"):
        labels = _labels(make_source(data, split))
        for name, label in labels.items():
            raw = written.examples[split][name]["label"].astype(np.int64)
            np.testing.assert_array_equal(label, np.where(raw == 255, 182, raw))
    raws = [ex["label"] for ex in written.examples["train"].values()]
    assert any((r == 255).any() for r in raws) and any((r == 181).any() for r in raws)


def test_cityscapes_config_keeps_the_label_ids(tmp_path):
    written = write_cityscapes(str(tmp_path))
    data = _shipped(cityscapes, str(tmp_path))
    assert (data.num_classes, data.dontcare_label, data.label_255_to) == (35, -1, -1)
    for name, label in _labels(make_source(data, "train")).items():
        np.testing.assert_array_equal(label, written.examples["train"][name]["label"])
    # The highest labelId written to gtFine PNGs (33, bicycle) is a class; 35 would not be.
    assert data.num_classes > 33


def test_synthetic_config_matches_the_scene_generator():
    data = synthetic.get_config().data
    assert data.num_classes == synthetic_data.NUM_CLASSES
    assert data.dontcare_label == synthetic_data.DONTCARE == data.num_classes - 1
    source = make_source(synthetic.get_config("tiny").data, "train")
    labels = np.stack([source[i]["label"] for i in range(4)])
    assert labels.max() < data.num_classes and (labels == data.dontcare_label).any()


def test_custom_config_maps_255_to_its_label_255_to(tmp_path):
    """The shipped custom config (151 ids, don't-care 150) turns raw 255 into don't-care; with
    label_255_to = -1 a 255 is an error naming the file."""
    write_custom(str(tmp_path), num_classes=5)
    data = _shipped(custom, str(tmp_path))
    assert (data.num_classes, data.dontcare_label, data.label_255_to) == (151, 150, 150)
    path = tmp_path / "labels" / "scene0.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[3:6, 4:9] = 255
    _write_raw(path, raw)
    label = make_source(data, "train")[0]["label"]
    np.testing.assert_array_equal(label, np.where(raw == 255, 150, raw))
    # Another target id, given by a custom folder's own config.
    other = custom_config(str(tmp_path), label_255_to=4, use_instance=False)
    label = make_source(other, "train")[0]["label"]
    np.testing.assert_array_equal(label, np.where(raw == 255, 4, raw))
    other = custom_config(str(tmp_path), label_255_to=-1, use_instance=False)
    with pytest.raises(DataError, match=r"scene0\.png.*outside \[0, 5\): 255"):
        make_source(other, "train")[0]
