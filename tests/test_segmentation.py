"""Tests of the segmentation scores, the segmenter interface and the built-in trainable segmenter.

The metric tests use tiny label maps whose confusion matrices and scores are worked out by hand in
the comments. The training test fits the compact U-Net to a few synthetic scenes on a CPU.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clade_jax.configs import segmenter as segmenter_config
from clade_jax.evaluation import registry
from clade_jax.evaluation import segmentation as seg

# ----------------------------------------------------------------------------- metrics


def test_confusion_matrix_and_scores_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    # gt 0 -> predicted 0, 1; gt 1 -> 1, 1; gt 2 -> 2, 0.
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    conf = seg.confusion_matrix(pred, gt, 3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)
    m = seg.segmentation_metrics(conf)
    # IoU_0 = 1 / (2 + 2 - 1) = 1/3, IoU_1 = 2 / (2 + 3 - 2) = 2/3, IoU_2 = 1 / (2 + 1 - 1) = 1/2.
    np.testing.assert_allclose(m["per_class_iou"], [1 / 3, 2 / 3, 1 / 2])
    assert m["miou"] == pytest.approx(0.5)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    # Per-class accuracy: 1/2, 2/2, 1/2.
    assert m["mean_accuracy"] == pytest.approx(2 / 3)
    # Frequency-weighted IoU: each class covers 2 of 6 pixels.
    assert m["fw_iou"] == pytest.approx(0.5)
    assert m["num_pixels"] == 6


def test_ignored_label_outside_the_classes_is_dropped():
    gt = np.array([[0, 255, 1, 255]])
    pred = np.array([[0, 1, 0, 2]])  # whatever is predicted on the 255 pixels does not count
    conf = seg.confusion_matrix(pred, gt, 3, ignore_label=255)
    np.testing.assert_array_equal(conf, [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    m = seg.segmentation_metrics(conf)
    # IoU_0 = 1 / (1 + 2 - 1) = 1/2, IoU_1 = 0 / (1 + 0 - 0) = 0, class 2 absent: NaN, excluded.
    np.testing.assert_allclose(m["per_class_iou"], [0.5, 0.0, np.nan])
    np.testing.assert_array_equal(m["valid_classes"], [True, True, False])
    assert m["miou"] == pytest.approx(0.25)
    assert m["pixel_accuracy"] == pytest.approx(0.5)
    assert m["num_pixels"] == 2


def test_dontcare_class_inside_the_range():
    # ADE20k-style: K = 4 with don't-care id 3. gt-3 pixels are dropped; predicting 3 on a real
    # pixel is a miss of the true class; class 3 never enters the mean.
    gt = np.array([0, 0, 1, 3, 3, 2])
    pred = np.array([0, 3, 1, 3, 0, 2])
    conf = seg.confusion_matrix(pred, gt, 4, ignore_label=3)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = expected[0, 3] = expected[1, 1] = expected[2, 2] = 1
    np.testing.assert_array_equal(conf, expected)
    m = seg.segmentation_metrics(conf, ignore_label=3)
    # IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 1, IoU_2 = 1; class 3 excluded (its column is
    # non-empty, so without ignore_label it would count as IoU 0).
    np.testing.assert_allclose(m["per_class_iou"], [0.5, 1.0, 1.0, np.nan])
    assert m["miou"] == pytest.approx(2.5 / 3)
    assert m["pixel_accuracy"] == pytest.approx(3 / 4)
    assert seg.segmentation_metrics(conf)["miou"] == pytest.approx(2.5 / 4)


def test_absent_class_is_excluded_but_a_false_positive_class_is_not():
    # K = 4: class 3 appears nowhere (union 0: excluded); class 2 is only predicted (IoU 0: kept).
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    m = seg.segmentation_metrics(seg.confusion_matrix(pred, gt, 4))
    # IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 1, IoU_2 = 0 / (0 + 1 - 0) = 0, IoU_3 = NaN.
    np.testing.assert_allclose(m["per_class_iou"], [0.5, 1.0, 0.0, np.nan])
    assert m["miou"] == pytest.approx(0.5)
    # Accuracy averages over classes present in the ground truth only: (1/2 + 1) / 2.
    assert m["mean_accuracy"] == pytest.approx(0.75)


def test_confusion_matrices_accumulate_over_batches():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (6, 7, 9))
    pred = rng.integers(0, 5, (6, 7, 9))
    gt[0, :2] = 255
    whole = seg.confusion_matrix(pred, gt, 5, 255)
    parts = sum(seg.confusion_matrix(pred[i : i + 2], gt[i : i + 2], 5, 255) for i in (0, 2, 4))
    np.testing.assert_array_equal(whole, parts)
    assert whole.sum() == gt.size - 2 * 9


def test_out_of_range_ids_raise():
    with pytest.raises(ValueError, match=r"ground-truth class ids \[7\]"):
        seg.confusion_matrix(np.zeros(3, int), np.array([0, 7, 1]), 3)
    with pytest.raises(ValueError, match=r"predicted class ids \[-1\]"):
        seg.confusion_matrix(np.array([0, -1, 1]), np.zeros(3, int), 3)
    with pytest.raises(ValueError, match="shape"):
        seg.confusion_matrix(np.zeros(3, int), np.zeros(4, int), 3)


# ----------------------------------------------------------------------------- interface


def _oracle(labels_by_image: dict, num_classes: int, scale: int = 1) -> seg.CallableSegmenter:
    """A segmenter that looks the image up and returns one-hot logits of its label map."""

    def fn(images):
        out = []
        for image in images:
            labels = labels_by_image[int(image[0, 0, 0])]
            out.append(np.eye(num_classes)[labels[::scale, ::scale]])
        return np.stack(out)

    return seg.CallableSegmenter(fn, num_classes, input_format="uint8", batch_size=2)


def test_evaluate_segmentation_with_an_adapted_callable():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (5, 8, 8)).astype(np.int32)
    images = np.zeros((5, 8, 8, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(5)  # the image's id, read back by the oracle
    oracle = _oracle(dict(enumerate(labels)), 4)
    assert isinstance(oracle, seg.Segmenter)
    m = seg.evaluate_segmentation(oracle, images, labels, num_classes=4, batch_size=2)
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["num_images"] == 5
    # Float images in [-1, 1] are converted for a uint8 segmenter; masks drop images.
    floats = images.astype(np.float32) / 127.5 - 1
    m = seg.evaluate_segmentation(
        oracle, floats, labels, num_classes=4, masks=np.array([1, 1, 0, 0, 1], bool)
    )
    assert m["num_images"] == 3 and m["confusion"].sum() == 3 * 64
    # Logits at a lower resolution are resized to the labels: block-constant maps stay exact.
    blocky = np.repeat(np.repeat(labels[:, ::2, ::2], 2, axis=1), 2, axis=2)
    half = _oracle(dict(enumerate(blocky)), 4, scale=2)
    m = seg.evaluate_segmentation(half, images, blocky, num_classes=4, ignore_label=None)
    assert m["pixel_accuracy"] > 0.7  # bilinear logits at block borders may tie; mostly exact


def test_evaluate_batches_of_the_pipeline_format():
    labels = np.array([[[0, 1], [1, 1]], [[2, 2], [0, 0]]], np.int32)
    images = np.zeros((2, 2, 2, 3), np.uint8)
    images[1, 0, 0, 0] = 1
    oracle = _oracle({0: labels[0], 1: labels[1]}, 3)
    batch = {"image": images, "label": labels, "mask": np.array([True, False])}
    m = seg.evaluate_batches(oracle, [batch, batch], num_classes=3, max_images=1)
    assert m["num_images"] == 1 and m["pixel_accuracy"] == 1.0
    np.testing.assert_array_equal(m["valid_classes"], [True, True, False])


def test_registry():
    assert "builtin" in registry.available_segmenters()
    with pytest.raises(KeyError, match="upernet101"):
        registry.get_segmenter("upernet101")
    registry.register_segmenter("test_constant")(
        lambda num_classes: seg.CallableSegmenter(
            lambda x: np.zeros((*x.shape[:3], num_classes)), num_classes
        )
    )
    s = registry.get_segmenter("test_constant", num_classes=3)
    assert s.num_classes == 3
    with pytest.raises(ValueError, match="already registered"):
        registry.register_segmenter("test_constant")(lambda: None)


# ----------------------------------------------------------------------------- the segmenter


def test_segmenter_shapes_and_loss():
    from clade_jax.evaluation import segmenter

    net = segmenter.SegmenterNet(5, widths=(4, 8, 16), depth=1, rngs=segmenter.init_rngs(0))
    forward = nnx.jit(lambda net, x: net(x))
    # uint8 photos or floats in [-1, 1]; odd sizes (pooling rounds up, then resize to the skip).
    for shape, dtype in (((2, 16, 24, 3), jnp.uint8), ((1, 21, 27, 3), jnp.float32)):
        logits = forward(net, jnp.zeros(shape, dtype))
        assert logits.shape == (*shape[:3], 5) and logits.dtype == jnp.float32
    # The loss ignores don't-care pixels: changing their logits changes nothing.
    logits = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0, 0].set(5.0)
    labels = jnp.array([[[0, 2], [1, 2]]])
    loss, metrics = segmenter.segmentation_loss(logits, labels, ignore_label=2)
    other, _ = segmenter.segmentation_loss(logits.at[0, 0, 1].set(9.0), labels, ignore_label=2)
    assert loss == other
    # Pixel (0,0) has p(0) = e^5 / (e^5 + 2); pixel (1,0) is uniform: log 3.
    expected = (-np.log(np.exp(5) / (np.exp(5) + 2)) + np.log(3)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["valid_fraction"]) == 0.5
    assert float(metrics["pixel_accuracy"]) == pytest.approx(0.5)  # (1,0): argmax 0 != 1


def test_segmenter_config():
    c = segmenter_config.get_config("dataset=ade20k,width=16,steps=7")
    assert c.task == "segmenter"
    assert (c.data.num_classes, c.data.dontcare_label) == (151, 150)
    assert tuple(c.model.widths) == (16, 32, 64, 128) and c.num_train_steps == 7
    with pytest.raises(ValueError, match="unknown"):
        segmenter_config.get_config("norm=spade")


def test_train_segmenter_on_synthetic_scenes(tmp_path):
    from clade_jax.evaluation import segmenter

    config = segmenter_config.get_config("dataset=synthetic,tiny")
    config.write_tensorboard = False
    out = segmenter.train_segmenter(config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "segmenter"
    assert out["train/loss"] < 1.0
    # Chance level: always predicting the most frequent class of the validation pixels.
    restored = segmenter.load_segmenter(tmp_path)
    scores = segmenter.evaluate_segmenter(restored, config)
    conf = scores["confusion"]
    majority = conf.sum(axis=1).max() / conf.sum()
    assert majority < 0.5
    # Seeds 0-4 reach 0.96-0.97 pixel accuracy and mIoU 0.80-0.86; chance is below 0.5.
    assert scores["pixel_accuracy"] > max(0.85, majority + 0.4)
    assert scores["miou"] > 0.6
    # The restored segmenter scores exactly what the trainer reported.
    assert scores["pixel_accuracy"] == pytest.approx(out["eval/pixel_accuracy"])
    # Running again resumes from the final checkpoint: nothing left to train, same scores.
    again = segmenter.train_segmenter(config, tmp_path)
    assert "train/loss" not in again
    assert again["eval/miou"] == pytest.approx(out["eval/miou"])
    # The registry's "builtin" entry is the same thing.
    assert registry.get_segmenter("builtin", workdir=str(tmp_path)).num_classes == 10
