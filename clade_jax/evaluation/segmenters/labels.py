"""Label maps, predictions and the official metrics of the three segmenters' data sets.

One convention for everything downstream: labels are int32 class indices in [0, K) of the
segmenter's classes, and -1 marks ignored pixels (`IGNORE`). Each data set's raw encoding is mapped
by one function, as the official evaluation code does it:

* ADE20K (mit-semseg dataset.py segm_transform): PNG value - 1; 0 ("other") becomes -1.
* COCO-Stuff 164k (kazuto1011 cocostuff.py): class ids as stored, 0..181; 255 (unlabeled) -> -1.
* Cityscapes (fyu/drn prepare_data.py id2label): labelIds 0..33 -> 19 trainIds; the ids the
  benchmark ignores (0-6, 9, 10, 14-16, 18, 29, 30) and -1 (license plate) -> -1.

A label outside the data set's encoding is an error naming the value (a label map from another
data set, or labels already mapped twice). `confusion_matrix` / `scores_from_confusion` give the
official numbers (mit-semseg accuracy / intersectionAndUnion, deeplab-pytorch metric.scores, drn
fast_hist / per_class_iu): ignored pixels (and labels outside [0, K)) are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CITYSCAPES_LABELID_TO_TRAINID",
    "DATASET_OF",
    "IGNORE",
    "MIOU_CONVENTIONS",
    "NUM_CLASSES",
    "confusion_matrix",
    "labels_for",
    "predictions",
    "scores_from_confusion",
]

IGNORE = -1
NUM_CLASSES = {"ade20k": 150, "cocostuff": 182, "cityscapes": 19}
DATASET_OF = {"upernet101": "ade20k", "deeplabv2": "cocostuff", "drn_d_105": "cityscapes"}

# prepare_data.py labels table: labelId -> trainId (255 = ignored there, -1 here).
CITYSCAPES_LABELID_TO_TRAINID = np.array(
    [IGNORE] * 7 + [0, 1, IGNORE, IGNORE, 2, 3, 4, IGNORE, IGNORE, IGNORE, 5, IGNORE]
    + [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, IGNORE, IGNORE, 16, 17, 18],
    np.int32,
)  # fmt: skip


def _values_outside(raw: np.ndarray, lo: int, hi: int, extra=()) -> list[int]:
    values = np.unique(raw)
    bad = values[((values < lo) | (values > hi)) & ~np.isin(values, list(extra))]
    return [int(v) for v in bad[:10]]


def labels_for(dataset: str, raw) -> np.ndarray:
    """Raw label map(s) of `dataset` -> int32 class indices, -1 = ignored.

    Args:
      dataset: "ade20k" (PNG values 0..150), "cocostuff" (0..181, 255), or "cityscapes"
        (labelIds -1..33).
      raw: integer array of any shape.

    Raises:
      ValueError: a value the data set's encoding does not have, naming it.
    """
    raw = np.asarray(raw)
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{dataset} labels must be integers, got {raw.dtype}")
    if dataset == "ade20k":
        bad = _values_outside(raw, 0, 150)
        if bad:
            raise ValueError(f"ade20k label PNG values must be 0..150, found {bad}")
        return raw.astype(np.int32) - 1
    if dataset == "cocostuff":
        bad = _values_outside(raw, 0, 181, extra=(255,))
        if bad:
            raise ValueError(f"cocostuff labels must be 0..181 or 255 (unlabeled), found {bad}")
        return np.where(raw == 255, IGNORE, raw).astype(np.int32)
    if dataset == "cityscapes":
        bad = _values_outside(raw, -1, 33)
        if bad:
            raise ValueError(f"cityscapes labelIds must be -1..33, found {bad}")
        ids = raw.astype(np.int64)
        return np.where(ids < 0, IGNORE, CITYSCAPES_LABELID_TO_TRAINID[np.maximum(ids, 0)])
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(NUM_CLASSES)}")


def predictions(scores: jax.Array) -> jax.Array:
    """(..., K) scores -> (...) int32 argmax (first maximum on ties, as torch.max / numpy)."""
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int) -> jax.Array:
    """(K, K) int32 counts [label, pred] over pixels with 0 <= label < K (jit-able, on device).

    `pred` must lie in [0, K) (an argmax of K scores does).
    """
    pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
    label = jnp.asarray(label).reshape(-1).astype(jnp.int32)
    valid = (label >= 0) & (label < num_classes)
    index = jnp.where(valid, label * num_classes + pred, num_classes * num_classes)
    counts = jnp.bincount(index, length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


MIOU_CONVENTIONS = {"ade20k": "mit", "cocostuff": "deeplab", "cityscapes": "drn"}


def scores_from_confusion(hist, convention: str) -> dict[str, np.ndarray | float]:
    """The official metrics from (K, K) counts [label, pred] (summed over the whole data set).

    The three codebases average class IoUs differently (only classes absent from the data
    set matter, which happens on small subsets):

    * "mit" (mit-semseg eval.py, ADE20K): IoU = I / (U + 1e-10) for every class, mean over all K
      (a class absent from labels and predictions counts as 0).
    * "deeplab" (deeplab-pytorch libs/utils/metric.py, COCO-Stuff): mean over the classes that
      have label pixels; also frequency-weighted IoU.
    * "drn" (fyu/drn per_class_iu + nanmean, Cityscapes): mean over classes with a non-empty union.

    Returns:
      {"pixel_acc", "mean_acc" (nanmean of per-class accuracy), "class_iou" (K,), "mean_iou",
       "fw_iou"}; class_iou is NaN where the union is empty ("mit": 0).
    """
    if convention not in ("mit", "deeplab", "drn"):
        raise ValueError(f"unknown mIoU convention {convention!r}: mit, deeplab or drn")
    hist = np.asarray(hist, np.float64)
    diag, gt, pr = np.diag(hist), hist.sum(axis=1), hist.sum(axis=0)
    union = gt + pr - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = diag / gt
        iou = diag / union
        if convention == "mit":
            iou = diag / (union + 1e-10)
            mean_iou = float(iou.mean())
        elif convention == "deeplab":
            mean_iou = float(np.nanmean(iou[gt > 0])) if (gt > 0).any() else float("nan")
        else:
            mean_iou = float(np.nanmean(iou)) if (union > 0).any() else float("nan")
        freq = gt / max(hist.sum(), 1.0)
    return {
        "pixel_acc": float(diag.sum() / max(hist.sum(), 1.0)),
        "mean_acc": float(np.nanmean(acc_cls)) if (gt > 0).any() else float("nan"),
        "class_iou": iou,
        "mean_iou": mean_iou,
        "fw_iou": float((freq[freq > 0] * iou[freq > 0]).sum()),
    }
