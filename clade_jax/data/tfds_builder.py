"""TFDS builder that ingests a data set's folders into array_record once, and the reader for it.

One configurable builder, `SemanticSynthesis` (TFDS name `semantic_synthesis`), with one builder
config per folder layout (`ade20k`, `ade20k_outdoor`, `coco_stuff`, `cityscapes`, `custom`). It
stores, per example, the original encoded files as they are on disk (no re-encoding: TFDS keeps the
bytes of a file given by path) plus the example's name:

    name: Text; image: Image (jpeg or png bytes); label: Image (png, 1 channel);
    instance: Image (png, 1 channel, uint16) -- only when prepared with instance maps.

Why bytes and not decoded arrays: it keeps the prepared data as small as the download, and reading
decodes with exactly the functions the folder source uses (`decoding.decode_example`), so both
sources give identical examples. Examples keep the folder order (`disable_shuffling`), so the same
index means the same example in both. Writing array_record and reading it back needs no TensorFlow.

Write with `python -m clade_jax.data.prepare` (see `prepare.py`); read with `open_data_source`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from clade_jax.data.decoding import LabelEncoding, read_id_map
from clade_jax.data.layouts import FOLDER_DATASETS, SPLITS, DataError, FolderLayout, list_examples

TFDS_NAME = "semantic_synthesis"
VERSION = "1.0.0"
_IMAGE_FEATURES = ("image", "label", "instance")


class SemanticSynthesis(tfds.core.GeneratorBasedBuilder):
    """Label map / photo pairs of one folder layout, stored as the original encoded files.

    Args (writing only; reading goes through `open_data_source`):
      layout: where the files are (`FolderLayout`); its `dataset` must equal `config`.
      splits: which splits to write.
      encoding: if given, every label map is decoded and checked against it while writing.
      max_examples: 0 for all, else write only the first `max_examples` of each split.
      **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (`config`, `data_dir`, ...).
    """

    RELEASE_NOTES = {VERSION: "Original image/label/instance files stored as encoded bytes."}
    VERSION = tfds.core.Version(VERSION)
    # TFDS (4.9.10) looks up a builder's code path through `importlib_resources`, a package it
    # only declares for Python < 3.9; giving the path directly avoids that import.
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"{name} folder layout")
        for name in FOLDER_DATASETS
    ]

    def __init__(
        self,
        *,
        layout: FolderLayout | None = None,
        splits: Sequence[str] = SPLITS,
        encoding: LabelEncoding | None = None,
        max_examples: int = 0,
        **kwargs,
    ):
        self._layout = layout
        self._splits = tuple(splits)
        self._encoding = encoding
        self._max_examples = max_examples
        super().__init__(**kwargs)
        if layout is not None and layout.dataset != self.builder_config.name:
            raise ValueError(
                f"layout is for {layout.dataset!r}, builder config is {self.builder_config.name!r}"
            )

    def _with_instance(self) -> bool:
        return bool(self._layout is not None and self._layout.use_instance)

    def _info(self) -> tfds.core.DatasetInfo:
        image_format = "png" if self.builder_config.name == "cityscapes" else "jpeg"
        features = {
            "name": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        }
        if self._with_instance():
            features["instance"] = tfds.features.Image(
                shape=(None, None, 1), dtype=np.uint16, encoding_format="png"
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # keep the folder order: index i is the same example
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local; nothing is downloaded
        if self._layout is None:
            raise ValueError("SemanticSynthesis needs `layout=` to write data")
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str):
        examples = list_examples(self._layout, split)
        if self._max_examples > 0:
            examples = examples[: self._max_examples]
        for e in examples:
            self._check(e)
            features = {"name": e.name, "image": epath.Path(e.image), "label": epath.Path(e.label)}
            if self._with_instance():
                features["instance"] = epath.Path(e.instance)
            yield e.name, features

    def _check(self, e) -> None:
        """Cheap per-file checks while writing: readable headers, equal sizes, label values."""
        sizes = {}
        for role, path in (("image", e.image), ("label", e.label), ("instance", e.instance)):
            if path is None or (role == "instance" and not self._with_instance()):
                continue
            try:
                with Image.open(path) as im:
                    sizes[role] = im.size
            except (OSError, SyntaxError, ValueError) as err:
                raise DataError(f"cannot read {role} file {path}: {err}") from err
        if len(set(sizes.values())) > 1:
            raise DataError(f"size mismatch (W, H) between the files of {e.name}: {sizes}")
        if self._encoding is not None:
            self._encoding(read_id_map(e.label, e.label), e.label)


def dataset_dir(data_dir: str, dataset: str) -> str:
    """The folder of the prepared data of `dataset`: <data_dir>/<name>/<config>/<version>."""
    return os.path.join(data_dir, TFDS_NAME, dataset, VERSION)


def open_data_source(data_dir: str, dataset: str, split: str):
    """Opens prepared data for random access; image features stay encoded bytes.

    Args:
      data_dir: the `--data_dir` given to `prepare`.
      dataset: the builder config (a `FOLDER_DATASETS` name).
      split: 'train' or 'validation'.

    Returns:
      A TFDS `ArrayRecordDataSource` whose records are dicts of bytes.
    """
    path = dataset_dir(data_dir, dataset)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise DataError(
            f"no prepared {dataset} data in {path}; run `python -m clade_jax.data.prepare "
            f"--dataset={dataset} --source_dir=<the downloaded folder> --data_dir={data_dir}`"
        )
    # builder_from_directory reads the stored features.json, so reading needs no builder code and
    # works whatever optional features (instance maps) the data was prepared with.
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise DataError(
            f"prepared {dataset} data in {path} has splits {sorted(builder.info.splits)}, "
            f"not {split!r}"
        )
    skip = {k: tfds.decode.SkipDecoding() for k in _IMAGE_FEATURES if k in builder.info.features}
    return builder.as_data_source(split, decoders=skip)


__all__ = [
    "SemanticSynthesis",
    "TFDS_NAME",
    "VERSION",
    "dataset_dir",
    "open_data_source",
]
