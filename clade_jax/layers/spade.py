"""SPADE: spatially-adaptive normalization (Park et al., CVPR 2019).

`y = x_hat * (1 + gamma(m)) + beta(m)` where m = ReLU(conv3x3(one_hot(labels) [+ edges])) is the
128-channel shared modulation feature (128 is hard-coded in the official code) and gamma, beta are
3x3 convs to C channels. The one-hot map is built here, at the layer's resolution, from the integer
label map; labels outside [0, num_classes) produce NaN (one_hot would silently give a zero row).
On CPU the backward pass recomputes m instead of keeping it (`_modulate_recomputing`), and
`windows=True` takes gamma and beta from per-class tables where the label window is uniform
(`clade_jax.layers.spade_windows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from clade_jax.layers import spade_windows
from clade_jax.layers.conv import Conv2d, cpu_fast_path
from clade_jax.layers.labels import resize_nearest
from clade_jax.layers.normalization import ParamFreeNorm


def semantic_input(
    labels: jnp.ndarray, num_classes: int, edges: jnp.ndarray | None = None, dtype=jnp.float32
) -> jnp.ndarray:
    """One-hot (N, H, W, K) of `labels` (N, H, W), with the edge map appended as channel K if given.

    This is the official generator / discriminator input (`preprocess_input`), NHWC.
    """
    x = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    if edges is not None:
        x = jnp.concatenate([x, edges[..., None].astype(dtype)], axis=-1)
    return x


def nan_where_invalid(y: jnp.ndarray, labels: jnp.ndarray, num_classes: int) -> jnp.ndarray:
    """Poison pixels whose label is outside [0, num_classes) with NaN (y is (N, H, W, C))."""
    bad = (labels < 0) | (labels >= num_classes)
    return jnp.where(bad[..., None], jnp.nan, y)


class SPADE(nnx.Module):
    """Spatially-adaptive normalization.

    Args:
      num_features: channels C of the normalized input.
      num_classes: one-hot channels (count the don't-care class if the data has one).
      norm: the parameter-free part ("batch", "instance", "switchable", "none").
      instance_edge: the modulation net also sees the instance-edge map (one more input channel).
      hidden: width of the shared modulation conv (128 in the papers).
      kernel_size: kernel of the modulation convs (3 in the papers).
      dtype: compute dtype.
      norm_kwargs: extra arguments of `ParamFreeNorm`.
      windows: on the CPU fast path and grids of >= `spade_windows.MIN_PIXELS` pixels, compute
        gamma and beta from per-class tables where the (2k-1)^2 label window is uniform and run
        the convolutions only at the other pixels (`clade_jax.layers.spade_windows`; equal up
        to float rounding). Off by default: it pays on piecewise-constant label maps and costs
        where most pixels are boundaries (numbers in that module).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        norm: str = "batch",
        *,
        instance_edge: bool = False,
        hidden: int = 128,
        kernel_size: int = 3,
        dtype=jnp.float32,
        norm_kwargs: dict | None = None,
        windows: bool = False,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        self.windows = windows
        self.instance_edge = instance_edge
        self.dtype = dtype
        in_ch = num_classes + (1 if instance_edge else 0)
        pad = kernel_size // 2
        conv = lambda i, o: Conv2d(i, o, kernel_size, padding=pad, dtype=dtype, rngs=rngs)
        self.param_free_norm = ParamFreeNorm(num_features, norm, **(norm_kwargs or {}))
        self.mlp_shared = conv(in_ch, hidden)
        self.mlp_gamma = conv(hidden, num_features)
        self.mlp_beta = conv(hidden, num_features)

    def __call__(
        self, x: jnp.ndarray, labels: jnp.ndarray, *, edges: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """x (N, H, W, C), labels (N, h, w) int, edges (N, h, w) -> (N, H, W, C)."""
        size = x.shape[1:3]
        x_hat = self.param_free_norm(x)
        labels = resize_nearest(labels, size)
        if self.instance_edge:
            if edges is None:
                raise ValueError("this SPADE layer was built with instance_edge=True: pass edges")
            edges = resize_nearest(edges, size)
        rest = edges[..., None] if self.instance_edge else None
        if not cpu_fast_path():
            modulate = _modulate
        elif self.windows and size[0] * size[1] >= spade_windows.MIN_PIXELS:
            modulate = _modulate_windowed_recomputing
        else:
            modulate = _modulate_recomputing
        y = modulate(self, x_hat, labels, rest)
        return nan_where_invalid(y, labels, self.num_classes).astype(x.dtype)


def _modulate(spade: SPADE, x_hat, labels, rest):
    """x_hat * (1 + gamma(actv)) + beta(actv), actv = ReLU(mlp_shared(one_hot(labels) [+ rest]))
    (without the one-hot tensor: Conv2d's labels=).

    Measured and not adopted (2026-12-03, benchmarks/RESULTS.md "SPADE fused gamma / beta"):
    gamma and beta as one convolution to 2C channels (kernels side by side). Alone, fwd + bwd,
    it took 0.76-0.96x the two convolutions' time on 64x64-256x256 grids, but the full-size
    training step 0.95-1.00x (within this machine's spread) with 35 MB more temporaries.
    """
    actv = jax.nn.relu(spade.mlp_shared(rest, labels=labels, num_classes=spade.num_classes))
    gamma = checkpoint_name(spade.mlp_gamma(actv), "spade_gamma")
    return x_hat * (1 + gamma) + spade.mlp_beta(actv)


def _modulate_windowed(spade: SPADE, x_hat, labels, rest):
    """`_modulate` with gamma and beta from per-class tables where the label window is uniform
    (`spade_windows`: the same values up to float rounding)."""
    actv = jax.nn.relu(spade.mlp_shared(rest, labels=labels, num_classes=spade.num_classes))
    edges = None if rest is None else rest[..., 0]
    keys = spade_windows.uniform_keys(labels, spade.num_classes, edges)
    shared = spade.mlp_shared
    dt = spade.dtype
    shared_kernel, shared_bias = shared.weight().astype(dt), shared.bias[...].astype(dt)

    def conv(module):
        kernel, bias = module.weight().astype(dt), module.bias[...].astype(dt)
        return spade_windows.modulation(
            actv, keys, shared_kernel, shared_bias, kernel, bias, spade.num_classes
        )

    gamma = checkpoint_name(conv(spade.mlp_gamma), "spade_gamma")
    return x_hat * (1 + gamma) + conv(spade.mlp_beta)


# On CPU, where the shared convolution is a gather (`conv.onehot_conv`), the backward pass keeps
# only gamma (and the inputs) and recomputes the shared activation, 128 channels at the layer's
# resolution, from the labels: the full-size SPADE step's temporaries 1.054 -> 0.962 GB at batch 1
# (`compiled.memory_analysis()`), the same gradients. Elsewhere that recomputation would be a
# real convolution, so GPU / TPU keep the activation.
_modulate_recomputing = nnx.remat(
    _modulate, policy=jax.checkpoint_policies.save_only_these_names("spade_gamma")
)
_modulate_windowed_recomputing = nnx.remat(
    _modulate_windowed, policy=jax.checkpoint_policies.save_only_these_names("spade_gamma")
)
