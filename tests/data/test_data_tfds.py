"""TFDS path: `prepare` ingests each layout into array_record and reading it back gives exactly the
examples (and batches) of the folder path."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

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

from clade_jax.data import pipeline
from clade_jax.data.decoding import label_encoding
from clade_jax.data.layouts import DataError, FolderLayout
from clade_jax.data.prepare import prepare
from clade_jax.data.sources import make_source


def _prepare(cfg, data_dir, **kwargs):
    return prepare(FolderLayout.from_config(cfg), data_dir, encoding=label_encoding(cfg), **kwargs)


def _assert_same_sources(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        assert x["name"] == y["name"]
        for k in x:
            if k != "name":
                assert x[k].dtype == y[k].dtype
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{k} of {x['name']}")


@pytest.mark.parametrize(
    "writer,make_cfg",
    [
        (write_ade20k, ade20k_config),
        (write_coco_stuff, coco_config),
        (write_cityscapes, cityscapes_config),
        (write_custom, custom_config),
    ],
    ids=["ade20k", "coco_stuff", "cityscapes", "custom"],
)
def test_prepared_data_gives_the_folder_examples(tmp_path, writer, make_cfg):
    writer(str(tmp_path / "src"))
    cfg = make_cfg(str(tmp_path / "src"), tfds_data_dir=str(tmp_path / "tfds"))
    path = _prepare(cfg, cfg.tfds_data_dir)
    assert os.path.isfile(os.path.join(path, "dataset_info.json"))
    for split in ("train", "validation"):
        folder = make_source(cfg, split)
        cfg.source = "tfds"
        tfds_source = make_source(cfg, split)
        cfg.source = "folder"
        _assert_same_sources(folder, tfds_source)


def test_tfds_and_folder_pipelines_give_identical_batches(tmp_path):
    write_coco_stuff(str(tmp_path / "src"), n_train=6)
    cfg = coco_config(str(tmp_path / "src"), tfds_data_dir=str(tmp_path / "tfds"), icpe=True)
    _prepare(cfg, cfg.tfds_data_dir)
    kw = dict(global_batch_size=2, seed=0, process_index=0, process_count=1)
    folder_it = pipeline.make_train_iterator(cfg, **kw)
    want = [next(folder_it) for _ in range(4)]
    cfg.source = "tfds"
    tfds_it = pipeline.make_train_iterator(cfg, **kw)
    for w in want:
        g = next(tfds_it)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_tfds_source_pickles_for_worker_processes(tmp_path):
    write_ade20k(str(tmp_path / "src"))
    cfg = ade20k_config(str(tmp_path / "src"), tfds_data_dir=str(tmp_path / "tfds"), source="tfds")
    _prepare(cfg, cfg.tfds_data_dir)
    source = make_source(cfg, "train")
    clone = pickle.loads(pickle.dumps(source))
    _assert_same_sources(source, clone)


def test_tfds_max_examples_and_validation_errors_name_the_record(tmp_path):
    write_ade20k(str(tmp_path / "src"), n_train=4)
    cfg = ade20k_config(str(tmp_path / "src"), tfds_data_dir=str(tmp_path / "tfds"), source="tfds")
    _prepare(cfg, cfg.tfds_data_dir)
    assert len(make_source(cfg, "train")) == 4
    cfg.max_examples = 3
    assert len(make_source(cfg, "train")) == 3
    # Read with too few classes: the out-of-range error names the example and the record.
    cfg.num_classes, cfg.dontcare_label = 28, 27
    with pytest.raises(
        DataError, match=r"ADE_train_00000001 \(tfds ade20k/train record 0, label\)"
    ):
        make_source(cfg, "train")[0]


def test_prepare_refuses_bad_label_values_before_writing(tmp_path):
    write_ade20k(str(tmp_path / "src"))
    path = tmp_path / "src" / "annotations" / "validation" / "ADE_val_00000002.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[0, 0] = 200
    Image.fromarray(raw).save(path)
    cfg = ade20k_config(str(tmp_path / "src"))
    with pytest.raises(DataError, match=r"ADE_val_00000002\.png: 1 pixels .*: 200"):
        _prepare(cfg, str(tmp_path / "tfds"))


def test_missing_prepared_data_says_how_to_prepare(tmp_path):
    cfg = ade20k_config(str(tmp_path), source="tfds", tfds_data_dir=str(tmp_path / "none"))
    with pytest.raises(DataError, match="python -m clade_jax.data.prepare --dataset=ade20k"):
        make_source(cfg, "train")


def test_instance_maps_must_have_been_prepared(tmp_path):
    write_coco_stuff(str(tmp_path / "src"))
    cfg = coco_config(
        str(tmp_path / "src"), tfds_data_dir=str(tmp_path / "tfds"), use_instance=False
    )
    _prepare(cfg, cfg.tfds_data_dir)
    cfg.source, cfg.use_instance = "tfds", True
    with pytest.raises(DataError, match="has no instance maps"):
        make_source(cfg, "train")


def test_prepare_command_line(tmp_path):
    write_cityscapes(str(tmp_path / "src"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clade_jax.data.prepare",
            "--dataset=cityscapes",
            "--use_instance",
            f"--source_dir={tmp_path / 'src'}",
            f"--data_dir={tmp_path / 'tfds'}",
            "--splits=train",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = cityscapes_config(
        str(tmp_path / "src"), source="tfds", tfds_data_dir=str(tmp_path / "tfds")
    )
    assert len(make_source(cfg, "train")) == 3
    with pytest.raises(DataError, match="not 'validation'"):
        make_source(cfg, "validation")
