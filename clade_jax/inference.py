"""Inference on a trained (or converted) run: restore it, run it, quantize its images.

* `load_inference_model(workdir)` restores a training workdir or one written by
  `python -m clade_jax.convert` (EMA generator when the run kept one) as an `InferenceModel`: the
  generator (spectral norm folded) and the VAE encoder as one jit-compiled function in eval mode.
* `sample_keys(seed, k, n)`: the latent-code keys of sample k (the same for every label map).
* `pad_batch(x, size)`: a short last batch padded to the compiled size (its last row repeated).
* `to_uint8` (host) / `to_uint8_device` (jit-able): the one quantization of images in [-1, 1]
  to uint8, written once for both (`_quantize`). Synthesized images are truncated as the official
  `util.tensor2im` (FID on saved images then matches the official test script's PNGs);
  `rounding="nearest"` gives back exactly the uint8 a real photo was read from (the pipeline's
  `x / 127.5 - 1`), which truncation would not (254.99998 -> 254). Both are needed: parity pins
  the first for synthesized images, the second makes real photos round-trip bit-exact.

Shared by `clade_jax.synthesize` (files in, PNGs out), `clade_jax.evaluation` and `clade_jax.paint`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clade_jax.layers.conv import fold_spectral_norm
from clade_jax.models.encoder import reparameterize

ROUNDINGS = ("truncate", "nearest")


def _quantize(xp, images, rounding: str):
    """The two rules, written once for NumPy (`xp=np`) and jax.numpy (`xp=jnp`): the same float32
    operations in the same order, so host and device give the same bytes."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if images.dtype == xp.uint8:
        return images
    x = images.astype(xp.float32) + 1.0
    if rounding == "nearest":
        return xp.clip(xp.rint(x * 127.5), 0, 255).astype(xp.uint8)
    return xp.clip(x / 2.0 * 255.0, 0, 255).astype(xp.uint8)


def to_uint8(images: np.ndarray | jax.Array, rounding: str = "truncate") -> np.ndarray:
    """Images in [-1, 1] -> uint8 (NumPy, on the host); uint8 images pass through unchanged.

    Args:
      images: (..., 3) float in [-1, 1], or uint8.
      rounding: "truncate": `clip((x + 1) / 2 * 255, 0, 255)` truncated, the official
        `util.tensor2im` (synthesized images: saved PNGs and FID match the official test);
        "nearest": `clip(rint((x + 1) * 127.5), 0, 255)`, the inverse of the pipeline's
        `u8 / 127.5 - 1` (real photos come back bit-exact).

    Returns:
      uint8 array of the same shape.
    """
    return _quantize(np, np.asarray(images), rounding)


def to_uint8_device(images: jax.Array, rounding: str = "truncate") -> jax.Array:
    """`to_uint8` in jax.numpy: the same rule and bytes, on device and inside `jit`."""
    return _quantize(jnp, jnp.asarray(images), rounding)


class InferenceModel:
    """A workdir's generator (and VAE encoder) as one jit-compiled function, in eval mode.

    Args:
      generator: the generator (eval mode), as from `checkpoint.load_models`.
      encoder: the VAE encoder or None.

    Attributes:
      use_vae, use_instance, use_icpe, z_dim, output_size, num_classes: the generator's.
    """

    def __init__(self, generator: nnx.Module, encoder: nnx.Module | None = None):
        self.use_vae = bool(generator.use_vae)
        self.use_instance = bool(generator.use_instance)
        self.use_icpe = bool(generator.use_icpe)
        self.z_dim = int(generator.z_dim)
        self.output_size = tuple(generator.output_size)
        self.num_classes = int(generator.num_classes)
        self.has_encoder = encoder is not None
        # A copy with spectral norm folded (W / sigma once, not per call).
        g_def, self._g_state = nnx.split(fold_spectral_norm(generator))
        e_def, self._e_state = nnx.split(encoder) if encoder is not None else (None, None)
        self._graphdefs = (g_def, e_def)  # the program's structure (evaluation's cache key)
        z_dim = self.z_dim

        def run(g_state, e_state, labels, instance, icpe, style, keys):
            g = nnx.merge(g_def, g_state)
            z = None
            if style is not None:  # posterior of the style image, one key per row
                mu, logvar = nnx.merge(e_def, e_state)(style)
                z = jax.vmap(reparameterize)(mu, logvar, keys)
            elif g.use_vae:  # prior
                z = jax.vmap(lambda k: jax.random.normal(k, (z_dim,), jnp.float32))(keys)
            return g(labels, z=z, instance=instance, icpe=icpe)

        self._run = jax.jit(run)

    def __call__(
        self,
        labels: np.ndarray,
        *,
        instance: np.ndarray | None = None,
        icpe: np.ndarray | None = None,
        style: np.ndarray | None = None,
        keys: jax.Array | None = None,
    ) -> np.ndarray:
        """Synthesize one batch.

        Args:
          labels: (N, H, W) int32 class ids, already validated, at `output_size`.
          instance: (N, H, W) int instance ids (models with instance maps).
          icpe: (N, H, W, 2) float32 ICPE maps (CLADE-ICPE models).
          style: (N, H, W, 3) float32 images in [-1, 1] to encode (VAE models); z is drawn from
            the encoder's posterior with `keys`.
          keys: (N,) PRNG keys, one per row; required by VAE models (z from the prior or the
            style posterior), ignored otherwise.

        Returns:
          (N, H, W, 3) float32 images in [-1, 1] (NumPy).
        """
        if style is not None and not self.has_encoder:
            raise ValueError("style-guided synthesis needs a model with the VAE encoder")
        if self.use_vae and keys is None:
            raise ValueError("a VAE model needs keys= (one PRNG key per row) to draw z")
        if not self.use_vae:
            keys = None
        labels = np.asarray(labels, np.int32)
        if instance is not None and self.use_instance:
            instance = np.asarray(instance, np.int32)
        else:
            instance = None
        icpe = None if icpe is None or not self.use_icpe else np.asarray(icpe, np.float32)
        out = self._run(self._g_state, self._e_state, labels, instance, icpe, style, keys)
        return np.asarray(out)


def load_inference_model(workdir: str, step: int | None = None, *, use_ema: bool = True):
    """Restore a workdir for inference.

    Args:
      workdir: a training workdir or one written by `python -m clade_jax.convert`.
      step: checkpoint step (default: the latest).
      use_ema: use the EMA generator when the run kept one.

    Returns:
      (config, `InferenceModel`, step).
    """
    from clade_jax.training.checkpoint import load_models

    config, g, e, step = load_models(workdir, step, use_ema=use_ema)
    return config, InferenceModel(g, e), step


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """(n, ...) -> (size, ...), n <= size, by repeating the last row: the one way batches are
    padded to a compiled shape (synthesis, FID features); callers drop the extra rows."""
    x = np.asarray(x)
    if len(x) > size:
        raise ValueError(f"a batch of {len(x)} rows does not fit {size}")
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def sample_keys(seed: int, sample: int, n: int) -> jax.Array:
    """(n,) copies of the key of sample `sample`: `fold_in(PRNGKey(seed), sample)`."""
    key = jax.random.fold_in(jax.random.key(seed), sample)
    return jnp.stack([key] * n)
