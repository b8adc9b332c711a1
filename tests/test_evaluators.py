"""The evaluators and their per-batch runner, on hand-made batches (no generator).

The device functions here are exact integer computations (a segmenter that classifies pixels by
colour thresholds, features that are per-channel pixel sums of the image halves), so the expected
confusion matrices and feature statistics are computed independently with NumPy, and the runner
on 1 device and on 8 devices must agree exactly (confusion) or to float64 rounding (statistics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clade_jax.evaluation import fid, segmentation
from clade_jax.evaluation.evaluators import common
from clade_jax.evaluation.evaluators import fid as fid_eval
from clade_jax.evaluation.evaluators import segmentation as seg_eval

K = 10  # classes of the hand-made data (9 = don't care, as the synthetic scenes)
DONTCARE = 9


def colour_classes_np(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W) class ids in [0, 8): R quarter + 4 * G half."""
    x = np.asarray(images).astype(np.int64)
    return x[..., 0] // 64 + 4 * (x[..., 1] // 128)


def colour_segmenter(k: int = K, shift: int = 0) -> seg_eval.DeviceSegmenter:
    """The same classification on device, as one-hot scores (k classes; `shift` added mod k)."""

    def scores(params, images, size):
        del params
        x = images.astype(jnp.int32)
        classes = (x[..., 0] // 64 + 4 * (x[..., 1] // 128) + shift) % k
        return jax.nn.one_hot(classes, k, dtype=jnp.float32)

    return seg_eval.DeviceSegmenter(scores, {}, k, f"colour+{shift}")


def half_sums_np(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 6): each channel's pixel sum over the top and bottom halves."""
    x = np.asarray(images, np.float64)
    h = x.shape[1] // 2
    return np.concatenate([x[:, :h].sum((1, 2)), x[:, h:].sum((1, 2))], axis=1)


def half_sums(params, images):
    """`half_sums_np` on device (exact: integer sums below 2**24 in float32)."""
    del params
    x = images.astype(jnp.float32)
    h = x.shape[1] // 2
    return jnp.concatenate([x[:, :h].sum((1, 2)), x[:, h:].sum((1, 2))], axis=1)


def make_batches(n: int, batch: int, seed: int = 0):
    """`n` random examples in batches of `batch` as an evaluation iterator gives them (the last
    batch padded with copies, `mask` False and `index` -1 there); also the raw arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 16, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, K, (n, 16, 12)).astype(np.int32)
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        real = idx < n
        src = np.where(real, idx, n - 1)
        out.append(
            {
                "image": images[src],
                "label": labels[src],
                "mask": real,
                "index": np.where(real, idx, -1).astype(np.int32),
            }
        )
    return out, images, labels


def run_once(mesh, batches, count, segmenter, *, staged_fn=None):
    fid_ev = fid_eval.FidEvaluator((half_sums, {}))
    table = seg_eval.label_table(K, segmenter.num_classes, dontcare=DONTCARE)
    seg = seg_eval.SegmentationEvaluator(segmenter, table, metric_ignore=DONTCARE, real=False)
    runner = common.Runner(common.real_source(), [fid_ev, seg], mesh=mesh)
    assert runner.run(batches, count=count) == count
    return fid_ev.result(), seg.result()


@pytest.mark.parametrize("block", [1, 12, 256])  # outer products per batch, per 2 batches, once
def test_running_statistics_equal_numpy_two_pass(block):
    rng = np.random.default_rng(3)
    feats = 1000.0 + rng.standard_normal((37, 5)) * [1, 2, 3, 0.5, 0.01]  # large mean
    stats = fid_eval.RunningStatistics(block=block)
    for start in range(0, 37, 8):
        stats.add(feats[start : start + 8])
    mu, sigma = stats.mean_and_covariance()
    ref_mu, ref_sigma = fid.statistics(feats)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-13)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid_eval.RunningStatistics().mean_and_covariance()


def test_counts_and_features_on_one_and_eight_devices_equal_numpy():
    """21 examples in batches of 8 (3 padding rows), count 18: rows past 18 and the padding are
    excluded on device; confusion matrices identical on 1 and 8 devices and equal to NumPy's."""
    batches, images, labels = make_batches(21, 8)
    count = 18
    want_conf = segmentation.confusion_matrix(
        colour_classes_np(images[:count]), labels[:count], K, DONTCARE
    )
    want_mu, want_sigma = fid.statistics(half_sums_np(images[:count]))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        stats, scores = run_once(common.make_mesh(devices), batches, count, colour_segmenter())
        np.testing.assert_array_equal(scores["confusion"], want_conf)
        np.testing.assert_allclose(stats["mu"], want_mu, rtol=1e-12)
        np.testing.assert_allclose(stats["sigma"], want_sigma, rtol=1e-9)
        assert stats["count"] == count
        results.append((stats, scores))
    assert len(jax.devices()) == 8  # the comparison above is 1 vs 8 devices
    np.testing.assert_array_equal(results[0][1]["confusion"], results[1][1]["confusion"])
    d = [
        fid.frechet_distance(s["mu"], s["sigma"], want_mu, want_sigma + np.eye(6))
        for s, _ in results
    ]
    assert d[0] == pytest.approx(d[1], rel=1e-9)


def test_batches_in_another_order_and_padding_only_batches_give_the_same_counts():
    """The runner reads one batch ahead while the evaluation iterators' layout says more are
    needed; with another layout (two batches of padding only first, then the rest in reverse
    order) it reads on until `count` examples were seen: the same counts and statistics."""
    batches, images, labels = make_batches(21, 8)
    count = 18
    padding = dict(batches[0], mask=np.zeros(8, bool), index=np.full(8, -1, np.int32))
    mesh = common.make_mesh(jax.devices()[:1])
    want = run_once(mesh, batches, count, colour_segmenter())
    got = run_once(mesh, [padding, padding, *batches[::-1]], count, colour_segmenter())
    np.testing.assert_array_equal(got[1]["confusion"], want[1]["confusion"])
    np.testing.assert_allclose(got[0]["sigma"], want[0]["sigma"], rtol=1e-12)
    assert got[0]["count"] == want[0]["count"] == count


def test_host_stage_prepares_inputs_on_the_host():
    """A segmenter whose protocol needs a host step (as PIL resizes): the runner gives it this
    process's images, shards what it returns and scores it on device."""

    def prepare(images, size):
        return {"x": (np.asarray(images) // 2).astype(np.uint8)}

    base = colour_segmenter()
    staged = seg_eval.DeviceSegmenter(
        lambda p, inputs, size: base.scores(p, inputs["x"], size), {}, K, "halved", prepare
    )
    batches, images, labels = make_batches(16, 8, seed=1)
    _, scores = run_once(common.make_mesh(), batches, 16, staged)
    want = segmentation.confusion_matrix(colour_classes_np(images // 2), labels, K, DONTCARE)
    np.testing.assert_array_equal(scores["confusion"], want)


def test_numpy_segmenter_is_called_back_from_the_device():
    calls = []

    def fn(images):
        calls.append(len(images))
        return np.eye(K, dtype=np.float32)[colour_classes_np(images)]

    seg = seg_eval.device_segmenter(segmentation.CallableSegmenter(fn, K, input_format="uint8"))
    batches, images, labels = make_batches(8, 8, seed=2)
    _, scores = run_once(common.make_mesh(jax.devices()[:1]), batches, 8, seg)
    want = segmentation.confusion_matrix(colour_classes_np(images), labels, K, DONTCARE)
    np.testing.assert_array_equal(scores["confusion"], want)
    assert calls == [8]


def test_labels_outside_the_segmenter_classes_are_an_error_naming_them():
    small = colour_segmenter(k=5)
    table = seg_eval.label_table(K, 5, dontcare=DONTCARE)
    np.testing.assert_array_equal(table, [0, 1, 2, 3, 4, -2, -2, -2, -2, -1])
    ev = seg_eval.SegmentationEvaluator(small, table, what="the test data")
    labels = np.zeros((2, 4, 4), np.int32)
    labels[1, 0, 0] = 7
    labels[1, 0, 1] = DONTCARE  # ignored, not an error
    with pytest.raises(ValueError, match=r"labels \[7\] of the test data are outside the segm"):
        ev.check_batch({"label": labels, "valid": np.array([True, True])})
    ev.check_batch({"label": labels, "valid": np.array([True, False])})  # padding row: fine
    with pytest.raises(ValueError, match=r"labels \[19\].*outside \[0, 10\)"):
        ev.check_batch({"label": labels + 12 * (labels == 7), "valid": np.array([True, True])})
    with pytest.raises(ValueError, match=r"gives classes \[19\] but the segmenter has 19"):
        seg_eval.label_table(35, 19, mapping=np.arange(35) % 20)
    mapped = seg_eval.label_table(4, 2, mapping=np.array([255, 0, 1, -1]))
    np.testing.assert_array_equal(mapped, [-1, 0, 1, -1])


TINY_PAPER_SEGMENTERS = {  # the parity fixtures' tiny architectures (random init here)
    "upernet101": dict(layers=(1, 1, 1, 1), width=4, fpn_dim=8, num_class=8),
    "deeplabv2": dict(n_blocks=(1, 1, 1, 1), width=8, n_classes=8),
    "drn_d_105": dict(layers=(1,) * 8, channels=(8, 16, 16, 32, 32, 64, 64, 64), classes=8),
}


@pytest.mark.parametrize(
    "name, multiscale",
    [("upernet101", False), ("deeplabv2", True), ("drn_d_105", False), ("drn_d_105", True)],
)
def test_paper_segmenters_count_what_their_own_scores_predict(name, multiscale):
    """The evaluator's split of each official protocol (host PIL steps, device network) counts
    exactly the argmax of the segmenter's own `scores`, on 8 devices."""
    from clade_jax.evaluation import segmenters

    seg = segmenters.from_official(name, None, **TINY_PAPER_SEGMENTERS[name])
    batches, images, _ = make_batches(8, 8, seed=4)
    labels = np.random.default_rng(5).integers(0, 8, (8, 16, 12)).astype(np.int32)
    for b in batches:
        b["label"] = labels
    device = seg_eval.device_segmenter(seg, multiscale=multiscale)
    table = seg_eval.label_table(8, 8)
    ev = seg_eval.SegmentationEvaluator(device, table, real=False)
    common.Runner(common.real_source(), [ev], mesh=common.make_mesh()).run(batches, count=8)
    pred = np.argmax(np.asarray(seg.scores(images, (16, 12), multiscale)), axis=-1)
    np.testing.assert_array_equal(
        ev.result()["confusion"], segmentation.confusion_matrix(pred, labels, 8)
    )


def test_cityscapes_label_ids_map_to_the_drn_train_ids():
    from clade_jax.evaluation import protocols

    mapping = protocols.label_mapping("cityscapes", "drn_d_105", 35)
    table = seg_eval.label_table(35, 19, mapping=mapping)
    assert (table[7], table[8], table[26], table[33]) == (0, 1, 13, 18)  # road, sidewalk, car, bike
    assert (table[:7] == seg_eval.IGNORED).all() and table[34] == seg_eval.UNKNOWN
    assert sorted(set(table[table >= 0].tolist())) == list(range(19))
    assert protocols.label_mapping("ade20k", "upernet101", 151) is None  # ids are the classes


def test_input_size_resizes_for_the_segmenter_on_device_and_on_the_host():
    """`input_size`: the segmenter sees the images resized with PIL bicubic (16x12 -> 32x24),
    on device for a traced segmenter and on the host for a staged one, with the same bits; both
    score at the 16x12 label size (here: every second pixel of the upsampled image)."""
    from PIL import Image

    def subsample(x):
        return x[:, ::2, ::2]

    base = colour_segmenter()
    on_device = seg_eval.DeviceSegmenter(
        lambda p, x, size: base.scores(p, subsample(x), size), {}, K, "subsampled"
    )
    staged = seg_eval.DeviceSegmenter(
        lambda p, inputs, size: base.scores(p, inputs["x"], size),
        {},
        K,
        "subsampled on the host",
        lambda images, size: {"x": subsample(np.asarray(images))},
    )
    batches, images, labels = make_batches(8, 8, seed=6)
    up = np.stack(
        [np.asarray(Image.fromarray(im).resize((24, 32), Image.BICUBIC)) for im in images]
    )
    want = segmentation.confusion_matrix(colour_classes_np(subsample(up)), labels, K, DONTCARE)
    plain = segmentation.confusion_matrix(colour_classes_np(images), labels, K, DONTCARE)
    assert not np.array_equal(want, plain)  # the resize shows in the counts
    for seg in (on_device, staged):
        table = seg_eval.label_table(K, K, dontcare=DONTCARE)
        ev = seg_eval.SegmentationEvaluator(seg, table, real=False, input_size=(32, 24))
        common.Runner(common.real_source(), [ev], mesh=common.make_mesh()).run(batches, count=8)
        np.testing.assert_array_equal(ev.result()["confusion"], want)
    with pytest.raises(ValueError, match=r"segmenter_size must be positive, got \(0, 24\)"):
        seg_eval.SegmentationEvaluator(on_device, table, input_size=(0, 24))
