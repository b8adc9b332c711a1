"""Data sources: each data set read in the layout its users download, as grain random-access
sources.

A source has `__len__` and `__getitem__(i)` returning a dict of NumPy arrays:
`image` (H, W, 3) uint8, `label` (H, W) int32 in [0, num_classes) after the data set's remapping,
optionally `instance` (H, W) int32, and `name` (str) for error messages and saved outputs.

The files of each data set are found by `layouts` (pairing) and decoded by `decoding` (label
encodings); this module puts them together per split (`make_source`: folder, TFDS or synthetic).

`source='tfds'` reads the same files from the array_record data written once by
`clade_jax.data.prepare` (see `tfds_builder.py`); the bytes stored there are the original files and
are decoded by the same functions, so both paths give identical examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clade_jax.data.decoding import LabelEncoding, decode_example, label_encoding
from clade_jax.data.layouts import (
    DATASETS,
    FOLDER_DATASETS,
    SPLITS,
    DataError,
    ExampleFiles,
    FolderLayout,
    config_getter,
    list_examples,
)


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
    get = config_getter(data_cfg)
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
