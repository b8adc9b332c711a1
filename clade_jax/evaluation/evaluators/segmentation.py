"""Segmentation evaluator: a segmenter's confusion matrix, counted on device.

Per batch, inside the runner's jit: the segmenter's scores for the images at the label size
(N, h, w, K) -> argmax -> the ground truth mapped to the segmenter's classes (a lookup table,
-1 = ignored) -> `bincount(gt * K + pred)` over the valid pixels of the valid rows -> (K, K) int32
counts, summed over the global batch (all devices and processes) by XLA. Only the counts leave
the device; the host sums them in int64 and scores them with `segmentation.segmentation_metrics`.
The same is done for the real images of the batch (`real=True`), the segmenter's reference
score on the data.

Segmenters (`DeviceSegmenter`): a traced `scores(params, images_u8, label_size)` function and its
parameters; `device_segmenter(obj)` adapts what a user has:

* the builtin U-Net (`segmenter.NNXSegmenter`): its network, traced;
* the papers' networks (`clade_jax.evaluation.segmenters`): their official protocol split into
  the host steps (the uint8 PIL resizes of UperNet and DRN's multi-scale test; `host_stage`) and
  the device part (network, resizes to the label size, fusion of the scales);
* any other object with `scores(images, label_size=, multiscale=)`: traced when it traces,
  otherwise called back on the host;
* any NumPy `segmentation.Segmenter` (tests, custom networks): called back from the jit.

Label mapping (`label_table`): data set ids -> segmenter classes, -1 for ignored ids (the don't
care class, the unlabelled ids of a protocol), and -2 for ids the segmenter has no class for,
which raise a ValueError naming them when they occur.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clade_jax.evaluation import segmentation

IGNORED = -1  # table value: pixel not counted
UNKNOWN = -2  # table value: the segmenter has no class for this id (an error when it occurs)


class DeviceSegmenter:
    """A segmenter the evaluator can run inside the per-batch jit.

    Args:
      scores: fn(params, images uint8 (N, H, W, 3), label_size (h, w)) -> (N, h, w, K) float32,
        traced. With `host_inputs`, it receives the prepared inputs dict instead of the images.
      params: the network's parameters (a pytree of arrays; replicated on the mesh).
      num_classes: K.
      description: for the JSON.
      host_inputs: optional fn(images uint8 NumPy (n, H, W, 3), label_size) -> dict of NumPy
        arrays with a leading batch axis (PIL resizes of the official protocols).
      program_key: hashable, equal for segmenters whose `scores` trace to the same program
        (e.g. the network's GraphDef and the protocol); default: `scores` itself.
    """

    def __init__(
        self,
        scores: Callable,
        params: Any,
        num_classes: int,
        description: str,
        host_inputs: Callable | None = None,
        program_key: Any = None,
    ):
        self.scores, self.params = scores, params
        self.num_classes, self.description = int(num_classes), description
        self.host_inputs = host_inputs
        self.program_key = scores if program_key is None else program_key


def _resize_scores(scores: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (N, h, w, K) scores to `size` (the old evaluation's rule)."""
    if tuple(scores.shape[1:3]) == tuple(size):
        return scores
    return jax.image.resize(scores, (scores.shape[0], *size, scores.shape[-1]), "bilinear")


def _check_scores(scores: jax.Array, n: int, size, k: int, what: str) -> jax.Array:
    if scores.ndim != 4 or scores.shape[0] != n or scores.shape[-1] != k:
        raise ValueError(f"{what} returned scores of shape {scores.shape}; expected (N, H, W, {k})")
    return _resize_scores(scores, size)


def device_segmenter(seg: Any, *, multiscale: bool = False) -> DeviceSegmenter:
    """Adapts a segmenter object to `DeviceSegmenter` (see the module docstring).

    Args:
      seg: a `DeviceSegmenter`, the builtin `NNXSegmenter`, a paper segmenter from
        `clade_jax.evaluation.segmenters`, or any `segmentation.Segmenter`.
      multiscale: the paper segmenters' multi-scale test protocol.
    """
    if isinstance(seg, DeviceSegmenter):
        return seg
    from clade_jax.evaluation.segmenter import NNXSegmenter

    if isinstance(seg, NNXSegmenter):
        from flax import nnx

        graphdef, k = seg._graphdef, seg.num_classes

        def nnx_scores(params, images, size):
            logits = nnx.merge(graphdef, params)(images)
            return _check_scores(logits, images.shape[0], size, k, "the builtin segmenter")

        return DeviceSegmenter(
            nnx_scores, seg._state, k, "builtin U-Net", program_key=("builtin", graphdef, k)
        )
    from clade_jax.evaluation.segmenters import Segmenter as PaperSegmenter

    if isinstance(seg, PaperSegmenter):
        return _paper_segmenter(seg, multiscale)
    if hasattr(seg, "scores"):
        return _traced_or_callback(seg, multiscale)
    if isinstance(seg, segmentation.Segmenter):
        return _callback_segmenter(seg)
    raise TypeError(f"cannot evaluate with a segmenter of type {type(seg).__name__}")


def _paper_segmenter(seg: Any, multiscale: bool) -> DeviceSegmenter:
    """A `clade_jax.evaluation.segmenters` network with its official protocol, split into the
    host part (the uint8 PIL resizes of UperNet and of DRN's multi-scale test, DeepLab's float64
    BGR mean subtraction) and the device part (network, resizes to the label size, fusion), with
    the same operations in the same order as the segmenter's own `scores`."""
    from flax import nnx

    from clade_jax.evaluation.segmenters import deeplab, drn, upernet
    from clade_jax.evaluation.segmenters.resize import (
        interpolate_bilinear,
        pil_resize_float,
        pil_resize_uint8,
    )

    graphdef, state = nnx.split(seg.net)
    k, name = int(seg.num_classes), seg.name
    ms = "multi-scale" if multiscale else "single-scale"
    host = None
    if name == "upernet101":
        sizes = upernet.IMG_SIZES if multiscale else upernet.IMG_SIZES[:1]

        def host(images, size):
            h, w = images.shape[1:3]
            return {
                f"s{i}": pil_resize_uint8(images, upernet.scaled_size(h, w, s), "bilinear")
                for i, s in enumerate(sizes)
            }

        def scores(params, inputs, size):
            net, total = nnx.merge(graphdef, params), None
            for i in range(len(sizes)):
                logits = net(upernet.normalize(inputs[f"s{i}"]))
                probs = jax.nn.softmax(interpolate_bilinear(logits, tuple(size)), axis=-1)
                part = probs / jnp.float32(len(sizes))
                total = part if total is None else total + part
            return total

    elif name == "deeplabv2":

        def host(images, size):
            return {"x": np.asarray(deeplab.preprocess(images), np.float32)}

        def scores(params, inputs, size):
            base = nnx.merge(graphdef, params)
            x = inputs["x"]
            logits = deeplab.msc_logits(base, x) if multiscale else base(x)
            return jax.nn.softmax(interpolate_bilinear(logits, tuple(size)), axis=-1)

    elif name == "drn_d_105":

        def scale(net, images, size):
            log_probs, _ = net(drn.normalize(images))
            return pil_resize_float(log_probs, tuple(size), "bilinear")

        if multiscale:

            def host(images, size):
                h, w = images.shape[1:3]
                out = {"full": images}
                for i, s in enumerate(drn.MS_SCALES):
                    out[f"s{i}"] = pil_resize_uint8(images, (int(h * s), int(w * s)), "bicubic")
                return out

            def scores(params, inputs, size):
                net = nnx.merge(graphdef, params)
                total = scale(net, inputs["full"], size)
                for i in range(len(drn.MS_SCALES)):
                    total = total + scale(net, inputs[f"s{i}"], size)
                return total

        else:

            def scores(params, images, size):
                return scale(nnx.merge(graphdef, params), images, size)

    else:
        raise TypeError(f"unknown paper segmenter {name!r}")
    key = ("paper", name, graphdef, bool(multiscale), k)
    return DeviceSegmenter(scores, state, k, f"{name} ({ms})", host, program_key=key)


def _traced_or_callback(seg: Any, multiscale: bool) -> DeviceSegmenter:
    """`seg.scores(images, label_size=, multiscale=)`: traced inside the jit if it can be (the
    whole protocol in JAX), otherwise called back on the host (a PIL step in it)."""
    k = int(seg.num_classes)
    name = getattr(seg, "name", type(seg).__name__)
    ms = "multi-scale" if multiscale else "single-scale"

    def traced(params, images, size):
        del params
        out = seg.scores(images, label_size=tuple(size), multiscale=multiscale)
        return _check_scores(jnp.asarray(out), images.shape[0], size, k, name)

    try:
        probe = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.uint8)
        jax.eval_shape(lambda x: traced(None, x, (16, 16)), probe)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):

        def host_scores(images, size):
            return np.asarray(seg.scores(images, label_size=tuple(size), multiscale=multiscale))

        return _callback_segmenter(seg, host_scores, f"{name} ({ms}, host)")
    from clade_jax.evaluation.evaluators.common import program_key

    key = ("traced", program_key(seg), bool(multiscale), k)
    return DeviceSegmenter(traced, {}, k, f"{name} ({ms})", program_key=key)


def _callback_segmenter(seg: Any, fn: Callable | None = None, description=None) -> DeviceSegmenter:
    """A host segmenter called from the jit (`jax.pure_callback`); its scores return to the
    device, where the counting happens."""
    k = int(seg.num_classes)
    fn = fn or (lambda images, size: np.asarray(seg(images)))

    def scores(params, images, size):
        del params
        n, h, w = images.shape[:3]
        # The callback's output size: the segmenter's own (probe-free: at the image size unless
        # it resizes to the label size itself); resized on device afterwards.
        out = jax.ShapeDtypeStruct((n, *size, k), jnp.float32)

        def call(x):
            s = np.asarray(fn(np.asarray(x), tuple(size)), np.float32)
            if s.ndim != 4 or s.shape[0] != n or s.shape[-1] != k:
                raise ValueError(f"segmenter returned shape {s.shape}; expected (N, H, W, {k})")
            if s.shape[1:3] != tuple(size):
                s = segmentation._resize_logits(s, tuple(size)).astype(np.float32)
            return s

        return jax.pure_callback(call, out, images)

    return DeviceSegmenter(scores, {}, k, description or getattr(seg, "description", "callable"))


def _check_size(size: Any) -> tuple[int, int] | None:
    """None, or (h, w) positive ints (the segmenter's input size); anything else is an error."""
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"segmenter_size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"segmenter_size must be positive, got {size!r}")
    return h, w


def label_table(
    num_data_classes: int,
    num_seg_classes: int,
    *,
    dontcare: int | None = None,
    mapping: np.ndarray | None = None,
) -> np.ndarray:
    """Data id -> segmenter class (IGNORED -1, UNKNOWN -2), int32 (num_data_classes,).

    Args:
      num_data_classes: the data set's num_classes (ids in [0, num_data_classes)).
      num_seg_classes: the segmenter's K.
      dontcare: the data set's don't-care id (ignored); None: none.
      mapping: an explicit table (e.g. Cityscapes labelIds -> trainIds, 255 / negative =
        ignored); default: the identity on [0, K), other ids UNKNOWN.
    """
    if mapping is not None:
        mapping = np.asarray(mapping, np.int64)
        table = np.full(num_data_classes, UNKNOWN, np.int32)
        n = min(len(mapping), num_data_classes)
        m = mapping[:n]
        table[:n] = np.where((m < 0) | (m == 255), IGNORED, m)
        if (table >= num_seg_classes).any():
            bad = sorted(set(table[table >= num_seg_classes].tolist()))
            raise ValueError(
                f"the label mapping gives classes {bad[:10]} but the segmenter has "
                f"{num_seg_classes}"
            )
    else:
        ids = np.arange(num_data_classes)
        table = np.where(ids < num_seg_classes, ids, UNKNOWN).astype(np.int32)
    if dontcare is not None and 0 <= dontcare < num_data_classes:
        table[dontcare] = IGNORED
    return table


class SegmentationEvaluator:
    """Confusion matrices of a segmenter on the synthesized (and the real) images.

    Args:
      segmenter: a `DeviceSegmenter` (see `device_segmenter`).
      table: `label_table(...)`: data ids -> segmenter classes.
      metric_ignore: class id left out of the per-class means (`segmentation_metrics`), e.g. the
        don't-care class when the segmenter has a logit for it; None: none.
      real: also score the batch's real images.
      what: name of the data in error messages (the data set and protocol).
      name: the evaluator's name.
      pixel_accuracy: which pixel accuracy `result()["pixel_accuracy"]` is: "labeled" (correct
        / pixels with a class, the segmenters' repositories' rule) or "all" (correct / every
        pixel, the ignored ones counted as errors: the reading of SPADE's published Cityscapes
        accuracy, see `protocols`). Both are in the result ("pixel_accuracy_labeled",
        "pixel_accuracy_all").
      input_size: (h, w): the images (synthesized and real) are resized to it with PIL bicubic
        (bit-exact on device, `segmenters.resize`) before the segmenter, whose scores are then
        taken at the label size as always (e.g. (1024, 2048): Cityscapes outputs upsampled to
        the size DRN was trained at, see `protocols`); None: the images as they are.
    """

    def __init__(
        self,
        segmenter: DeviceSegmenter,
        table: np.ndarray,
        *,
        metric_ignore: int | None = None,
        real: bool = True,
        what: str = "the data",
        name: str = "segmentation",
        pixel_accuracy: str = "labeled",
        input_size: tuple[int, int] | None = None,
    ):
        if pixel_accuracy not in ("labeled", "all"):
            raise ValueError(f"pixel_accuracy must be 'labeled' or 'all', not {pixel_accuracy!r}")
        self.pixel_accuracy = pixel_accuracy
        self.name, self.seg, self.real, self.what = name, segmenter, real, what
        self.table = np.asarray(table, np.int32)
        self.metric_ignore = metric_ignore
        self.staged = segmenter.host_inputs is not None
        self.input_size = _check_size(input_size)
        k = segmenter.num_classes
        self.program_key = ("segmentation", real, segmenter.program_key, k, self.input_size)
        self.conf = np.zeros((k, k), np.int64)
        self.conf_real = np.zeros((k, k), np.int64)
        self.ignored = 0  # pixels of the valid rows whose label is ignored (not in `conf`)

    def reset(self) -> None:
        self.conf = np.zeros_like(self.conf)
        self.conf_real = np.zeros_like(self.conf_real)
        self.ignored = 0

    def device_params(self) -> Any:
        return {"seg": self.seg.params, "table": jnp.asarray(self.table)}

    def _counts(self, params, scores, batch) -> jax.Array:
        k = self.seg.num_classes
        pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # (N, h, w); ties -> first index
        gt = params["table"][batch["label"]]  # (N, h, w) segmenter classes, -1 ignored
        keep = (gt >= 0) & batch["valid"][:, None, None]
        idx = jnp.where(keep, gt * k + pred, k * k)
        counts = jnp.bincount(idx.ravel(), length=k * k + 1)[: k * k]
        return counts.reshape(k, k).astype(jnp.int32)

    def _check_labels(self, labels: np.ndarray, valid: np.ndarray) -> None:
        labels = np.asarray(labels)[np.asarray(valid, bool)]
        if not labels.size:
            return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= len(self.table):
            bad = np.unique(labels[(labels < 0) | (labels >= len(self.table))])
            raise ValueError(
                f"labels {bad[:10].tolist()} of {self.what} are outside [0, {len(self.table)})"
            )
        present = np.bincount(labels.ravel(), minlength=len(self.table)) > 0
        unknown = np.flatnonzero(present & (self.table == UNKNOWN))
        if unknown.size:
            raise ValueError(
                f"labels {unknown[:10].tolist()} of {self.what} are outside the segmenter's "
                f"classes ({self.seg.description}, {self.seg.num_classes} classes): no class to "
                "score them against"
            )

    def _ignored(self, params, batch) -> jax.Array:
        """Pixels of the valid rows whose label maps to IGNORED (the don't-care ids)."""
        gt = params["table"][batch["label"]]
        return ((gt == IGNORED) & batch["valid"][:, None, None]).sum(dtype=jnp.int32)

    def _resized(self, images: jax.Array) -> jax.Array:
        if self.input_size is None:
            return images
        from clade_jax.evaluation.segmenters.resize import pil_resize_uint8_device

        return pil_resize_uint8_device(images, self.input_size, "bicubic")

    def device_fn(self, params, images, batch) -> dict:
        size = tuple(batch["label"].shape[1:3])
        scores = self.seg.scores(params["seg"], self._resized(images), size)
        out = {"fake": self._counts(params, scores, batch)}
        out["ignored"] = self._ignored(params, batch)
        if self.real:
            from clade_jax.evaluation.evaluators.common import float_to_uint8

            real_images = self._resized(float_to_uint8(batch["image"]))
            real = self.seg.scores(params["seg"], real_images, size)
            out["real"] = self._counts(params, real, batch)
        return out

    # Host-prepared inputs (segmenters whose official protocol resizes with PIL).
    def host_stage(self, images: np.ndarray, local: dict) -> dict:
        size = tuple(np.asarray(local["label"]).shape[1:3])

        def prepare(x: np.ndarray) -> dict:
            if self.input_size is not None:
                from clade_jax.evaluation.segmenters.resize import pil_resize_uint8

                x = pil_resize_uint8(np.asarray(x), self.input_size, "bicubic")
            return self.seg.host_inputs(x, size)

        out = {f"fake/{k}": v for k, v in prepare(images).items()}
        if self.real:
            real = segmentation.images_to_uint8(local["image"])
            out.update({f"real/{k}": v for k, v in prepare(real).items()})
        return out

    def staged_fn(self, params, inputs, batch) -> dict:
        size = tuple(batch["label"].shape[1:3])
        part = lambda p: {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith(p)}
        out = {
            "fake": self._counts(
                params, self.seg.scores(params["seg"], part("fake/"), size), batch
            ),
            "ignored": self._ignored(params, batch),
        }
        if self.real:
            scores = self.seg.scores(params["seg"], part("real/"), size)
            out["real"] = self._counts(params, scores, batch)
        return out

    def check_batch(self, local: dict) -> None:
        """Host check of a local batch's labels (before it goes to the device)."""
        self._check_labels(local["label"], local["valid"])

    def update(self, outputs: dict) -> None:
        self.conf += np.asarray(outputs["fake"], np.int64)
        self.ignored += int(outputs["ignored"])
        if self.real:
            self.conf_real += np.asarray(outputs["real"], np.int64)

    def result(self) -> dict[str, Any]:
        scores = segmentation.segmentation_metrics(self.conf, self.metric_ignore)
        labeled = scores["pixel_accuracy"]
        every = self._accuracy_all(self.conf)
        out = {
            "miou": scores["miou"],
            "pixel_accuracy": every if self.pixel_accuracy == "all" else labeled,
            "pixel_accuracy_labeled": labeled,
            "pixel_accuracy_all": every,
            "mean_accuracy": scores["mean_accuracy"],
            "fw_iou": scores["fw_iou"],
            "per_class_iou": scores["per_class_iou"],
            "confusion": self.conf.copy(),
        }
        if self.real:
            real = segmentation.segmentation_metrics(self.conf_real, self.metric_ignore)
            real_all = self._accuracy_all(self.conf_real)
            out.update(
                real_miou=real["miou"],
                real_pixel_accuracy=real_all
                if self.pixel_accuracy == "all"
                else real["pixel_accuracy"],
                real_confusion=self.conf_real.copy(),
            )
        return out

    def _accuracy_all(self, conf: np.ndarray) -> float:
        """Correct pixels / every pixel of the valid rows (ignored labels count as errors)."""
        total = int(conf.sum()) + self.ignored
        return float(np.trace(conf) / total) if total else float("nan")
