"""Convolution and linear layers with the official initialisation and optional spectral norm.

`Conv2d` is a 2-D NHWC convolution with PyTorch's symmetric zero padding and, with
`spectral_norm=True`, the semantics of `torch.nn.utils.spectral_norm`:

* the kernel parameter is the un-normalized weight (`weight_orig` in PyTorch);
* the weight matrix is the kernel reshaped PyTorch's way, `(out, in * kh * kw)`, so the stored
  vectors `u` (out,) and `v` (in * kh * kw,) are interchangeable with the official ones;
* a training forward runs one power iteration (`v = normalize(W^T u)`, `u = normalize(W v)`,
  eps 1e-12), stores u and v, and divides by `sigma = u . W v` (gradients flow through W only);
* an evaluation forward (`use_running_average=True`, set by `model.eval()`) uses the stored u
  and v as they are.

`u` and `v` are `SpectralVector` variables (a kind of `nnx.BatchStat`), not parameters.

`fold_spectral_norm` copies an evaluation-mode module with its spectral-normalized kernels made
plain ones (`W / sigma`, computed once from the stored vectors): the same numbers without
recomputing sigma and rescaling every kernel on every call (benchmarks/RESULTS.md has the time
saved). Inference (`clade_jax.synthesize`, the runtime column) folds.

Initialisation is the official `init_weights('xavier', 0.02)`: xavier-normal weights with gain 0.02
and zero biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

XAVIER_GAIN = 0.02


class SpectralVector(nnx.BatchStat):
    """Power-iteration vector of a spectral-normalized layer (state, not a parameter)."""


def xavier_normal(gain: float = XAVIER_GAIN):
    """PyTorch's `xavier_normal_(gain)`: std = gain * sqrt(2 / (fan_in + fan_out))."""
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "normal")


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class Conv2d(nnx.Module):
    """NHWC convolution, kernel (kh, kw, in, out), PyTorch padding semantics.

    Args:
      in_features / out_features: channel counts.
      kernel_size: square kernel size.
      stride: stride.
      padding: symmetric zero padding on each side (PyTorch `padding=`).
      use_bias: learn a bias.
      spectral_norm: wrap the kernel with spectral normalization.
      dtype: compute dtype (parameters stay float32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        spectral_norm: bool = False,
        dtype=jnp.float32,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ):
        k = kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.spectral_norm = spectral_norm
        self.use_running_average = use_running_average
        self.kernel = nnx.Param(xavier_normal()(rngs.params(), (k, k, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        if spectral_norm:
            u = jax.random.normal(rngs.params(), (out_features,))
            v = jax.random.normal(rngs.params(), (in_features * k * k,))
            self.u = SpectralVector(_l2_normalize(u))
            self.v = SpectralVector(_l2_normalize(v))

    def weight(self) -> jnp.ndarray:
        """The effective kernel (spectral-normalized if enabled), float32 (kh, kw, in, out)."""
        w = self.kernel[...]
        if not self.spectral_norm:
            return w
        w_mat = jnp.transpose(w, (3, 2, 0, 1)).reshape(w.shape[3], -1)  # torch (out, in*kh*kw)
        u, v = self.u[...], self.v[...]
        if not self.use_running_average:
            w_sg = jax.lax.stop_gradient(w_mat)
            v = _l2_normalize(w_sg.T @ u)
            u = _l2_normalize(w_sg @ v)
            # set_value, not `[...] =`: under a trace flax's indexed write probes the tracer's
            # `.sharding`, whose error message walks the whole jaxpr (6.9 of the 10.9 s it
            # took to trace a tiny training step).
            self.u.set_value(u)
            self.v.set_value(v)
        sigma = jnp.dot(u, w_mat @ v)
        return w / sigma

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (N, H, W, in) -> (N, H', W', out) in the compute dtype."""
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.weight().astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def fold_spectral_norm(module: nnx.Module) -> nnx.Module:
    """A copy of an evaluation-mode module with every spectral-normalized `Conv2d` folded.

    In the copy each such layer's kernel is its effective evaluation kernel `W / sigma` (from the
    stored u, v) and its spectral norm is off, so the outputs are unchanged (up to float
    rounding) and no sigma is computed per call. `module` itself is not modified. The copy is for
    inference only: its kernels are no longer the trained `weight_orig`, so do not train or
    checkpoint it. A module with no spectral norm comes back as a plain copy.

    Raises:
      ValueError: a spectral-normalized layer is in training mode (its u, v would still move).
    """
    folded = nnx.clone(module)  # new Variables: `nnx.merge(*nnx.split(m))` would share them
    layers = [
        (path, node)
        for path, node in nnx.iter_graph(folded)
        if isinstance(node, Conv2d) and node.spectral_norm
    ]
    for path, layer in layers:
        if not layer.use_running_average:
            name = "/".join(map(str, path))
            raise ValueError(
                f"fold_spectral_norm needs an evaluation-mode module (call .eval() first); "
                f"layer {name!r} is in training mode"
            )
        layer.kernel.set_value(layer.weight())
        layer.spectral_norm = False
        del layer.u, layer.v
    return folded


class Linear(nnx.Module):
    """Dense layer, kernel (in, out), xavier-normal(0.02) init, zero bias."""

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(xavier_normal()(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y + self.bias[...].astype(self.dtype)
