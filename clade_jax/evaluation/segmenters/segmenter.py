"""`Segmenter`: a converted network plus its official test-time protocol.

`seg.scores(images, label_size=(h, w), multiscale=False)` takes uint8 RGB images (N, H, W, 3)
and returns (N, h, w, K) float32 scores equal to the official protocol's (the fixtures'
`output/{single_scale,multi_scale}/scores`, NCHW there):

    network     single scale                 multi scale                       scores are
    upernet101  imgSizes (300,)              mean of softmax over 5 imgSizes   probabilities
    deeplabv2   base(x)                      max of logits over 1, 0.5, 0.75   probabilities
    drn_d_105   model(x)                     sum over 6 scales                 log-probabilities

(each network module's docstring has the full protocol and its source lines). The whole
protocol is one pure function of (state, uint8 images), `scores_fn(label_size, multiscale)`,
that `scores` jit-compiles and an evaluator can compose into its own compiled, sharded step:
the network, the official uint8 PIL resizes (UperNet's BILINEAR, DRN's multi-scale BICUBIC;
reproduced in fixed point by `resize.pil_resize_uint8_device`, see its caveat), DeepLab's float64
mean subtraction (a lookup table), the resizes to the label size and the fusion all run on the
device, so only what the caller reduces leaves it. `scores` runs the same code with the uint8
resizes done by PIL on the host, as the official code does (the reference path).
`predict` is the argmax (first maximum on ties).

`features(x)` runs the bare network on an already preprocessed NHWC float32 input and returns
every hooked official submodule output by its official name (`encoder.layer4`, `base.aspp.c0`,
...), NHWC; used by the parity tests, handy for debugging converted weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.evaluation.segmenters import deeplab, drn, upernet
from clade_jax.evaluation.segmenters.resize import (
    interpolate_bilinear,
    pil_resize_float,
    pil_resize_uint8,
    pil_resize_uint8_device,
)

__all__ = ["DRNSegmenter", "DeepLabSegmenter", "Segmenter", "UperNetSegmenter"]


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 RGB (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    return images


def _check_label_size(label_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in label_size)
    except (TypeError, ValueError):
        raise ValueError(f"label_size must be (h, w), got {label_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"label_size must be positive, got {label_size!r}")
    return h, w


class Segmenter:
    """Base: holds the network split into graphdef + state, and the jitted bare forward."""

    name = "?"

    def __init__(self, net: nnx.Module):
        self.net = net
        self.num_classes = int(net.num_classes)
        self._graphdef, self._state = nnx.split(net)

    def _merge(self, state) -> nnx.Module:
        return nnx.merge(self._graphdef, state)

    @functools.cached_property
    def _features(self):
        def run(state, x):
            taps: dict = {}
            self._merge(state)(x, taps)
            return taps

        return jax.jit(run)

    def features(self, x) -> dict[str, jax.Array]:
        """Official submodule outputs {torch module name: NHWC array} for a preprocessed input."""
        return self._features(self._state, jnp.asarray(x, jnp.float32))

    @functools.cached_property
    def _forward(self):
        return jax.jit(lambda state, x: self._merge(state)(x))

    def forward(self, x):
        """The bare network's output for a preprocessed NHWC input (jitted): UperNet logits at
        1/4, DeepLab base logits at 1/8, DRN (log_probs at 8 x 1/8, logits at 1/8)."""
        return self._forward(self._state, jnp.asarray(x, jnp.float32))

    @property
    def state(self) -> nnx.State:
        """The network's variables (pass to `scores_fn`'s function; shard or replicate it)."""
        return self._state

    def scores_fn(self, label_size, multiscale: bool = False):
        """The protocol as a pure function `(state, images_u8) -> scores`, jit-able and
        composable into a larger compiled (sharded) evaluation step; everything, the PIL
        resizes included (bit-exact, `resize.pil_resize_uint8_device`), runs on the device.

        Args:
          label_size: (h, w) of the scores.
          multiscale: the official multi-scale protocol instead of the single-scale one.
        """
        label_size = _check_label_size(label_size)
        return functools.partial(
            self._protocol,
            label_size=label_size,
            multiscale=bool(multiscale),
            resize_u8=pil_resize_uint8_device,
        )

    def _protocol(self, state, images_u8, *, label_size, multiscale, resize_u8):
        raise NotImplementedError

    def scores(self, images, label_size, multiscale: bool = False) -> jax.Array:
        """uint8 RGB (N, H, W, 3) -> (N, h, w, num_classes) float32 official scores.

        Runs `scores_fn`'s code with its per-scale pieces jit-compiled (each compiled once per
        shape and shared with `scale_probs` & co.) and the uint8 image resizes done by PIL on
        the host, exactly as the official code.
        """
        images, label_size = _check_images(images), _check_label_size(label_size)
        return self._protocol(
            self._state,
            images,
            label_size=label_size,
            multiscale=bool(multiscale),
            resize_u8=pil_resize_uint8,
        )

    def predict(self, images, label_size, multiscale: bool = False) -> jax.Array:
        """(N, h, w) int32 class predictions: argmax of `scores` (first maximum on ties)."""
        return jnp.argmax(self.scores(images, label_size, multiscale), axis=-1).astype(jnp.int32)


_preprocess = jax.jit(deeplab.preprocess_device)


class UperNetSegmenter(Segmenter):
    """mit-semseg UperNet101 protocol (see `upernet.py`): scores are probabilities."""

    name = "upernet101"

    def _scale_probs(self, state, resized_u8, label_size):
        logits = self._merge(state)(upernet.normalize(resized_u8))
        return jax.nn.softmax(interpolate_bilinear(logits, label_size), axis=-1)

    @functools.cached_property
    def _probs(self):
        return jax.jit(self._scale_probs, static_argnums=2)

    def scale_probs(self, images_resized_u8, label_size) -> jax.Array:
        """Softmax at the label size for images already resized for one imgSizes entry."""
        return self._probs(self._state, jnp.asarray(images_resized_u8), label_size)

    def _protocol(self, state, images_u8, *, label_size, multiscale, resize_u8):
        sizes = upernet.IMG_SIZES if multiscale else upernet.IMG_SIZES[:1]
        h, w = images_u8.shape[1:3]
        total = None
        for s in sizes:  # accumulated in order, each divided first, as eval.py
            resized = resize_u8(images_u8, upernet.scaled_size(h, w, s), "bilinear")
            part = self._probs(state, resized, label_size) / jnp.float32(len(sizes))
            total = part if total is None else total + part
        return total


class DeepLabSegmenter(Segmenter):
    """kazuto1011 DeepLabV2 (MSC) protocol (see `deeplab.py`): scores are probabilities."""

    name = "deeplabv2"

    def _from_input(self, state, x, label_size, multiscale):
        base = self._merge(state)
        logits = deeplab.msc_logits(base, x) if multiscale else base(x)
        return jax.nn.softmax(interpolate_bilinear(logits, label_size), axis=-1)

    def _protocol(self, state, images_u8, *, label_size, multiscale, resize_u8):
        x = _preprocess(jnp.asarray(images_u8))
        return self._scores_from_input(state, x, label_size, multiscale)

    @functools.cached_property
    def _scores_from_input(self):
        return jax.jit(self._from_input, static_argnums=(2, 3))

    def scores_from_input(self, x, label_size, multiscale: bool = False) -> jax.Array:
        """Scores for an already preprocessed (BGR - mean) float32 NHWC input."""
        label_size = _check_label_size(label_size)
        x = jnp.asarray(x, jnp.float32)
        return self._scores_from_input(self._state, x, label_size, bool(multiscale))

    @functools.cached_property
    def _msc_features(self):
        def run(state, x):
            taps: dict = {}
            deeplab.msc_logits(self._merge(state), x, taps=taps)
            return taps

        return jax.jit(run)

    def msc_features(self, x) -> dict[str, jax.Array]:
        """Taps of the MSC forward: the full-scale ones, `scale<p>/<name>` and `input_scale<p>`."""
        return self._msc_features(self._state, jnp.asarray(x, jnp.float32))

    @functools.cached_property
    def _msc_logits(self):
        return jax.jit(lambda state, x: deeplab.msc_logits(self._merge(state), x))

    def msc_logits(self, x) -> jax.Array:
        """The MSC model's logits (max over scales, at 1/8) for a preprocessed input."""
        return self._msc_logits(self._state, jnp.asarray(x, jnp.float32))


class DRNSegmenter(Segmenter):
    """fyu/drn DRN-D-105 protocol (see `drn.py`): scores are log-probabilities."""

    name = "drn_d_105"

    @functools.cached_property
    def _scale_log_probs(self):
        def run(state, images_u8, label_size):
            log_probs, _ = self._merge(state)(drn.normalize(jnp.asarray(images_u8)))
            return pil_resize_float(log_probs, label_size, "bilinear")  # resize_4d_tensor

        return jax.jit(run, static_argnums=2)

    def scale_log_probs(self, images_u8, label_size) -> jax.Array:
        """One scale's log-probabilities resized to the label size (resize_4d_tensor)."""
        return self._scale_log_probs(self._state, jnp.asarray(images_u8), label_size)

    def _protocol(self, state, images_u8, *, label_size, multiscale, resize_u8):
        total = self._scale_log_probs(state, images_u8, label_size)
        if multiscale:
            h, w = images_u8.shape[1:3]
            for s in drn.MS_SCALES:  # [x] + scales, summed in that order as test_ms()
                resized = resize_u8(images_u8, (int(h * s), int(w * s)), "bicubic")
                total = total + self._scale_log_probs(state, resized, label_size)
        return total
