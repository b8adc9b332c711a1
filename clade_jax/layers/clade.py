"""CLADE: class-adaptive normalization (Tan et al.), with the ICPE and instance-edge options.

`ClassAffine` holds two (num_classes, C) tables and modulates a normalized activation by a gather:
`y = x_hat * scale[label] + shift[label]` (the official layer has no "1 +", unlike SPADE).

`CLADE` = `ParamFreeNorm` + `ClassAffine`, plus two options of the official code:

* ICPE (`icpe=True`, CLADE's `--add_dist`): a 2-channel intra-class positional map P (see
  `labels.icpe_offsets`) modulates the gathered tables through two 1x1 convs 2 -> 1:
  `scale *= 1 + conv_s(P)`, `shift *= 1 + conv_b(P)`.
* instance edges (`instance_edge=True`, the official `norm_mode=clade` without `--no_instance`): a
  learned 1x1 conv (1 -> 1) of the edge map is appended as one extra output channel, so the next
  convolution sees C + 1 channels (the paper's appendix A).

Out-of-range labels: JAX clamps out-of-bounds gathers, so a label 255 would silently borrow the
last class's parameters. The gather here uses `mode="fill"` with NaN, which turns any such pixel
into NaN; host code (`labels.check_labels`) raises before that can happen, and the trainer stops
on NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax.layers.conv import Conv2d, after, cpu_fast_path
from clade_jax.layers.labels import resize_nearest
from clade_jax.layers.normalization import ParamFreeNorm


def gather_classes(table: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """table (K, C), labels (N, H, W) int -> (N, H, W, C); NaN where a label is outside [0, K).

    The cast to unsigned makes negative labels out of range too (`take` would otherwise wrap -1
    to the last row, NumPy-style).
    """
    return jnp.take(table, labels.astype(jnp.uint32), axis=0, mode="fill", fill_value=jnp.nan)


def modulate(x_hat, tables, labels, factors=None):
    """`x_hat * scale[labels] + shift[labels]`, the tables optionally times ICPE's factors.

    x_hat (N, H, W, C); tables: (scale, shift), each (K, C); labels (N, H, W) int; factors: None
    or (scale factor, shift factor), each (N, H, W, 1). Returns float32 (N, H, W, C).
    """
    scale, shift = (gather_classes(t, labels) for t in tables)  # (N, H, W, C) each
    if factors is not None:
        scale, shift = scale * factors[0], shift * factors[1]
    return x_hat * scale + shift


@jax.custom_vjp
def _modulate_late_gathers(x_hat, tables, labels, factors):
    """`modulate` whose backward gathers the per-pixel tables anew, once the output gradient
    exists, instead of keeping the forward's (N, H, W, C) gathers alive for the backward pass:
    two activations' worth of memory per layer (261 MB of the full-size CLADE step, batch 1),
    for two gathers more per layer. Gradients as autodiff's (the same vjp, re-run)."""
    return modulate(x_hat, tables, labels, factors)


def _modulate_fwd(x_hat, tables, labels, factors):
    return modulate(x_hat, tables, labels, factors), (x_hat, tables, labels, factors)


def _modulate_bwd(residuals, g):
    x_hat, tables, labels, factors = residuals
    tables = tuple(after(t, g) for t in tables)  # see `conv.after`
    return jax.vjp(modulate, x_hat, tables, labels, factors)[1](g)


_modulate_late_gathers.defvjp(_modulate_fwd, _modulate_bwd)


class ClassAffine(nnx.Module):
    """The (num_classes, C) class-wise affine tables of CLADE.

    Init as the official `ClassAffine`: scale ~ U[0, 1), shift = 0 (the official
    `init_weights` does not touch this module).
    """

    def __init__(self, num_classes: int, num_features: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(jax.random.uniform(rngs.params(), (num_classes, num_features)))
        self.shift = nnx.Param(jnp.zeros((num_classes, num_features), jnp.float32))

    def __call__(self, x_hat: jnp.ndarray, labels: jnp.ndarray, factors=None) -> jnp.ndarray:
        """`modulate` with these tables (on CPU with the backward's late gathers), in x_hat's
        dtype; factors: None or ICPE's (N, H, W, 1) scale and shift factors."""
        tables = (self.scale[...], self.shift[...])
        apply = _modulate_late_gathers if cpu_fast_path() else modulate
        return apply(x_hat, tables, labels, factors).astype(x_hat.dtype)


class CLADE(nnx.Module):
    """Class-adaptive normalization.

    Args:
      num_features: channels C of the normalized input.
      num_classes: rows of the class tables (count the don't-care class if the data has one).
      norm: the parameter-free part ("batch", "instance", "switchable", "none").
      icpe: add the ICPE modulation (two 1x1 convs 2 -> 1).
      instance_edge: append the 1x1-transformed instance-edge channel (output has C + 1 channels).
      dtype: compute dtype of the 1x1 convs.
      norm_kwargs: extra arguments of `ParamFreeNorm` (momentum, eps, switchable_batch).

    Call: `y = clade(x, labels, icpe=P, edges=E)` with x (N, H, W, C), labels (N, h, w) int,
    P (N, h, w, 2) float, E (N, h, w) float; maps are nearest-resized to (H, W) with PyTorch's rule
    (a no-op when the caller passes them at x's resolution, as the generators do).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        norm: str = "batch",
        *,
        icpe: bool = False,
        instance_edge: bool = False,
        dtype=jnp.float32,
        norm_kwargs: dict | None = None,
        rngs: nnx.Rngs,
    ):
        self.param_free_norm = ParamFreeNorm(num_features, norm, **(norm_kwargs or {}))
        self.class_affine = ClassAffine(num_classes, num_features, rngs=rngs)
        self.use_icpe = icpe
        self.instance_edge = instance_edge
        if icpe:
            # The official class initialises these to zero, but `init_weights` then re-initialises
            # every Conv (xavier 0.02, zero bias); we match the trained models' actual init.
            self.icpe_scale = Conv2d(2, 1, 1, dtype=dtype, rngs=rngs)
            self.icpe_shift = Conv2d(2, 1, 1, dtype=dtype, rngs=rngs)
        if instance_edge:
            self.inst_conv = Conv2d(1, 1, 1, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x: jnp.ndarray,
        labels: jnp.ndarray,
        *,
        icpe: jnp.ndarray | None = None,
        edges: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        size = x.shape[1:3]
        x_hat = self.param_free_norm(x)
        labels = resize_nearest(labels, size)
        factors = None
        if self.use_icpe:
            if icpe is None:
                raise ValueError("this CLADE layer was built with icpe=True: pass icpe=(N,H,W,2)")
            p = resize_nearest(icpe, size)
            factors = (
                1 + self.icpe_scale(p).astype(jnp.float32),  # (N, H, W, 1) each
                1 + self.icpe_shift(p).astype(jnp.float32),
            )
        y = self.class_affine(x_hat, labels, factors).astype(x.dtype)
        if self.instance_edge:
            if edges is None:
                raise ValueError("this CLADE layer was built with instance_edge=True: pass edges")
            e = resize_nearest(edges, size)[..., None].astype(x.dtype)
            y = jnp.concatenate([y, self.inst_conv(e).astype(x.dtype)], axis=-1)
        return y
