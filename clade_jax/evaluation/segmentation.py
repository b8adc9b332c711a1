"""Segmentation scores of synthesized images: mIoU and pixel accuracy, and the segmenter interface.

The papers judge how well a generated image follows its label map by segmenting it with a
pretrained network and comparing the prediction with the input labels (UperNet101 on ADE20k,
DeepLabv2 on COCO-Stuff, DRN-D-105 on Cityscapes). This module holds the parts that do not
depend on which segmenter is used:

* `confusion_matrix(pred, gt, num_classes, ignore_label)`: a (K, K) int64 count matrix (rows:
  ground truth, columns: prediction) made with one `np.bincount`; matrices of several batches add.
* `segmentation_metrics(conf)`: mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU
  and the per-class values.
* `Segmenter`: the protocol every segmenter follows (`num_classes`, `__call__(images) -> logits`),
  `CallableSegmenter` to adapt any function. Segmenters by name (the built-in trainable one as
  "builtin") are `clade_jax.evaluation.registry`'s.
* `evaluate_segmentation(segmenter, images, labels, ...)` (arrays) and `evaluate_batches` (the
  data pipeline's batch dicts): segment, accumulate, score.

Conventions (stated once, used everywhere):

* Pixels whose ground truth is `ignore_label` (the don't-care class) are dropped before counting.
  A prediction *of* the don't-care class on a real pixel counts as a miss of that pixel's class.
* IoU_c = TP / (TP + FP + FN) from the matrix accumulated over the whole set (not per image).
  Classes whose union is 0 (absent from both prediction and ground truth) have an undefined IoU
  (NaN) and are left out of the mean, as in the Cityscapes (DRN) and COCO-Stuff (DeepLab)
  evaluation scripts (`np.nanmean`); the don't-care class is never part of the mean. (The ADE20k
  scene-parsing script divides by union + 1e-10 instead, which counts an absent class as IoU 0;
  on the full validation set every class is present and the two agree.)
* Pixel accuracy = correctly labelled pixels / all counted pixels.
* Labels or predictions outside [0, num_classes) (other than `ignore_label`) raise a ValueError:
  they would otherwise be silently dropped or miscounted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clade_jax.inference import to_uint8

# The segmenters the papers used per data set (for the registry's error message and docs).
PAPER_SEGMENTERS = {
    "ade20k": "upernet101 (CSAILVision semantic-segmentation-pytorch, UperNet-101)",
    "coco_stuff": "deeplabv2 (DeepLab v2, ResNet-101, COCO-Stuff 164k)",
    "cityscapes": "drn_d_105 (fyu/drn, DRN-D-105)",
}


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_label: int | None = None
) -> np.ndarray:
    """Counts of (ground truth, prediction) pairs over all pixels.

    Args:
      pred: predicted class ids, any integer shape (e.g. (N, H, W)).
      gt: ground-truth class ids, same shape.
      num_classes: K; ids must lie in [0, K).
      ignore_label: ground-truth id whose pixels are not counted (None or negative: none). It
        may lie outside [0, K) (e.g. 255).

    Returns:
      (K, K) int64 matrix `conf[g, p]` = number of pixels of true class g predicted as p. Sum the
      matrices of several batches to evaluate a whole set.

    Raises:
      ValueError: shapes differ, or an id outside [0, K) that is not `ignore_label`.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
        raise ValueError(f"class ids must be integers, got {pred.dtype} and {gt.dtype}")
    gt = gt.ravel().astype(np.int64)
    pred = pred.ravel().astype(np.int64)
    if ignore_label is not None and ignore_label >= 0:
        keep = gt != ignore_label
        gt, pred = gt[keep], pred[keep]
    for name, ids in (("ground-truth", gt), ("predicted", pred)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            bad = np.unique(ids[(ids < 0) | (ids >= num_classes)])
            raise ValueError(
                f"{name} class ids {bad[:10].tolist()} outside [0, {num_classes})"
                + (f" (ignore_label={ignore_label})" if ignore_label is not None else "")
            )
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def segmentation_metrics(conf: np.ndarray, ignore_label: int | None = None) -> dict[str, Any]:
    """Scores from an accumulated confusion matrix (see the module docstring for conventions).

    Args:
      conf: (K, K) counts, rows ground truth, columns prediction.
      ignore_label: a class id in [0, K) to leave out of the per-class means (the don't-care
        class when the segmenter can predict it); None or out of range: none.

    Returns:
      dict with
        "miou": mean IoU over classes with a non-empty union (float; NaN if there is none),
        "pixel_accuracy": correct / counted pixels,
        "mean_accuracy": mean over classes present in the ground truth of TP / (TP + FN),
        "fw_iou": IoU weighted by ground-truth frequency,
        "per_class_iou": (K,) float64, NaN where the union is empty,
        "per_class_accuracy": (K,) float64, NaN where the class is absent from the ground truth,
        "valid_classes": (K,) bool, the classes that entered the mIoU,
        "num_pixels": counted pixels (int).
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    k = conf.shape[0]
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    union = gt_count + pred_count - tp
    real = np.ones(k, bool)
    if ignore_label is not None and 0 <= ignore_label < k:
        real[ignore_label] = False
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where((union > 0) & real, tp / union, np.nan)
        acc = np.where((gt_count > 0) & real, tp / gt_count, np.nan)
    valid = ~np.isnan(iou)
    total = conf.sum()
    freq = gt_count / total if total else np.zeros(k)
    return {
        "miou": float(np.mean(iou[valid])) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else float("nan"),
        "fw_iou": float(np.sum(freq[valid] * iou[valid])),
        "per_class_iou": iou,
        "per_class_accuracy": acc,
        "valid_classes": valid,
        "num_pixels": int(total),
    }


# ----------------------------------------------------------------------------- segmenters


@runtime_checkable
class Segmenter(Protocol):
    """What `evaluate_segmentation` needs from a segmentation network.

    `num_classes` is the number of logits K; class ids must mean the same as the data set's label
    ids (a segmenter with fewer classes than the data, e.g. 150 ADE20k classes without the
    don't-care id 150, is fine). `__call__` takes a batch of images (N, H, W, 3), either uint8 in
    [0, 255] or float in [-1, 1] (the generator's and the data pipeline's range), and returns
    logits (N, H, W, K) at the input resolution (any array type NumPy can read).
    """

    num_classes: int

    def __call__(self, images: np.ndarray) -> Any: ...


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images pass through; float images in [-1, 1] -> uint8, rounded to nearest (the
    inverse of the pipeline's `u8 / 127.5 - 1`: real photos come back bit-exact)."""
    return to_uint8(images, "nearest")


def images_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1); float images -> float32 unchanged."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images.astype(np.float32)


class CallableSegmenter:
    """Adapts any function to the `Segmenter` protocol.

    Args:
      fn: images -> logits (N, H, W, K); receives what `input_format` says.
      num_classes: K.
      input_format: "uint8" ([0, 255] uint8), "float" (float32 in [-1, 1]) or "unit" (float32 in
        [0, 1], as torchvision-style networks before their mean/std normalization).
      batch_size: if > 0, calls `fn` on chunks of this many images (memory bound).
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], Any],
        num_classes: int,
        *,
        input_format: str = "float",
        batch_size: int = 0,
    ):
        if input_format not in ("uint8", "float", "unit"):
            raise ValueError(f"input_format must be uint8, float or unit, got {input_format!r}")
        self.fn, self.num_classes = fn, num_classes
        self.input_format, self.batch_size = input_format, batch_size

    def _convert(self, images: np.ndarray) -> np.ndarray:
        if self.input_format == "uint8":
            return images_to_uint8(images)
        if self.input_format == "unit":
            return images_to_uint8(images).astype(np.float32) / np.float32(255.0)
        return images_to_float(images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = self._convert(images)
        step = self.batch_size if self.batch_size > 0 else len(images)
        outs = [np.asarray(self.fn(images[i : i + step])) for i in range(0, len(images), step)]
        return np.concatenate(outs, axis=0)


# ----------------------------------------------------------------------------- evaluation


def _resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, h, w, K) logits to `size` (when the segmenter's output and the
    labels differ in resolution; upsampling logits, not labels, as the papers' scripts do)."""
    import jax

    n, _, _, k = logits.shape
    return np.asarray(jax.image.resize(logits, (n, *size, k), "bilinear"))


def predict_labels(segmenter: Segmenter, images: np.ndarray, size: tuple[int, int] | None = None):
    """Class ids (N, H, W) int32: argmax of the segmenter's logits, resized to `size` if given.

    Args:
      segmenter: a `Segmenter`.
      images: (N, H, W, 3) uint8 or float in [-1, 1].
      size: (height, width) of the label maps to compare with; None keeps the logits' size.

    Returns:
      (N, size...) int32 predictions.
    """
    logits = np.asarray(segmenter(images))
    if logits.ndim != 4 or logits.shape[-1] != segmenter.num_classes:
        raise ValueError(
            f"segmenter returned shape {logits.shape}; expected (N, H, W, {segmenter.num_classes})"
        )
    if size is not None and tuple(logits.shape[1:3]) != tuple(size):
        logits = _resize_logits(logits, tuple(size))
    return np.argmax(logits, axis=-1).astype(np.int32)


def evaluate_segmentation(
    segmenter: Segmenter,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    ignore_label: int | None = None,
    masks: np.ndarray | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Segments `images` and scores the predictions against `labels`.

    Args:
      segmenter: a `Segmenter` (its class ids must mean the data set's ids).
      images: (N, H, W, 3) uint8 or float in [-1, 1].
      labels: (N, H', W') int label maps; the logits are resized bilinearly to (H', W') if the
        sizes differ.
      num_classes: K of the data set (counting the don't-care class).
      ignore_label: the data set's don't-care id (None / negative: none).
      masks: optional (N,) bool (False: leave the image out).
      batch_size: images per segmenter call.

    Returns:
      As `evaluate_batches`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label maps")

    def batches():
        for i in range(0, len(images), batch_size):
            batch = {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
            if masks is not None:
                batch["mask"] = np.asarray(masks)[i : i + batch_size]
            yield batch

    return evaluate_batches(
        segmenter, batches(), num_classes=num_classes, ignore_label=ignore_label
    )


def evaluate_batches(
    segmenter: Segmenter,
    batches: Iterable[dict],
    *,
    num_classes: int,
    ignore_label: int | None = None,
    image_key: str = "image",
    max_images: int = 0,
) -> dict[str, Any]:
    """Scores a segmenter over batches of the data pipeline (`make_eval_iterator`) or any dicts.

    Args:
      segmenter: a `Segmenter`.
      batches: dicts with `image_key` (N, H, W, 3), "label" (N, H', W') and optionally "mask"
        (N,) bool (False: padding, not counted).
      num_classes: K of the data set (counting the don't-care class).
      ignore_label: don't-care id (None / negative: none).
      image_key: which entry to segment ("image" for real photos; a synthesized batch can be put
        under another key).
      max_images: > 0 stops after this many counted images.

    Returns:
      `segmentation_metrics` of the accumulated confusion matrix (this process's images only),
      plus "confusion" (K, K) int64 and "num_images".
    """
    if segmenter.num_classes > num_classes:
        raise ValueError(
            f"segmenter predicts {segmenter.num_classes} classes but the data has {num_classes}"
        )
    conf = np.zeros((num_classes, num_classes), np.int64)
    count = 0
    for batch in batches:
        images, labels = np.asarray(batch[image_key]), np.asarray(batch["label"])
        if batch.get("mask") is not None:
            keep = np.asarray(batch["mask"], bool)
            images, labels = images[keep], labels[keep]
        if max_images > 0:
            images, labels = images[: max_images - count], labels[: max_images - count]
        if len(labels):
            pred = predict_labels(segmenter, images, labels.shape[1:3])
            conf += confusion_matrix(pred, labels, num_classes, ignore_label)
            count += len(labels)
        if 0 < max_images <= count:
            break
    dontcare = ignore_label if ignore_label is not None and ignore_label >= 0 else None
    out = segmentation_metrics(conf, dontcare)
    out["confusion"] = conf
    out["num_images"] = count
    return out
