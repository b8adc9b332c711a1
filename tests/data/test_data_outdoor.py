"""ADE20k-outdoor selection: the documented rule picks the right images, writes a loadable copy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_fakes import ade20k_config, write_ade20k
from PIL import Image

from clade_jax.data import ade20k_outdoor as O
from clade_jax.data.sources import make_source


def test_rule_uses_sky_tree_sea_raw_ids():
    assert O.raw_ids(O.OUTDOOR_CLASSES) == (3, 5, 27)
    indoor = np.array([[1, 4, 6], [0, 0, 6]])  # wall, floor, ceiling, unknown
    assert not O.is_outdoor(indoor, (3, 5, 27))
    assert O.is_outdoor(np.array([[1, 4, 27]]), (3, 5, 27))
    assert not O.is_outdoor(np.array([[1, 4, 27]]), (3, 5, 27), min_fraction=0.5)
    with pytest.raises(ValueError, match="'skies' is not an ADE20k class"):
        O.raw_ids(["skies"])


def _set_label(root, folder, name, value):
    Image.fromarray(np.full((40, 60), value, np.uint8)).save(
        os.path.join(root, "annotations", folder, name + ".png")
    )


def test_select_and_write_subset_loads_as_ade20k_outdoor(tmp_path):
    src, out = str(tmp_path / "ade"), str(tmp_path / "outdoor")
    write_ade20k(src, n_train=4, n_val=2)
    _set_label(src, "training", "ADE_train_00000001", 4)  # floor only: indoor
    _set_label(src, "training", "ADE_train_00000002", 3)  # sky
    _set_label(src, "training", "ADE_train_00000003", 1)  # wall
    _set_label(src, "training", "ADE_train_00000004", 27)  # sea
    _set_label(src, "validation", "ADE_val_00000001", 5)  # tree
    _set_label(src, "validation", "ADE_val_00000002", 0)  # unknown
    selection = O.select_outdoor(src)
    assert [e.name for e in selection["train"]] == ["ADE_train_00000002", "ADE_train_00000004"]
    assert [e.name for e in selection["validation"]] == ["ADE_val_00000001"]
    O.write_subset(selection, out, mode="symlink", rule="test rule")
    source = make_source(ade20k_config(out, dataset="ade20k_outdoor"), "train")
    assert len(source) == 2 and source[0]["label"].max() == 2  # raw sky 3 -> class 2
    with open(os.path.join(out, "selection.txt")) as f:
        assert f.read().splitlines() == [
            "# test rule",
            "train ADE_train_00000002",
            "train ADE_train_00000004",
            "validation ADE_val_00000001",
        ]
