"""Input data of clade_jax: sources per on-disk layout, synthetic scenes, grain pipelines, TFDS.

    from clade_jax.data import make_train_iterator, make_eval_iterator
    it = make_train_iterator(config.data, global_batch_size=32, seed=0)

Modules: `layouts` (file pairing), `decoding` (files -> arrays, label encodings), `sources`
(folder, TFDS and synthetic sources), `synthetic` (procedural scenes),
`transforms` (per-example augmentation), `pipeline` (grain iterators), `tfds_builder` + `prepare`
(array_record ingestion), `ade20k_outdoor` (the outdoor subset tool), `classes` (class names).
"""

from clade_jax.data.layouts import DataError
from clade_jax.data.pipeline import (
    build_eval_dataset,
    build_train_dataset,
    make_eval_iterator,
    make_train_iterator,
)
from clade_jax.data.sources import make_source

__all__ = [
    "DataError",
    "build_eval_dataset",
    "build_train_dataset",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
]
