"""Parameter-free normalizations: the first half of every CLADE / SPADE layer.

`ParamFreeNorm(num_features, kind)` with `kind` one of

* ``"batch"``: BatchNorm without affine parameters, as the official `SynchronizedBatchNorm2d(affine=
  False)`: training normalizes with the biased batch variance and updates the running statistics
  with momentum 0.1 and the *unbiased* variance; evaluation uses the running statistics. Under
  `jit` with a batch-sharded input the mean over (N, H, W) is a mean over the global batch, so this
  is the synchronized BatchNorm on any number of devices and hosts with no extra code.
* ``"instance"``: InstanceNorm without affine parameters and without running statistics.
* ``"switchable"``: Switchable Normalization (Luo et al., ICLR 2019; seed 003): learned softmax
  mixtures of instance, layer and batch statistics, without the affine part (CLADE / SPADE supply
  it). `switchable_batch=False` gives the variant of seed 003 that drops the batch statistics.
  Statistics follow the reference implementation: unbiased instance variance, layer and batch
  statistics derived from the instance ones, running statistics initialised to zero and updated
  as `0.9 * running + 0.1 * batch`.
* ``"none"``: identity.

`model.eval()` sets `use_running_average=True` on every layer (NNX convention), `model.train()`
sets it back. Inputs are NHWC; statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NORM_KINDS = ("batch", "instance", "switchable", "none")


def _moments(x: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and biased variance over `axes` (two-pass, float32), keepdims."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return mean, var


class ParamFreeNorm(nnx.Module):
    """Normalization without affine parameters (see the module docstring for the kinds).

    Args:
      num_features: channel count C of the NHWC input.
      kind: "batch", "instance", "switchable" or "none".
      momentum: running-statistics momentum in PyTorch's sense (new = (1-m) * old + m * batch).
      eps: added to the variance.
      switchable_batch: with kind="switchable", include the batch statistics in the mixture.
      use_running_average: evaluation mode (set by `model.eval()` / `model.train()`).
      rngs: unused (no random initialisation); accepted for a uniform layer signature.
    """

    def __init__(
        self,
        num_features: int,
        kind: str = "batch",
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        switchable_batch: bool = True,
        use_running_average: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        if kind not in NORM_KINDS:
            raise ValueError(f"param-free norm must be one of {NORM_KINDS}, got {kind!r}")
        self.num_features = num_features
        self.kind = kind
        self.momentum = momentum
        self.eps = eps
        self.use_running_average = use_running_average
        self.switchable_batch = switchable_batch and kind == "switchable"
        if kind == "batch":
            self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
            self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        elif kind == "switchable":
            n = 3 if self.switchable_batch else 2
            self.mean_weight = nnx.Param(jnp.ones((n,), jnp.float32))
            self.var_weight = nnx.Param(jnp.ones((n,), jnp.float32))
            if self.switchable_batch:
                self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
                self.running_var = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: (N, H, W, C) -> normalized (N, H, W, C) in x's dtype."""
        if self.kind == "none":
            return x
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        if self.kind == "batch":
            mean, var = self._batch_stats(xf)
        elif self.kind == "instance":
            mean, var = _moments(xf, (1, 2))
        else:
            mean, var = self._switchable_stats(xf)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return y.astype(dtype)

    def _update_running(self, batch_mean: jnp.ndarray, batch_var: jnp.ndarray) -> None:
        m = self.momentum
        # set_value: see `Conv2d.weight` (indexed writes are slow to trace).
        self.running_mean.set_value((1 - m) * self.running_mean[...] + m * batch_mean)
        self.running_var.set_value((1 - m) * self.running_var[...] + m * batch_var)

    def _batch_stats(self, x: jnp.ndarray):
        if self.use_running_average:
            return self.running_mean[...], self.running_var[...]
        mean, var = _moments(x, (0, 1, 2))
        n = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased = var.reshape(-1) * (n / max(n - 1, 1))
        self._update_running(
            jax.lax.stop_gradient(mean.reshape(-1)), jax.lax.stop_gradient(unbiased)
        )
        return mean, var

    def _switchable_stats(self, x: jnp.ndarray):
        hw = x.shape[1] * x.shape[2]
        mean_in, var_in = _moments(x, (1, 2))  # (N, 1, 1, C)
        var_in = var_in * (hw / max(hw - 1, 1))  # the reference uses torch's unbiased var
        mean_ln = jnp.mean(mean_in, axis=3, keepdims=True)  # (N, 1, 1, 1)
        second = var_in + jnp.square(mean_in)
        var_ln = jnp.mean(second, axis=3, keepdims=True) - jnp.square(mean_ln)
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.switchable_batch:
            if self.use_running_average:
                mean_bn, var_bn = self.running_mean[...], self.running_var[...]
            else:
                mean_bn = jnp.mean(mean_in, axis=0, keepdims=True)  # (1, 1, 1, C)
                var_bn = jnp.mean(second, axis=0, keepdims=True) - jnp.square(mean_bn)
                self._update_running(
                    jax.lax.stop_gradient(mean_bn.reshape(-1)),
                    jax.lax.stop_gradient(var_bn.reshape(-1)),
                )
            means.append(mean_bn)
            variances.append(var_bn)
        wm = jax.nn.softmax(self.mean_weight[...])
        wv = jax.nn.softmax(self.var_weight[...])
        mean = sum(wm[i] * m for i, m in enumerate(means))
        var = sum(wv[i] * v for i, v in enumerate(variances))
        return mean, var
