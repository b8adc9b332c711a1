"""FID evaluator: Inception pool features on device, float64 statistics streamed on the host.

Per batch the device part runs pytorch-fid's Inception (`clade_jax.evaluation.fid`) on the uint8
images inside the runner's jit and returns the (B, 2048) float32 pool features, gathered to every
process (8 KB per image), with the batch's `valid` mask. The host keeps only running float64 sums
(`RunningStatistics`: count, sum of features, sum of outer products, about a shift taken from the
first batch), so memory does not grow with the number of images, and the mean and covariance are
those of pytorch-fid (`np.cov`, unbiased) up to float64 rounding.

Reference statistics (the real images a protocol compares with) are computed with the same
evaluator over a pass of the reference images and cached as `fid.statistics_path(stem, count,
resolution)` (the format of `fid.cached_statistics`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.evaluation import fid as fid_lib


class RunningStatistics:
    """Mean and covariance of feature rows accumulated batch by batch in float64.

    `add(features)` with (n, D) rows; `mean_and_covariance()` equals
    `fid.statistics(all rows)` to float64 rounding (the sums are taken about the first batch's
    mean, which keeps the usual one-pass cancellation out of the covariance).

    Rows are buffered (about `block` of them: 4 MB at 256 x 2048 float64) and added to the
    (D, D) sum of outer products a block at a time: one matrix product per block instead of one
    per batch, each of which reads and writes the whole 32 MB (D, D) sum (at batch 8 that pass,
    not the arithmetic, took ~15 ms per image on this project's 2-core CPU).
    """

    def __init__(self, block: int = 256):
        self.count, self.block = 0, int(block)
        self.shift = self.total = self.outer = None
        self._rows: list[np.ndarray] = []
        self._buffered = 0

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        if not len(f):
            return
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        x = f - self.shift
        self.count += len(f)
        self.total += x.sum(axis=0)
        self._rows.append(x)
        self._buffered += len(x)
        if self._buffered >= self.block:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            x = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
            self.outer += x.T @ x
            self._rows, self._buffered = [], 0

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) float64; sigma unbiased as `np.cov`."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        self._flush()
        m = self.total / self.count
        sigma = (self.outer - self.count * np.outer(m, m)) / (self.count - 1)
        return self.shift + m, sigma


def inception_features(weights: Any = None) -> tuple[Callable, Any]:
    """pytorch-fid's Inception as a device feature function.

    Args:
      weights: as `fid.InceptionFeatures` (None: the cached converted file).

    Returns:
      (fn(params, images uint8 (B, H, W, 3)) -> (B, 2048) float32, params).
    """
    from clade_jax import weights as pretrained

    if weights is None:
        weights = pretrained.inception_path()
    path = None
    if not hasattr(weights, "keys"):
        path = os.path.realpath(weights)
        stamp = os.stat(path).st_mtime_ns if os.path.exists(path) else None
        if (path, stamp) in _INCEPTION:  # loaded before in this process (periodic evaluation)
            return _INCEPTION[(path, stamp)]
        weights = pretrained.load_inception_state(weights)
    model = nnx.eval_shape(lambda: fid_lib.InceptionV3(rngs=nnx.Rngs(0)))
    fid_lib.load_pytorch_fid_state(model, weights)
    graphdef, state = nnx.split(model)

    def fn(params, images):
        return nnx.merge(graphdef, params)(fid_lib.preprocess(images))

    fn.program_key = ("inception", graphdef)  # the same program for any weights
    if path is not None:
        _INCEPTION.clear()
        _INCEPTION[(path, stamp)] = (fn, state)
    return fn, state


_INCEPTION: dict = {}  # (weights file, mtime) -> the last (fn, params) loaded


def host_features(extractor: Callable[[np.ndarray], np.ndarray], dim: int) -> tuple[Callable, Any]:
    """A NumPy feature extractor (uint8 images -> (N, dim)) as a device function (a host
    callback; for tests and custom extractors)."""

    def fn(params, images):
        del params
        shape = jax.ShapeDtypeStruct((images.shape[0], dim), jnp.float32)
        return jax.pure_callback(
            lambda x: np.asarray(extractor(np.asarray(x)), np.float32), shape, images
        )

    return fn, {}


class FidEvaluator:
    """Streams the feature statistics of the images of a pass.

    Args:
      features: (fn(params, images_u8) -> (B, D) float32, params), e.g. `inception_features()`.
      name: the evaluator's name (key of its outputs).
      real: take the batch's real images instead of the pass's images (the reference statistics
        of the evaluated examples, in the same pass as the synthesized ones).
    """

    def __init__(self, features: tuple[Callable, Any], name: str = "fid", *, real: bool = False):
        self.name, self.real = name, real
        self._fn, self._params = features
        self.stats = RunningStatistics()
        from clade_jax.evaluation.evaluators.common import program_key

        self.program_key = ("fid", real, program_key(self._fn))

    def device_params(self) -> Any:
        return self._params

    def device_fn(self, params: Any, images: jax.Array, batch: dict) -> dict:
        if self.real:
            from clade_jax.evaluation.evaluators.common import float_to_uint8

            images = float_to_uint8(batch["image"])
        return {"features": self._fn(params, images).astype(jnp.float32), "valid": batch["valid"]}

    def update(self, outputs: dict) -> None:
        self.stats.add(np.asarray(outputs["features"])[np.asarray(outputs["valid"], bool)])

    def reset(self) -> None:
        self.stats = RunningStatistics()

    def result(self) -> dict[str, Any]:
        mu, sigma = self.stats.mean_and_covariance()
        return {"mu": mu, "sigma": sigma, "count": self.stats.count}


def load_statistics(path: Path, count: int, resolution: tuple[int, int]):
    """Cached (mu, sigma) of `path`, or None when there is no file; a file that records another
    count or resolution is an error naming it."""
    if not path.is_file():
        return None
    with np.load(path) as z:
        if int(z["count"]) == count and tuple(z["resolution"]) == tuple(resolution):
            return z["mu"], z["sigma"]
    raise ValueError(f"{path}: cached statistics do not match count/resolution; delete it")


def save_statistics(path: Path, mu, sigma, count: int, resolution: tuple[int, int]) -> None:
    """Writes the statistics atomically (the format of `fid.cached_statistics`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        tmp = Path(f.name)
    try:
        np.savez(tmp, mu=mu, sigma=sigma, count=count, resolution=np.asarray(resolution))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
