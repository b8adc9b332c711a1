"""Ingest a downloaded data set into TFDS array_record once (then train with `data.source='tfds'`).

    python -m clade_jax.data.prepare --dataset=ade20k \
        --source_dir=/data/ADEChallengeData2016 --data_dir=/data/tfds
    python -m clade_jax.data.prepare --dataset=coco_stuff --use_instance \
        --source_dir=/data/cocostuff --data_dir=/data/tfds
    python -m clade_jax.data.prepare --dataset=custom --source_dir=/data/mine \
        --label_dir=labels --image_dir=images --splits=train --num_classes=13 --data_dir=/data/tfds

The result is `<data_dir>/semantic_synthesis/<dataset>/1.0.0/` (see `tfds_builder.py`). Pairing and
file checks run before anything is written; every label map is also decoded and checked against the
data set's classes while writing, so a bad file stops the preparation with its name.

Why prepare at all: array_record gives fast random access from few large files, which matters on
network file systems and for many hosts; reading the folders directly (`data.source='folder'`)
gives the same examples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags, logging

from clade_jax import configs
from clade_jax.data.decoding import LabelEncoding, label_encoding
from clade_jax.data.layouts import FOLDER_DATASETS, SPLITS, FolderLayout


def encoding_for(
    dataset: str,
    *,
    num_classes: int | None = None,
    dontcare_label: int | None = None,
    label_255_to: int | None = None,
) -> LabelEncoding | None:
    """The label encoding to check a data set's maps against while preparing it.

    The classes, don't-care id and 255 rule are the data set's config's (`clade_jax.configs`,
    the same numbers training uses); the arguments override them. The custom layout has no
    classes of its own: without `num_classes` it gets None (no value checks).
    """
    defaults = configs.load(dataset).data if dataset != "custom" else {}
    given = {"num_classes": num_classes, "dontcare_label": dontcare_label}
    given["label_255_to"] = label_255_to
    fallback = {"num_classes": None, "dontcare_label": -1, "label_255_to": -1}
    fields = {k: v if v is not None else defaults.get(k, fallback[k]) for k, v in given.items()}
    if fields["num_classes"] is None:
        return None
    return label_encoding({"dataset": dataset, **fields})


def prepare(
    layout: FolderLayout,
    data_dir: str,
    *,
    splits: Sequence[str] = SPLITS,
    encoding: LabelEncoding | None = None,
    max_examples: int = 0,
) -> str:
    """Writes the array_record data of `layout` under `data_dir`; returns the data folder.

    Args:
      layout: the data set and where its files are.
      data_dir: TFDS data directory (later `config.data.tfds_data_dir`).
      splits: splits to write ('train', 'validation').
      encoding: label remapping to check every label map against (None: no value checks).
      max_examples: 0 for all, else only the first `max_examples` per split (debugging).

    Returns:
      The folder holding the prepared data. An existing preparation is kept, not rewritten.
    """
    from clade_jax.data import tfds_builder

    builder = tfds_builder.SemanticSynthesis(
        config=layout.dataset,
        data_dir=data_dir,
        file_format="array_record",
        layout=layout,
        splits=splits,
        encoding=encoding,
        max_examples=max_examples,
    )
    builder.download_and_prepare()
    return tfds_builder.dataset_dir(data_dir, layout.dataset)


def _define_flags() -> None:
    """Defines the CLI flags; only when run as a program, so importing `prepare` defines none."""
    flags.DEFINE_enum("dataset", None, list(FOLDER_DATASETS), "Folder layout to ingest.")
    flags.DEFINE_string("source_dir", None, "The data set folder as downloaded.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory to write to.")
    flags.DEFINE_list("splits", list(SPLITS), "Splits to write.")
    flags.DEFINE_bool(
        "use_instance", False, "Store instance maps (coco_stuff, cityscapes, custom)."
    )
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Classes incl. don't-care, for label checks (default: the data set's config).",
    )
    flags.DEFINE_integer("dontcare_label", None, "Don't-care id, -1 if none.")
    flags.DEFINE_integer("label_255_to", None, "Final value of raw label 255, or -1.")
    flags.DEFINE_integer("max_examples", 0, "Write only the first N per split.")
    flags.DEFINE_bool(
        "include_portraits", True, "COCO-Stuff: also read train_*_portrait folders when present."
    )
    flags.DEFINE_string("label_dir", "", "custom: label folder (relative to source_dir).")
    flags.DEFINE_string("image_dir", "", "custom: image folder.")
    flags.DEFINE_string("instance_dir", "", "custom: instance folder.")
    flags.DEFINE_string("val_label_dir", "", "custom: validation label folder.")
    flags.DEFINE_string("val_image_dir", "", "custom: validation image folder.")
    flags.DEFINE_string("val_instance_dir", "", "custom: validation instance folder.")
    flags.mark_flags_as_required(["dataset", "source_dir", "data_dir"])


def main(argv: Sequence[str]) -> None:
    del argv
    f = flags.FLAGS
    dataset = f.dataset
    if not os.path.isdir(f.source_dir):  # before the builder creates anything under data_dir
        raise NotADirectoryError(f"source_dir={f.source_dir} is not a directory")
    layout = FolderLayout(
        dataset=dataset,
        root=f.source_dir,
        use_instance=f.use_instance,
        label_dir=f.label_dir,
        image_dir=f.image_dir,
        instance_dir=f.instance_dir,
        val_label_dir=f.val_label_dir,
        val_image_dir=f.val_image_dir,
        val_instance_dir=f.val_instance_dir,
        include_portraits=f.include_portraits,
    )
    encoding = encoding_for(
        dataset,
        num_classes=f.num_classes,
        dontcare_label=f.dontcare_label,
        label_255_to=f.label_255_to,
    )
    if encoding is None:
        logging.warning("no --num_classes: label values are checked only when training reads them")
    path = prepare(
        layout, f.data_dir, splits=f.splits, encoding=encoding, max_examples=f.max_examples
    )
    logging.info("prepared %s in %s", dataset, path)
    print(path)


if __name__ == "__main__":
    from clade_jax import cli

    _define_flags()
    cli.run(main)  # console lines, user errors -> one paragraph and exit 2, --traceback
